"""Paged attention for decode and verification: a few queries per request against its paged KV cache.

Contract (the words below are used by the reference, the kernel and their tests):

* the step's queries arrive flattened, request after request: request ``b`` owns the rows
  ``query_start[b] : query_start[b + 1]`` of ``q`` (``query_len`` rows, 1 for plain decoding,
  ``k + 1`` when verifying ``k`` draft tokens, 0 for an empty padding request);
* its **context** is ``context_lens[b]`` positions long and already holds the new tokens' keys
  and values (the caller writes them into the pool first); ``context_slots[b, j]`` is the pool
  slot of position ``j``; entries at ``j >= context_lens[b]`` are never read;
* query ``i`` of request ``b`` sits at position ``context_lens[b] - query_len + i`` and attends
  causally: to every position up to and including its own;
* grouped-query attention: query head ``h`` reads key/value head ``h // (num_heads // num_kv_heads)``;
* rows of ``q`` past ``query_start[batch]`` belong to no request: their output rows are left
  unwritten (a captured CUDA graph pads the step with such rows).

Example (one request, two queries verifying one draft token, a 3-position context)::

    >>> import torch
    >>> from specserve.kernels import paged_decode_attention
    >>> k_cache = torch.eye(4)[:, None, :]  # [num_slots=4, num_kv_heads=1, head_dim=4]
    >>> v_cache = torch.arange(4.0)[:, None, None].expand(4, 1, 4).contiguous()  # slot s holds the value s
    >>> q = torch.zeros(2, 1, 4)  # [num_tokens=2, num_heads=1, head_dim=4]: uniform attention
    >>> out = paged_decode_attention(
    ...     q, k_cache, v_cache,
    ...     context_slots=torch.tensor([[3, 0, 2]]),  # positions 0, 1, 2 live in slots 3, 0, 2
    ...     query_start=torch.tensor([0, 2]), context_lens=torch.tensor([3]), scale=1.0, max_query=2)
    >>> out[:, 0, 0]  # query 0 (position 1) averages slots 3 and 0; query 1 (position 2) slots 3, 0 and 2
    tensor([1.5000, 1.6667])

Entry points: :func:`paged_decode_attention_reference` (pure PyTorch, one request at a time; the
specification and the test oracle), :func:`paged_decode_attention_triton` (one program per query
tile, request and key/value head, an online softmax over blocks of context; CUDA, or CPU under
``TRITON_INTERPRET=1``) and :func:`paged_decode_attention`, which picks Triton for CUDA tensors and
the reference otherwise. Neither writes the KV pool. Triton is optional, as for the rejection sampler.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional; the reference path needs only PyTorch.
    triton = None
    tl = None

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_reference",
    "paged_decode_attention_triton",
]

# Most rows (queries x heads of one key/value head) one program holds: 64 rows of a 128-wide fp32
# accumulator is 32 KiB, which 8 warps keep in registers.
_MAX_BLOCK_M = 64
# tl.dot needs at least 16 rows; a pure decode step of a 3:1 GQA model has only 3 useful ones.
_MIN_BLOCK_M = 16


def _check_inputs(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    context_slots: torch.Tensor,  # [batch, max_context] int64
    query_start: torch.Tensor,  # [batch + 1] int64
    context_lens: torch.Tensor,  # [batch] int64
    max_query: int,
) -> tuple[int, int, int]:
    """Check shapes, dtypes and devices (metadata only, no device sync); return (batch, num_heads, num_kv_heads)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {tuple(q.shape)}")
    _, num_heads, head_dim = q.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 3 or cache.shape[2] != head_dim:
            raise ValueError(
                f"{name} must be [num_slots, num_kv_heads, head_dim={head_dim}], got shape {tuple(cache.shape)}"
            )
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} is {cache.dtype} but q is {q.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ in shape")
    num_kv_heads = k_cache.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if context_slots.dim() != 2:
        raise ValueError(f"context_slots must be [batch, max_context], got shape {tuple(context_slots.shape)}")
    batch = context_slots.shape[0]
    if tuple(query_start.shape) != (batch + 1,):
        raise ValueError(f"query_start must have shape ({batch + 1},), got {tuple(query_start.shape)}")
    if tuple(context_lens.shape) != (batch,):
        raise ValueError(f"context_lens must have shape ({batch},), got {tuple(context_lens.shape)}")
    for name, tensor in (
        ("context_slots", context_slots),
        ("query_start", query_start),
        ("context_lens", context_lens),
    ):
        if tensor.dtype != torch.int64:
            raise ValueError(f"{name} must be int64, got {tensor.dtype}")
    for name, tensor in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("context_slots", context_slots),
        ("query_start", query_start),
        ("context_lens", context_lens),
    ):
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}")
    if max_query < 1:
        raise ValueError(f"max_query must be >= 1, got {max_query}")
    return batch, num_heads, num_kv_heads


