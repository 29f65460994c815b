"""Attention over the paged KV cache: the per-step metadata and the torch path.

A step's tokens arrive flattened, request after request (`num_tokens` rows). For each request we
know how many new tokens it brings (`query_len`) and how long its context is once they are
written (`context_len`). The metadata built once per step serves every layer:

* `slot_mapping` says where each new token's key and value go in the pool;
* `context_slots` lists, per request, the slot of every context position (padded), so the
  keys and values can be gathered into a dense `[batch, context, ...]` tensor (for a single request
  whose slots run in order, `context_start`: they are read as a view of the pool, no copy);
* `mask` is the causal mask of the padded `[batch, query, context]` problem.

On CUDA, a batch whose queries are all short (decode, verification of k draft tokens, small
prefill chunks) skips the dense gather and the mask: `specserve.kernels.paged_decode_attention` reads the
pool through `context_slots` directly, given where each request's queries start (`query_start`)
and how long its context is (`context_lens`). The CPU, and long prefills anywhere, take the torch
path above, except for fp32 models on the CPU: `specserve.kernels.cpu_attention` reads the pool through
`context_slots` per query row (`row_request`, `row_length`), any query length, no gather and no mask, each row's
bits independent of the batch around it.

This module knows nothing about blocks, requests or schedulers: the model runner turns block
tables into slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from specserve.kernels import cpu_attention, paged_decode_attention

# Longest query of a batch that still goes through the decode kernel on CUDA: verification passes
# are at most 33 tokens (k <= 32); beyond this a prefill chunk is better served by the dense path.
MAX_DECODE_KERNEL_QUERY = 64


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64, pool slot of each new token
    context_slots: torch.Tensor  # [batch, max_context] int64, pool slot of each context position (0-padded)
    mask: torch.Tensor | None  # [batch, 1, max_query, max_context] bool, True = attend; None for pure decode
    token_index: torch.Tensor | None  # [num_tokens] int64, row of each token in [batch * max_query]; None if unpadded
    batch: int
    max_query: int
    query_start: torch.Tensor | None = None  # [batch + 1] int64, first token row of each request; decode kernel only
    context_lens: torch.Tensor | None = None  # [batch] int64; decode kernel only
    batch_invariant: bool = False  # every call through the decode kernel with one fixed tile (any query length)
    context_start: int | None = None  # batch 1 whose context is the pool's slots from this one on, in order; else None
    grouped_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # by group: `grouped_mask`
    row_request: torch.Tensor | None = None  # [num_tokens] int64, each row's request; CPU only (cpu_attention)
    row_length: torch.Tensor | None = None  # [num_tokens] int64, context positions each row sees; CPU only
    rows_only: bool = False  # built for the C kernel alone (no mask): the torch path refuses it

    @property
    def uses_decode_kernel(self) -> bool:
        return self.query_start is not None

    def grouped_mask(self, group: int) -> torch.Tensor | None:
        """The fp32 path's mask: each query row repeated for the `group` query heads that share a KV head, as the
        additive fp32 mask (0 or -inf) SDPA would make of the boolean one ([batch, 1, group * max_query,
        max_context]; the same bits, 15% faster on the CPU), made once per step rather than once per layer."""
        if self.mask is None:
            return None
        if group not in self.grouped_masks:
            allowed = self.mask.repeat(1, 1, group, 1)
            additive = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
            self.grouped_masks[group] = additive.masked_fill_(~allowed, float("-inf"))
        return self.grouped_masks[group]

    @staticmethod
    def build(
        query_lens: list[int],
        context_lens: list[int],
        slot_mapping: torch.Tensor,  # [num_tokens]
        context_slots: torch.Tensor,  # [batch, max_context]
        batch_invariant: bool = False,
        rows_only: bool = False,
    ) -> AttentionMetadata:
        """batch_invariant: the decode kernel for every batch, prefills included, on any device (the CPU
        needs TRITON_INTERPRET=1), so no row's numerics depend on the path its batch took. rows_only: the CPU C
        kernel will serve every layer (an fp32 model on the CPU, the kernels built): only what it reads is made
        (no mask: ten torch calls fewer a step, for the verifier and for every draft step)."""
        batch = len(query_lens)
        max_query = max(query_lens)

        def unmasked(**fields) -> AttentionMetadata:  # a kernel that reads the slots itself: no mask, no padding
            return AttentionMetadata(
                slot_mapping=slot_mapping, context_slots=context_slots, mask=None, token_index=None, batch=batch,
                max_query=max_query, **fields,
            )  # fmt: skip

        if rows_only:
            row_request, row_length = cpu_attention.row_layout(query_lens, context_lens)
            return unmasked(row_request=row_request, row_length=row_length, rows_only=True)
        max_context = context_slots.shape[1]
        device = context_slots.device
        uniform = all(q == max_query for q in query_lens)
        ctx = torch.tensor(context_lens, dtype=torch.int64, device=device)  # [batch]
        if batch_invariant or (device.type == "cuda" and max_query <= MAX_DECODE_KERNEL_QUERY):
            starts = [0]
            for q in query_lens:
                starts.append(starts[-1] + q)
            return unmasked(
                query_start=torch.tensor(starts, dtype=torch.int64, device=device),
                context_lens=ctx,
                batch_invariant=batch_invariant,
            )
        qlen = torch.tensor(query_lens, dtype=torch.int64, device=device)  # [batch]
        kv_pos = torch.arange(max_context, device=device)  # [max_context]
        q_idx = torch.arange(max_query, device=device)  # [max_query]
        # absolute position of query i of request b: context_len - query_len + i
        q_pos = (ctx - qlen)[:, None] + q_idx[None, :]  # [batch, max_query]
        mask = (kv_pos[None, None, :] <= q_pos[:, :, None]) & (kv_pos[None, None, :] < ctx[:, None, None])
        token_index = None
        if not uniform:
            # padding query rows attend to position 0 only, so softmax never sees an empty row
            pad = q_idx[None, :] >= qlen[:, None]  # [batch, max_query]
            mask[:, :, 0] |= pad
            token_index = torch.cat([b * max_query + torch.arange(q, device=device) for b, q in enumerate(query_lens)])
        context_start = None
        if batch == 1 and device.type == "cpu":  # (on CUDA, reading a slot back would wait for the stream)
            # one request whose blocks follow each other (a fresh pool hands them out so): the torch path reads
            # its keys and values as a view of the pool instead of copying them out, layer after layer
            first = int(context_slots[0, 0])
            if torch.equal(context_slots[0], torch.arange(first, first + max_context, device=device)):
                context_start = first
        if max_query == 1 and uniform:
            # pure decode: every query sees its whole context; masking only hides the padding,
            # and when every context is as long as the longest there is none (no mask, a faster kernel)
            mask = None if min(context_lens) == max_context else (kv_pos[None, None, :] < ctx[:, None, None])
        row_request = row_length = None
        if device.type == "cpu":  # what the C kernel reads instead of the mask (fp32 models)
            row_request, row_length = cpu_attention.row_layout(query_lens, context_lens)
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            context_slots=context_slots,
            mask=None if mask is None else mask[:, None],
            token_index=token_index,
            batch=batch,
            max_query=max_query,
            context_start=context_start,
            row_request=row_request,
            row_length=row_length,
        )


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads * head_dim]
    """Write the new keys/values into the pool, then attend over each request's context."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    num_tokens, num_heads, head_dim = q.shape
    if meta.uses_decode_kernel:
        out = paged_decode_attention(
            q, k_cache, v_cache, meta.context_slots, meta.query_start, meta.context_lens, scale, meta.max_query,
            fixed_tile=meta.batch_invariant,
        )  # [num_tokens, num_heads, head_dim]
        return out.view(num_tokens, num_heads * head_dim)
    if meta.row_length is not None and cpu_attention.applies(q, k_cache):  # fp32 on the CPU: no gather, no mask
        return cpu_attention.paged_attention(
            q, k_cache, v_cache, meta.context_slots, meta.row_request, meta.row_length, scale
        )
    if meta.rows_only:
        raise RuntimeError("attention metadata built for the CPU C kernel only (rows_only) reached the torch path")
    if meta.context_start is not None:  # batch 1, its context one run of slots: a view, no copy
        context = slice(meta.context_start, meta.context_start + meta.context_slots.shape[1])
        keys, values = k_cache[context][None], v_cache[context][None]  # [1, max_context, num_kv_heads, head_dim]
    else:  # index_select copies rows at memcpy speed; advanced indexing took twice as long
        slots = meta.context_slots.reshape(-1)  # [batch * max_context]
        shape = (meta.batch, meta.context_slots.shape[1], *k_cache.shape[1:])
        keys = k_cache.index_select(0, slots).view(shape)  # [batch, max_context, num_kv_heads, head_dim]
        values = v_cache.index_select(0, slots).view(shape)  # [batch, max_context, num_kv_heads, head_dim]
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [batch, num_kv_heads, max_context, head_dim]
    if meta.token_index is None:
        queries = q.view(meta.batch, meta.max_query, num_heads, head_dim)
    else:
        queries = q.new_zeros(meta.batch * meta.max_query, num_heads, head_dim)
        queries.index_copy_(0, meta.token_index, q)
        queries = queries.view(meta.batch, meta.max_query, num_heads, head_dim)
    kv_heads = keys.shape[1]
    group = num_heads // kv_heads
    if q.dtype != torch.float32 or group == 1:
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2), keys, values, attn_mask=meta.mask, scale=scale, enable_gqa=True
        )  # [batch, num_heads, max_query, head_dim]
        out = out.transpose(1, 2).reshape(meta.batch * meta.max_query, num_heads * head_dim)
    else:
        # fp32 grouped-query attention as plain attention: the query heads sharing a KV head become rows of one
        # query block per KV head ([group, query] order), so the CPU kernel tiles group * max_query rows at a time
        # (SmolLM2, 3 heads a group: 20% faster than enable_gqa over 8 queries, 35% over 4). Not in bf16: its
        # rounding then differs from HF's enough to flip a greedy near-tie on SmolLM2 (tests/test_smollm2.py).
        queries = queries.view(meta.batch, meta.max_query, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
        queries = queries.reshape(meta.batch, kv_heads, group * meta.max_query, head_dim)
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.grouped_mask(group), scale=scale
        )  # [batch, num_kv_heads, group * max_query, head_dim]
        out = out.view(meta.batch, kv_heads, group, meta.max_query, head_dim).permute(0, 3, 1, 2, 4)
        out = out.reshape(meta.batch * meta.max_query, num_heads * head_dim)
    if meta.token_index is not None:
        out = out.index_select(0, meta.token_index)
    return out
