"""Kernel benchmark: the rejection sampler alone, Triton kernel vs PyTorch reference, over batch x k x vocab.

A GPU benchmark: without CUDA it says so and skips (exit 0), unless `--device cpu` asks to time the
PyTorch reference alone (the Triton interpreter is a correctness tool, not a speed one). Prints a
table of medians and the reference / Triton ratio; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial

from specserve.bench.options import KERNEL_PRESETS, add_kernel_args, resolve_presets
from specserve.bench.report import table

CUDA_GRID = {"batch": [1, 8, 64], "k": [1, 4, 8], "vocab": [49152, 128256]}
CPU_GRID = {"batch": [1, 8, 64], "k": [1, 4], "vocab": [49152]}
QUICK_GRID = {"batch": [1, 8], "k": [1, 4], "vocab": [49152]}


def make_inputs(batch: int, k: int, vocab: int, greedy_fraction: float, with_draft_probs: bool, device: str) -> tuple:
    """Random inputs shaped like a serving step where every request drafts k tokens."""
    import torch

    gen = torch.Generator(device=device).manual_seed(0)
    target_probs = torch.softmax(
        torch.randn(batch, k + 1, vocab, device=device, generator=gen), dim=-1
    )  # [batch, k + 1, vocab]
    draft_probs = torch.softmax(torch.randn(batch, k, vocab, device=device, generator=gen), dim=-1)  # [batch, k, vocab]
    # Drafting the target argmax keeps greedy requests walking the whole draft, the slow path.
    draft_token_ids = target_probs[:, :k].argmax(dim=-1)  # [batch, k]
    num_draft_tokens = torch.full((batch,), k, dtype=torch.int64, device=device)  # [batch]
    uniform = torch.rand(batch, k, device=device, generator=gen)  # [batch, k]
    exp_noise = torch.empty(batch, vocab, device=device).exponential_(generator=gen)  # [batch, vocab]
    is_greedy = torch.rand(batch, device=device, generator=gen) < greedy_fraction  # [batch]
    return (
        draft_token_ids,
        draft_probs if with_draft_probs else None,
        target_probs,
        num_draft_tokens,
        uniform,
        exp_noise,
        is_greedy,
    )


def time_ms(fn: Callable[[], object], device: str, warmup: int, iters: int) -> float:
    """Median wall time of fn() in milliseconds, synchronising around each call on CUDA."""
    import torch

    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def run(args: argparse.Namespace) -> int:
    import torch

    resolve_presets(args, KERNEL_PRESETS)
    if not 0.0 <= args.greedy <= 1.0:
        raise ValueError(f"--greedy must be in [0, 1], got {args.greedy}")
    device = args.device
    if device == "auto":
        if not torch.cuda.is_available():
            print(
                "kernel benchmark skipped: no CUDA GPU (torch.cuda.is_available() is False). It compares the "
                "Triton kernel with the PyTorch reference on a GPU; --device cpu times the reference alone."
            )
            return 0
        device = "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False")

    from specserve.kernels import rejection_sample_reference, rejection_sample_triton
    from specserve.kernels import rejection_sampler as rs_module

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    grid = QUICK_GRID if args.quick else CUDA_GRID if device == "cuda" else CPU_GRID
    batches, ks, vocabs = args.batch or grid["batch"], args.k or grid["k"], args.vocab or grid["vocab"]
    with_triton = device == "cuda" and rs_module.triton is not None

    label = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device: {label}; greedy fraction {args.greedy}; "
        f"draft_probs: {'none (one-hot)' if args.no_draft_probs else 'dense'}; median of {args.iters} calls"
        + ("" if with_triton else "; reference only (no Triton on this device)")
    )
    rows = []
    for vocab in vocabs:
        for batch in batches:
            for k in ks:
                inputs = make_inputs(batch, k, vocab, args.greedy, not args.no_draft_probs, device)
                ref_ms = time_ms(partial(rejection_sample_reference, *inputs), device, args.warmup, args.iters)
                row = [batch, k, vocab, ref_ms]
                if with_triton:
                    tri_ms = time_ms(partial(rejection_sample_triton, *inputs), device, args.warmup, args.iters)
                    row += [tri_ms, ref_ms / tri_ms]
                rows.append(row)
                del inputs  # free the previous cell's tensors before allocating the next
    headers = ["batch", "k", "vocab", "reference ms"] + (["triton ms", "reference / triton"] if with_triton else [])
    print(table(headers, rows, digits=3))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="specserve bench kernel",
        description="The rejection sampler alone: Triton kernel vs PyTorch reference over batch x k x vocab, on a "
        "GPU (skipped without one; --device cpu times the reference alone). Prints a table.",
    )
    add_kernel_args(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"specserve bench kernel: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