def paged_decode_attention_reference(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    context_slots: torch.Tensor,  # [batch, max_context] int64
    query_start: torch.Tensor,  # [batch + 1] int64
    context_lens: torch.Tensor,  # [batch] int64
    scale: float,
    max_query: int,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q's dtype; rows past query_start[batch] unwritten
    """Causal attention of each request's queries over its paged context, in fp32, one request at a time."""
    batch, num_heads, num_kv_heads = _check_inputs(
        q, k_cache, v_cache, context_slots, query_start, context_lens, max_query
    )
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts, ctxs = query_start.tolist(), context_lens.tolist()
    for b in range(batch):
        begin, end, ctx = starts[b], starts[b + 1], ctxs[b]
        query_len = end - begin
        if query_len == 0:
            continue
        if not query_len <= min(ctx, max_query):
            raise ValueError(
                f"request {b} has {query_len} queries, a context of {ctx} and max_query {max_query}; "
                "need query_len <= context_len and query_len <= max_query"
            )
        slots = context_slots[b, :ctx]  # [ctx]
        keys = k_cache[slots].float().repeat_interleave(group, dim=1)  # [ctx, num_heads, head_dim]
        values = v_cache[slots].float().repeat_interleave(group, dim=1)  # [ctx, num_heads, head_dim]
        scores = torch.einsum("qhd,khd->hqk", q[begin:end].float(), keys) * scale  # [num_heads, query_len, ctx]
        q_pos = ctx - query_len + torch.arange(query_len, device=q.device)  # [query_len]
        causal = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]  # [query_len, ctx]
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        out[begin:end] = torch.einsum("hqk,khd->qhd", probs, values).to(q.dtype)
    return out


