"""Attention over the paged KV cache for fp32 on the CPU, in C (`cpu_attention.c`): each query row reads its own
context through the slot table, no gather, no padding, no mask, and its output never depends on the rows beside
it (see the C file). `applies` says when the model takes it: fp32 CPU tensors outside autograd, kernels built.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from specserve.kernels import cpu_build

_F32 = torch.float32


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, n = ctypes.c_void_p, ctypes.c_long
    signature = [p, p, p, p, n, p, p, n, n, n, n, ctypes.c_float, p, ctypes.c_int]
    return cpu_build.functions({"specserve_paged_attention_f32": (ctypes.c_int, signature)})


def available() -> bool:
    return _library() is not None


def applies(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `paged_attention` serves this call: fp32 CPU tensors, no gradient wanted, the kernels built."""
    return cpu_build.serves(q, k_cache) and _library() is not None


def row_layout(query_lens: list[int], context_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_request, row_length) [num_tokens] int64: each query row's request, and how many context positions it
    attends to (its position + 1), for requests whose new tokens come last in their contexts."""
    request, length = [], []
    for b, (q, c) in enumerate(zip(query_lens, context_lens, strict=True)):
        if not 0 < q <= c:
            raise ValueError(f"request {b}: {q} new tokens in a context of {c}")
        request.extend([b] * q)
        length.extend(range(c - q + 1, c + 1))
    return torch.tensor(request, dtype=torch.int64), torch.tensor(length, dtype=torch.int64)


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    context_slots: torch.Tensor,  # [batch, max_context] int64: the slot of every context position
    row_request: torch.Tensor,  # [num_tokens] int64
    row_length: torch.Tensor,  # [num_tokens] int64
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
    """softmax(q k^T * scale) v per query row over its first row_length context positions (causal by
    construction)."""
    if not applies(q, k_cache):
        raise TypeError("cpu_attention takes fp32 CPU tensors outside autograd, with the kernels built")
    tokens, heads, dim = q.shape
    slots, kv_heads, cache_dim = k_cache.shape
    if v_cache.shape != k_cache.shape or cache_dim != dim or heads % kv_heads:
        shapes = f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        raise ValueError(f"queries {tuple(q.shape)} do not fit the caches {shapes}")
    if row_request.shape != (tokens,) or row_length.shape != (tokens,) or context_slots.dim() != 2:
        raise ValueError("row_request and row_length need one entry per query row, context_slots [batch, context]")
    for t in (k_cache, v_cache, context_slots, row_request, row_length):
        if not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("caches, slots and row tables must be contiguous CPU tensors")
    if context_slots.dtype != torch.int64 or row_request.dtype != torch.int64 or row_length.dtype != torch.int64:
        raise TypeError("slots and row tables are int64")
    q = q.contiguous()
    out = torch.empty(tokens, heads * dim, dtype=_F32)
    if tokens:
        status = _library().specserve_paged_attention_f32(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), context_slots.data_ptr(), context_slots.shape[1],
            row_request.data_ptr(), row_length.data_ptr(), tokens, heads, kv_heads, dim, scale, out.data_ptr(),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("cpu_attention: no memory for the scores")
    return out
