"""RMSNorm for fp32 on the CPU in C (`cpu_norm.c`), alone or fused with the residual add before it.

A decode step's norms are one row each: torch's cost there is dispatch, run with caches a linear layer has just
flushed (see the C file). Row-invariant like the linear kernel; can differ from F.rms_norm in the last bit.
`applies` says when the model takes it: fp32 CPU tensors outside autograd, the kernels built.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from specserve.kernels import cpu_build

_F32 = torch.float32


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, n, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    return cpu_build.functions(
        {
            "specserve_rms_norm_f32": (None, [p, n, n, p, f, p]),
            "specserve_add_rms_norm_f32": (None, [p, p, n, n, p, f, p, p]),
        }
    )


def available() -> bool:
    return _library() is not None


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` serves this call: fp32 CPU tensors, no gradient wanted, the kernels built."""
    return cpu_build.serves(x, weight) and _library() is not None


def _check(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if not applies(x, weight):
        raise TypeError("cpu_norm takes fp32 CPU tensors outside autograd, with the kernels built")
    if weight.dim() != 1 or x.shape[-1] != weight.numel():
        raise ValueError(f"the norm weight has {weight.numel()} features, the input {x.shape[-1]}")
    return x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # [..., hidden] -> same
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dimension, each row on its own."""
    x = _check(x, weight)
    out = torch.empty(x.shape, dtype=_F32)
    k = x.shape[-1]
    if x.numel():
        _library().specserve_rms_norm_f32(x.data_ptr(), x.numel() // k, k, weight.contiguous().data_ptr(), eps,
                                          out.data_ptr())
    return out


def add_rms_norm(
    x: torch.Tensor,  # [..., hidden]: the residual stream
    h: torch.Tensor,  # [..., hidden]: what a block adds to it
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (x + h, rms_norm(x + h)), new tensors
    """The residual add and the norm after it in one call; x + h is exactly torch's."""
    x = _check(x, weight)
    if h.shape != x.shape or h.dtype != _F32 or h.device.type != "cpu":
        raise ValueError(f"the residual {tuple(x.shape)} and the block output {tuple(h.shape)} must match")
    h = h.contiguous()
    total, out = torch.empty(x.shape, dtype=_F32), torch.empty(x.shape, dtype=_F32)
    k = x.shape[-1]
    if x.numel():
        _library().specserve_add_rms_norm_f32(x.data_ptr(), h.data_ptr(), x.numel() // k, k,
                                              weight.contiguous().data_ptr(), eps, total.data_ptr(), out.data_ptr())
    return total, out