if triton is not None:

    @triton.jit
    def _paged_decode_attention_kernel(
        q_ptr,  # [num_tokens, num_heads, head_dim]
        k_cache_ptr,  # [num_slots, num_kv_heads, head_dim]
        v_cache_ptr,  # [num_slots, num_kv_heads, head_dim], same strides as k_cache
        context_slots_ptr,  # [batch, max_context] int64
        query_start_ptr,  # [batch + 1] int64
        context_lens_ptr,  # [batch] int64
        out_ptr,  # [num_tokens, num_heads, head_dim], q's dtype
        scale_log2,  # softmax scale times log2(e): the softmax runs on exp2
        stride_q_token,
        stride_q_head,
        stride_cache_slot,
        stride_cache_head,
        stride_slots_row,
        stride_out_token,
        stride_out_head,
        head_dim,
        GROUP: tl.constexpr,  # query heads per key/value head
        GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
        BLOCK_Q: tl.constexpr,  # queries per program
        BLOCK_M: tl.constexpr,  # rows per program: BLOCK_Q queries x GROUP_PAD heads
        BLOCK_N: tl.constexpr,  # context positions per loop trip
        BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 (no TF32 rounding), "tf32" otherwise (ignored for 16-bit)
        UPCAST_DOT: tl.constexpr,  # run the dots in fp32 on 16-bit values (the interpreter cannot multiply bf16)
        EXPLICIT_DOT: tl.constexpr,  # multiply and sum instead of tl.dot (the interpreter's dot rounds by row place)
    ):
        tile = tl.program_id(0)
        req = tl.program_id(1)
        kv_head = tl.program_id(2)
        q_begin = tl.load(query_start_ptr + req)
        query_len = tl.load(query_start_ptr + req + 1) - q_begin
        first_query = tile * BLOCK_Q
        if first_query < query_len:
            ctx = tl.load(context_lens_ptr + req)
            rows = tl.arange(0, BLOCK_M)
            query = first_query + rows // GROUP_PAD  # [BLOCK_M] index within the request
            head = kv_head * GROUP + rows % GROUP_PAD  # [BLOCK_M]
            row_ok = (query < query_len) & (rows % GROUP_PAD < GROUP)
            q_pos = ctx - query_len + query  # [BLOCK_M] absolute position of each row's query
            dims = tl.arange(0, BLOCK_D)
            dim_ok = dims < head_dim
            token = q_begin + query  # int64
            q = tl.load(
                q_ptr + token[:, None] * stride_q_token + head[:, None] * stride_q_head + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_D]
            if UPCAST_DOT:
                q = q.to(tl.float32)

            # Rows that are padding see every key (their q is 0), so no row is ever fully masked and
            # the running maximum is finite after the first block: position 0 is visible to all.
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            # the tile's last query sees the most context; nothing past it is loaded
            kv_end = (ctx - query_len + tl.minimum(query_len, first_query + BLOCK_Q)).to(tl.int32)
            slot_row = context_slots_ptr + req * stride_slots_row
            head_off = kv_head * stride_cache_head
            for start in range(0, kv_end, BLOCK_N):
                pos = start + tl.arange(0, BLOCK_N)  # [BLOCK_N]
                pos_ok = pos < kv_end
                slots = tl.load(slot_row + pos, mask=pos_ok, other=0)  # [BLOCK_N] int64
                k = tl.load(
                    k_cache_ptr + slots[None, :] * stride_cache_slot + head_off + dims[:, None],
                    mask=pos_ok[None, :] & dim_ok[:, None],
                    other=0.0,
                )  # [BLOCK_D, BLOCK_N]
                if UPCAST_DOT:
                    k = k.to(tl.float32)
                if EXPLICIT_DOT:
                    s = tl.sum(q.to(tl.float32)[:, :, None] * k.to(tl.float32)[None, :, :], axis=1) * scale_log2
                else:
                    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N] fp32
                visible = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                v = tl.load(
                    v_cache_ptr + slots[:, None] * stride_cache_slot + head_off + dims[None, :],
                    mask=pos_ok[:, None] & dim_ok[None, :],
                    other=0.0,
                )  # [BLOCK_N, BLOCK_D]
                p_in = p.to(v_cache_ptr.dtype.element_ty)  # P is rounded to the cache dtype, as flash attention does
                if UPCAST_DOT:
                    p_in = p_in.to(tl.float32)
                    v = v.to(tl.float32)
                if EXPLICIT_DOT:
                    pv = tl.sum(p_in.to(tl.float32)[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
                else:
                    pv = tl.dot(p_in, v, input_precision=DOT_PRECISION)
                acc = acc * alpha[:, None] + pv
                m_i = m_new
            out = acc / l_i[:, None]
            tl.store(
                out_ptr + token[:, None] * stride_out_token + head[:, None] * stride_out_head + dims[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & dim_ok[None, :],
            )

    # The interpreter runs the kernel on host memory; compiled Triton needs CUDA tensors.
    _KERNEL_INTERPRETED = not isinstance(_paged_decode_attention_kernel, triton.runtime.JITFunction)


def kernel_config(
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    max_query: int,
    block_n: int | None = None,
    fixed_tile: bool = False,
) -> dict:
    """The kernel's compile-time parameters and warp count for one launch (the AOT compile test builds these).

    ``block_n`` defaults to 32 context positions per loop trip, 16 in fp32: with 8 warps ptxas then
    keeps the sm_90 tiles up to head_dim 128 in registers. ``fixed_tile`` (batch-invariant mode): the
    largest query tile whatever ``max_query``, so a row is computed by the same tile shape in a decode
    step, a verification pass and a prefill (see batch_invariant.py); under the interpreter the
    dots are then explicit products and sums, whose rounding does not depend on a row's place in the tile.
    """
    if block_n is None:
        block_n = 16 if dtype == torch.float32 else 32
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    queries = max(1, min(triton.next_power_of_2(max_query), _MAX_BLOCK_M // group_pad))
    if fixed_tile:
        queries = max(1, _MAX_BLOCK_M // group_pad)
    block_m = max(_MIN_BLOCK_M, group_pad * queries)
    return dict(
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_m // group_pad,  # more than asked for when tl.dot's 16-row minimum pads the tile
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        # triton 3's interpreter multiplies bf16 bit patterns as integers; products of 16-bit values
        # are exact in fp32, so upcasting changes only the summation order
        UPCAST_DOT=_KERNEL_INTERPRETED and dtype.itemsize == 2,
        EXPLICIT_DOT=_KERNEL_INTERPRETED and fixed_tile,
        num_warps=8,
    )


def paged_decode_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    context_slots: torch.Tensor,  # [batch, max_context] int64
    query_start: torch.Tensor,  # [batch + 1] int64
    context_lens: torch.Tensor,  # [batch] int64
    scale: float,
    max_query: int,
    *,
    block_n: int | None = None,
    fixed_tile: bool = False,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], q's dtype; rows past query_start[batch] unwritten
    """Triton paged attention, same contract as :func:`paged_decode_attention_reference`.

    Grid: (query tiles, batch, num_kv_heads). A program holds a tile of one request's queries times
    the query heads that share one key/value head (so each key block is loaded once per group), and
    walks the context in blocks of ``block_n`` positions with an online softmax (see
    :func:`kernel_config`). Query and context lengths are read on the device, so a captured CUDA
    graph replays it for any lengths up to ``max_query`` and ``context_slots.shape[1]``; they are
    not validated (that would need a sync).
    """
    if triton is None:
        raise RuntimeError("paged_decode_attention_triton needs triton, which is not installed")
    batch, num_heads, num_kv_heads = _check_inputs(
        q, k_cache, v_cache, context_slots, query_start, context_lens, max_query
    )
    if not q.is_cuda and not _KERNEL_INTERPRETED:
        raise ValueError(
            f"paged_decode_attention_triton got tensors on {q.device}; it needs CUDA tensors "
            "or TRITON_INTERPRET=1 set before triton is imported"
        )
    # The kernel steps along head_dim and context positions with unit stride.
    for name, tensor in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if tensor.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim, got strides {tensor.stride()}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache strides {k_cache.stride()} differ from v_cache strides {v_cache.stride()}")
    if context_slots.stride(1) != 1 or not query_start.is_contiguous() or not context_lens.is_contiguous():
        raise ValueError("context_slots rows, query_start and context_lens must be contiguous")
    config = kernel_config(q.dtype, num_heads, num_kv_heads, q.shape[2], max_query, block_n, fixed_tile)
    out = torch.empty_like(q)
    if batch == 0 or q.shape[0] == 0:
        return out
    grid = (triton.cdiv(max_query, config["BLOCK_Q"]), batch, num_kv_heads)
    _paged_decode_attention_kernel[grid](
        q,
        k_cache,
        v_cache,
        context_slots,
        query_start,
        context_lens,
        out,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        context_slots.stride(0),
        out.stride(0),
        out.stride(1),
        q.shape[2],
        **config,
    )
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    context_slots: torch.Tensor,  # [batch, max_context] int64
    query_start: torch.Tensor,  # [batch + 1] int64
    context_lens: torch.Tensor,  # [batch] int64
    scale: float,
    max_query: int,
    fixed_tile: bool = False,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Paged decode/verification attention with Triton for CUDA tensors, the PyTorch reference otherwise.

    ``fixed_tile`` (batch-invariant mode) always takes Triton with one query tile shape (CUDA, or the
    CPU under ``TRITON_INTERPRET=1``)."""
    args = (q, k_cache, v_cache, context_slots, query_start, context_lens, scale, max_query)
    if fixed_tile:
        return paged_decode_attention_triton(*args, fixed_tile=True)
    if q.is_cuda and triton is not None:
        return paged_decode_attention_triton(*args)
    return paged_decode_attention_reference(*args)
