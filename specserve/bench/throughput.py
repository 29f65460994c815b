"""Throughput benchmark: plain decoding (no draft), our engine vs HF `generate`, greedy, fixed output length.

Three figures, measured side by side in one run on Spec-Bench prompts, every output exactly
--max-tokens long (ignore_eos): our batch-1 tokens/s, HF's batch-1 tokens/s, and our aggregate
tokens/s with --batch requests decoded together. The ratios are the [core] speed check: ours at
batch 1 >= 1.3x HF at batch 1, ours at batch 8 >= 4x HF at batch 1. Wall time includes prefill.
Prints the ratios against those targets; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from tqdm.auto import tqdm

from specserve.bench.options import THROUGHPUT_PRESETS, add_throughput_args, resolve_presets, resolve_verifier
from specserve.bench.report import environment, table, write_json
from specserve.evaluation.acceptance import ratio
from specserve.evaluation.prompts import load_prompts
from specserve.evaluation.systems import HFSystem, OursSystem

TARGET_BATCH_1 = 1.3  # ours batch 1 / HF batch 1
TARGET_BATCH_N = 4.0  # ours batch --batch (8 in the target) / HF batch 1
WARMUP_TOKENS = 8


def groups_of(items: list, size: int) -> list[tuple[list, int]]:
    """Consecutive groups of `size`, the last filled up from the start: (group, how many are its own)."""
    out = []
    for start in range(0, len(items), size):
        own = items[start : start + size]
        fill = [items[i % len(items)] for i in range(size - len(own))]
        out.append((own + fill, len(own)))
    return out


def _systems(args: argparse.Namespace, verifier: str, eos: list[int], pad: int, max_seq_len: int):
    """Our plain engine, and HF `generate` unless --no-hf (then None)."""
    print("loading ours-plain", file=sys.stderr, flush=True)
    ours = OursSystem(
        "ours-plain",
        verifier,
        None,
        None,
        args.dtype,
        args.device,
        max_seq_len,
        max_batch=args.batch,
        upcast_matmuls=args.upcast_matmuls,
    )
    hf = None
    if not args.no_hf:
        print("loading hf-plain", file=sys.stderr, flush=True)
        hf = HFSystem("hf-plain", verifier, None, args.dtype, args.device, eos, pad)
    return ours, hf


def _warm_up(args: argparse.Namespace, ours: OursSystem, hf: HFSystem | None, prompts: list) -> None:
    print("warm-up", file=sys.stderr, flush=True)
    warm = min(WARMUP_TOKENS, args.max_tokens)
    ours.run(prompts[0].token_ids, 0.0, warm, 0, ignore_eos=True)
    if hf is not None:
        hf.run(prompts[0].token_ids, 0.0, warm, 0, ignore_eos=True)
    ours.run_batch([p.token_ids for p in groups_of(prompts, args.batch)[0][0]], warm)


def _measure(
    args: argparse.Namespace, ours: OursSystem, hf: HFSystem | None, prompts: list
) -> tuple[list[dict], list[dict]]:
    """(batch-1 runs of every system on every prompt, our --batch runs of every group)."""
    single: list[dict] = []
    batched: list[dict] = []
    bar = tqdm(total=len(prompts), desc="throughput", unit="prompt")
    for g, (group, own) in enumerate(groups_of(prompts, args.batch)):
        outs, seconds = ours.run_batch([p.token_ids for p in group], args.max_tokens)
        batched.append(
            {
                "question_ids": [p.question_id for p in group],
                "output_tokens": sum(len(o) for o in outs),
                "seconds": seconds,
            }
        )
        for i, p in enumerate(group[:own]):
            systems = [ours, hf] if hf is not None else [ours]
            if (g + i) % 2:  # alternate who goes first
                systems.reverse()
            for system in systems:
                r = system.run(p.token_ids, 0.0, args.max_tokens, 0, ignore_eos=True)
                single.append(
                    {
                        "system": system.name,
                        "question_id": p.question_id,
                        "category": p.category,
                        "prompt_tokens": len(p.token_ids),
                        "output_tokens": len(r.token_ids),
                        "seconds": r.seconds,
                    }
                )
            bar.update(1)
    bar.close()
    return single, batched


def _tokens_per_s(records: list[dict]) -> float | None:
    seconds = sum(r["seconds"] for r in records)
    return sum(r["output_tokens"] for r in records) / seconds if seconds else None


def _summary(batch: int, single: list[dict], batched: list[dict], with_hf: bool) -> dict:
    """The three tokens/s figures, their ratios and whether the targets are met."""
    ours_1 = _tokens_per_s([r for r in single if r["system"] == "ours-plain"])
    hf_1 = _tokens_per_s([r for r in single if r["system"] == "hf-plain"]) if with_hf else None
    ours_b = _tokens_per_s(batched)
    r1, rb = ratio(ours_1, hf_1), ratio(ours_b, hf_1)
    return {
        "batch": batch,
        "ours_batch_1_tokens_per_s": ours_1,
        "hf_batch_1_tokens_per_s": hf_1,
        "ours_batch_n_tokens_per_s": ours_b,
        "ours_batch_1_over_hf_batch_1": r1,
        "ours_batch_n_over_hf_batch_1": rb,
        "ours_batch_n_over_ours_batch_1": ratio(ours_b, ours_1),
        "targets": {"ours_batch_1_over_hf_batch_1": TARGET_BATCH_1, "ours_batch_8_over_hf_batch_1": TARGET_BATCH_N},
        "targets_met": {
            "batch_1": r1 >= TARGET_BATCH_1 if r1 is not None else None,
            "batch_8": rb >= TARGET_BATCH_N if rb is not None and batch == 8 else None,
        },
    }


def _print_summary(args: argparse.Namespace, summary: dict, num_prompts: int) -> None:
    ours_1, hf_1 = summary["ours_batch_1_tokens_per_s"], summary["hf_batch_1_tokens_per_s"]
    ours_b = summary["ours_batch_n_tokens_per_s"]
    r1, rb = summary["ours_batch_1_over_hf_batch_1"], summary["ours_batch_n_over_hf_batch_1"]
    print(f"\nplain greedy decoding, {args.max_tokens} tokens per prompt (ignore_eos), {num_prompts} prompts")
    print(
        table(
            ["system", "batch", "tok/s"],
            [["ours-plain", 1, ours_1], ["hf-plain", 1, hf_1], ["ours-plain", args.batch, ours_b]],
        )
    )
    if r1 is not None:
        met = summary["targets_met"]
        print(
            f"ours batch 1 / HF batch 1 = {r1:.2f}x (target >= {TARGET_BATCH_1}x: "
            f"{'met' if met['batch_1'] else 'not met'})"
        )
        target = (
            "the target is stated for batch 8"
            if args.batch != 8
            else (f"target >= {TARGET_BATCH_N}x: {'met' if met['batch_8'] else 'not met'}")
        )
        print(f"ours batch {args.batch} / HF batch 1 = {rb:.2f}x ({target})")


def _write(
    args: argparse.Namespace, verifier: str, prompts: list, summary: dict, single: list[dict], batched: list[dict]
) -> None:
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command", "bench")}
    config.update(verifier=verifier)
    write_json(
        args.out,
        {
            "benchmark": "throughput",
            "config": config,
            "environment": environment(args.device),
            "prompts": [
                {k: v for k, v in asdict(p).items() if k not in ("text", "token_ids")}
                | {"prompt_tokens": len(p.token_ids)}
                for p in prompts
            ],
            "summary": summary,
            "batch_1_runs": single,
            "batch_runs": batched,
        },
    )
    print(f"\nwrote {args.out}")


def run(args: argparse.Namespace) -> int:
    import transformers
    from transformers import AutoTokenizer

    from specserve.engine.engine import eos_token_ids

    transformers.logging.set_verbosity_error()
    resolve_presets(args, THROUGHPUT_PRESETS)
    verifier = resolve_verifier(args)
    tokenizer = AutoTokenizer.from_pretrained(verifier)
    prompts = load_prompts(tokenizer, args.prompts_per_category, args.categories, args.prompts_file)
    max_seq_len = max(len(p.token_ids) for p in prompts) + args.max_tokens + 1
    eos = sorted(eos_token_ids(verifier, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]

    ours, hf = _systems(args, verifier, eos, pad, max_seq_len)
    _warm_up(args, ours, hf, prompts)
    single, batched = _measure(args, ours, hf, prompts)
    summary = _summary(args.batch, single, batched, hf is not None)
    _print_summary(args, summary, len(prompts))
    _write(args, verifier, prompts, summary, single, batched)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="specserve bench throughput",
        description="Plain greedy decoding at a fixed output length: our engine vs HF generate at batch 1, and our "
        "aggregate tokens/s at --batch, with the ratios of the [core] speed targets. Writes JSON.",
    )
    add_throughput_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"specserve bench throughput: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
