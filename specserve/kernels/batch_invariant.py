"""Batch-invariant matmul and RMSNorm: each row's result is the same bits however many rows share the launch.

Why: a library GEMM picks its algorithm (tile shape, split-K, a GEMV for one row) from the problem's
shape, so the same token's logits come out rounded differently in a 1-row decode step, a (k + 1)-row
verification pass and a step batched with seven other requests (Thinking Machines, "Defeating
Nondeterminism in LLM Inference", 2025; vLLM's batch-invariant mode). Near-tied logits then pick
different tokens: greedy speculation stops matching plain greedy, and a request's output depends on
who else the server was batching. cuBLAS does this on CUDA; MKL does it on the CPU too (fp32 rows
differ by ~1e-5 between a 1-row and a 3-row product on this project's machine).

The fix is to make the reduction order a function of the row alone:

* :func:`batch_invariant_linear`: ``x @ weight.T (+ bias)`` with one fixed tile shape whatever the
  problem size, no split-K: every output element is the fp32 sum over the reduction dimension in
  ``BLOCK_K`` chunks taken in order, by the same ``tl.dot`` on the same tile shape. Rows beyond the
  problem are zero-padded inside the tile and never touch a real row's sums, and a row's place in
  the tile does not matter either: a tensor core computes every element of an MMA the same way.
  (Triton's interpreter runs tl.dot as numpy's BLAS matmul, whose rounding does depend on a row's
  place, so under ``TRITON_INTERPRET=1`` the kernel multiplies and sums explicitly instead; the
  tiling and the reduction order are the same code.) The price: a 1-row
  decode step computes a whole ``BLOCK_M``-row tile (memory-bound on a GPU at small batch anyway).
* :func:`batch_invariant_rms_norm`: one program per row, the whole row in one block, one fixed
  ``tl.sum`` tree; the same rounding steps as `specserve.model.llama.RMSNorm`.

The PyTorch references (:func:`linear_reference`, :func:`rms_norm_reference`) give the same values up
to summation order and are the tests' oracle for correctness; the invariance itself is tested by
comparing a row computed alone with the same row inside larger launches, bit for bit. Triton runs on
CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (tests only: slow).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional; the references need only PyTorch.
    triton = None
    tl = None

__all__ = ["batch_invariant_linear", "batch_invariant_rms_norm", "linear_reference", "rms_norm_reference"]

# One tile shape for every launch. 64 x 64 output tiles over 32-wide reduction chunks: 16 KiB of fp32
# accumulator per program, and tl.dot's 16-row minimum is met.
BLOCK_M = 64
BLOCK_N = 64
BLOCK_K = 32

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def linear_reference(
    x: torch.Tensor,  # [..., in]
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None = None,  # [out]
) -> torch.Tensor:  # [..., out] in x's dtype
    """The same values up to summation order: an fp32 product, bias added in fp32, rounded to x's dtype."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`specserve.model.llama.RMSNorm`: normalise in fp32, round to x's dtype, then scale in that dtype."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _check_triton(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("batch-invariant kernels need triton, which is not installed")
    for t in tensors:
        if not t.is_cuda and not _INTERPRETED:
            raise ValueError(
                f"batch-invariant kernels got a tensor on {t.device}; they need CUDA tensors "
                "or TRITON_INTERPRET=1 set before triton is imported"
            )


if triton is not None:

    @triton.jit
    def _linear_kernel(
        x_ptr,  # [M, K]
        w_ptr,  # [N, K]
        b_ptr,  # [N] (unused without bias)
        out_ptr,  # [M, N]
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        EXPLICIT_DOT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        ks = tl.arange(0, BLOCK_K)  # [BLOCK_K]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # the reduction walks K in order, the same chunks for every row: no split-K, no shape-dependent choice
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            a = tl.load(
                x_ptr + rows[:, None] * stride_xm + kk[None, :],
                mask=(rows[:, None] < M) & (kk[None, :] < K),
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            b = tl.load(
                w_ptr + cols[None, :] * stride_wn + kk[:, None],
                mask=(cols[None, :] < N) & (kk[:, None] < K),
                other=0.0,
            )  # [BLOCK_K, BLOCK_N]
            if EXPLICIT_DOT:
                acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
            else:
                acc += tl.dot(a, b, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + rows[:, None] * stride_om + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=(rows[:, None] < M) & (cols[None, :] < N),
        )

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, N, stride_x, stride_o, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        normed = (x * rstd).to(out_ptr.dtype.element_ty)  # rounded to the activation dtype, as RMSNorm does
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def batch_invariant_linear(
    x: torch.Tensor,  # [..., in]
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None = None,  # [out]
) -> torch.Tensor:  # [..., out] in x's dtype
    """``F.linear`` whose every output row is the same bits whatever the number of rows (see the module doc)."""
    _check_triton(x, weight)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    if weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype}, weight {weight.dtype}: the kernel takes one dtype")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    m, k = x2.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m and n:
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        _linear_kernel[grid](
            x2, weight, bias if bias is not None else weight, out, m, n, k,
            x2.stride(0), weight.stride(0), out.stride(0),
            HAS_BIAS=bias is not None,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            EXPLICIT_DOT=_INTERPRETED,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def batch_invariant_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference` with one program per row: a row's result does not depend on the other rows."""
    _check_triton(x, weight)
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, weight, out, n, x2.stride(0), out.stride(0), eps, BLOCK=triton.next_power_of_2(n)
        )
    return out.reshape(x.shape)
