"""The elementwise steps of an fp32 decoder layer on the CPU, in C (`cpu_pointwise.c`): rotary embedding of the
queries and keys in place, and SwiGLU's silu(gate) * up. One call each instead of four or five torch calls on a
few rows (see the C file). `applies` says when the model takes them: fp32 CPU tensors outside autograd.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from specserve.kernels import cpu_build

_F32 = torch.float32
MAX_HEAD_DIM = 512


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, n = ctypes.c_void_p, ctypes.c_long
    return cpu_build.functions(
        {"specserve_rotary_f32": (None, [p, n, n, n, n, p, p]), "specserve_silu_mul_f32": (None, [p, n, n, p])}
    )


def available() -> bool:
    return _library() is not None


def applies(x: torch.Tensor) -> bool:
    """Whether these kernels serve x: fp32 on the CPU, no gradient wanted, the kernels built."""
    return cpu_build.serves(x) and _library() is not None


def rotate_(
    x: torch.Tensor,  # [num_tokens, width] fp32, contiguous: each row holds `heads` heads from column 0
    heads: int,
    head_dim: int,
    cos: torch.Tensor,  # [num_tokens, head_dim] (or [num_tokens, 1, head_dim])
    signed_sin: torch.Tensor,  # the same shape: sin with its first half negated (llama.RotaryEmbedding)
) -> torch.Tensor:  # x, rotated in place
    """HF's x * cos + rotate_half(x) * sin on the first `heads` heads of every row, in place; the same bits as
    llama.rotate."""
    if not applies(x) or not x.is_contiguous() or x.dim() != 2:
        raise TypeError("rotate_ takes a contiguous 2-D fp32 CPU tensor outside autograd, with the kernels built")
    tokens, width = x.shape
    if heads * head_dim > width or head_dim % 2 or head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{heads} heads of {head_dim} do not fit rows of {width} (even head_dim <= {MAX_HEAD_DIM})")
    cos, signed_sin = cos.reshape(-1, head_dim), signed_sin.reshape(-1, head_dim)
    if cos.shape[0] != tokens or signed_sin.shape[0] != tokens or cos.dtype != _F32 or signed_sin.dtype != _F32:
        raise ValueError(f"cos and sin need {tokens} fp32 rows of {head_dim}")
    cos, signed_sin = cos.contiguous(), signed_sin.contiguous()
    if tokens:
        _library().specserve_rotary_f32(x.data_ptr(), tokens, width, heads, head_dim, cos.data_ptr(),
                                        signed_sin.data_ptr())
    return x


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * inter] -> [num_tokens, inter]
    """silu(gate) * up, gate and up the two halves of each row (the fused gate/up projection's output)."""
    if not applies(gate_up) or gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise TypeError("silu_mul takes a 2-D fp32 CPU tensor of even width outside autograd, with the kernels built")
    gate_up = gate_up.contiguous()
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(tokens, inter, dtype=_F32)
    if tokens:
        _library().specserve_silu_mul_f32(gate_up.data_ptr(), tokens, inter, out.data_ptr())
    return out
