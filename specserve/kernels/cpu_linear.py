"""A row-invariant fp32 linear layer for the CPU (`cpu_linear.c`), built with the system's C compiler at first use.

Why: a decode step multiplies one row by every weight, a verification pass k + 1 rows. Speculation is exact only
if each row's output is the same bits in both, and a verification pass nearly free only if k + 1 rows cost about
what one does. Neither of torch's CPU kernels gives both on a small model: MKL's sgemm (F.linear) streams a
weight fastest for one or two rows but takes another summation order for one row than for two or more, and a
compute-bound one from four rows (2.5x one row at eight); oneDNN's packed kernel is row-invariant and flat up to
eight rows but streams a weight at half MKL's speed for one row (SmolLM2-135M's layers on this project's 2-core
Xeon: `specserve bench profile`). The C kernel sums each output in one fixed order (see its header) and streams
each weight once for up to eight rows at a time, prefetching the next tile. A weight whose numbers are all bf16
(the default verifier: a bf16 checkpoint run in fp32) can be streamed from a bf16 copy: the same bits from half
the bytes (`exact_bf16`).

The shared library is built by `cpu_build` (compiled once per source, compiler and CPU, loaded with ctypes); it
shares torch's OpenMP runtime, and its thread count follows `torch.get_num_threads()`. Where there is no compiler
(or SPECSERVE_CPU_LINEAR=0) `available()` is False and callers keep torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from specserve.kernels import cpu_build

_F32 = torch.float32
COMPACT_ROWS = 32  # up to this many rows a bf16-exact weight is read in bf16 (64 rows: 5% slower than fp32)


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, n = ctypes.c_void_p, ctypes.c_long
    signature = [p, n, n, p, n, p, p, ctypes.c_int]
    return cpu_build.functions(
        {"specserve_linear_f32": (None, signature), "specserve_linear_f32_bf16w": (None, signature)}
    )


@functools.cache
def _kernel():
    lib = _library()
    return None if lib is None else lib.specserve_linear_f32


@functools.cache
def _kernel_bf16w():
    lib = _library()
    return None if lib is None else lib.specserve_linear_f32_bf16w


def exact_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """A bf16 copy of an fp32 weight whose every number bf16 holds exactly (a checkpoint stored in bf16 and
    upcast, as the default verifier is), else None: `linear_f32` reads such a copy for a few rows, the same
    numbers from half the bytes."""
    if weight.dtype != _F32 or weight.numel() == 0:
        return None
    with torch.no_grad():
        compact = weight.detach().to(torch.bfloat16).contiguous()
        return compact if torch.equal(compact.float(), weight) else None


def available() -> bool:
    """Whether the kernel is built and loaded (compiling it on the first call)."""
    return _kernel() is not None


def linear_f32(
    x: torch.Tensor,  # [..., in] fp32, CPU
    weight: torch.Tensor,  # [out, in] fp32, CPU, contiguous
    bias: torch.Tensor | None = None,  # [out] fp32, contiguous
    compact: torch.Tensor | None = None,  # [out, in] bf16: `exact_bf16(weight)`
) -> torch.Tensor:  # [..., out] fp32
    """x @ weight.T + bias, each row's output the same bits whatever the number of rows (needs `available()`).
    With `compact` (the same numbers in bf16), up to COMPACT_ROWS rows read it instead: the same bits, half the
    bytes to stream (a decode step of SmolLM2-135M's layers: 9.0 against 15.8 ms on this project's Xeon); more
    rows are bound by arithmetic, which the widening would only add to. Called ~120 times a forward: kept to a
    few microseconds of Python."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the CPU linear kernel is not available (see the log)")
    if x.dtype != _F32 or weight.dtype != _F32 or x.device.type != "cpu" or weight.device.type != "cpu":
        raise TypeError("linear_f32 takes fp32 CPU tensors")
    if not weight.is_contiguous() or (bias is not None and (bias.dtype != _F32 or not bias.is_contiguous())):
        raise ValueError("linear_f32 needs a contiguous weight and bias")
    n, k = weight.shape
    shape = x.shape
    if shape[-1] != k:
        raise ValueError(f"input has {shape[-1]} features, the weight {k}")
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, n)  # the default dtype is fp32 unless changed: checked below
    if out.dtype != _F32:
        out = out.float()
    if compact is not None and rows <= COMPACT_ROWS:
        if compact.dtype != torch.bfloat16 or compact.shape != weight.shape or not compact.is_contiguous():
            raise ValueError("compact must be the weight's contiguous bf16 copy (exact_bf16)")
        _kernel_bf16w()(x2.data_ptr(), rows, k, compact.data_ptr(), n, None if bias is None else bias.data_ptr(),
                        out.data_ptr(), torch.get_num_threads())
    elif rows:
        kernel(x2.data_ptr(), rows, k, weight.data_ptr(), n, None if bias is None else bias.data_ptr(),
               out.data_ptr(), torch.get_num_threads())
    return out if len(shape) == 2 else out.view(*shape[:-1], n)
