"""Time the rejection sampler: Triton kernel vs PyTorch reference, over batch x k x vocab.

On CUDA both implementations run on the GPU and the table shows their ratio. On CPU only the
reference is timed (the Triton interpreter is a correctness tool, not a speed one), over a
smaller default grid. Prints a table; makes no assertions about speed.

    python bench/bench_rejection_sampler.py                 # defaults for the device found
    python bench/bench_rejection_sampler.py --batch 64 --k 8 --vocab 128256 --greedy 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

# Run as a plain script from anywhere: make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import rejection_sample_reference, rejection_sample_triton  # noqa: E402
from kernels import rejection_sampler as rs_module  # noqa: E402

CUDA_GRID = {"batch": [1, 8, 64], "k": [1, 4, 8], "vocab": [49152, 128256]}
CPU_GRID = {"batch": [1, 8, 64], "k": [1, 4], "vocab": [49152]}


def make_inputs(
    batch: int, k: int, vocab: int, greedy_fraction: float, with_draft_probs: bool, device: str
) -> tuple[torch.Tensor | None, ...]:
    """Random inputs shaped like a serving step where every request drafts k tokens."""
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="where to run; auto picks cuda when available (default: auto)",
    )
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 8 64)")
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        help="draft lengths per request (default: 1 4 8 on CUDA, 1 4 on CPU)",
    )
    parser.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        help="vocabulary sizes (default: 49152 128256 on CUDA, 49152 on CPU)",
    )
    parser.add_argument(
        "--greedy",
        type=float,
        default=0.5,
        help="fraction of greedy requests in each batch, 0..1 (default: 0.5)",
    )
    parser.add_argument(
        "--no-draft-probs",
        action="store_true",
        help="pass draft_probs=None (one-hot drafts, as from n-gram proposers)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (torch.set_num_threads); on a shared machine 1 gives steadier numbers",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per cell (default: 3)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per cell; median is shown (default: 20)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if not 0.0 <= args.greedy <= 1.0:
        raise SystemExit(f"--greedy must be in [0, 1], got {args.greedy}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    grid = CUDA_GRID if device == "cuda" else CPU_GRID
    batches = args.batch or grid["batch"]
    ks = args.k or grid["k"]
    vocabs = args.vocab or grid["vocab"]
    with_triton = device == "cuda" and rs_module.triton is not None

    label = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device: {label}; greedy fraction {args.greedy}; "
        f"draft_probs: {'none (one-hot)' if args.no_draft_probs else 'dense'}; "
        f"median of {args.iters} calls"
    )
    header = f"{'batch':>5} {'k':>3} {'vocab':>7} {'reference ms':>13}"
    if with_triton:
        header += f" {'triton ms':>10} {'ref/triton':>11}"
    print(header)
    print("-" * len(header))
    for vocab in vocabs:
        for batch in batches:
            for k in ks:
                inputs = make_inputs(batch, k, vocab, args.greedy, not args.no_draft_probs, device)
                ref_ms = time_ms(partial(rejection_sample_reference, *inputs), device, args.warmup, args.iters)
                line = f"{batch:>5} {k:>3} {vocab:>7} {ref_ms:>13.3f}"
                if with_triton:
                    tri_ms = time_ms(partial(rejection_sample_triton, *inputs), device, args.warmup, args.iters)
                    line += f" {tri_ms:>10.3f} {ref_ms / tri_ms:>10.1f}x"
                print(line, flush=True)
                del inputs  # free the previous cell's tensors before allocating the next


if __name__ == "__main__":
    main()
