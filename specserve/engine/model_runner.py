"""ModelRunner: runs one model over a batch of token runs, on that model's own paged KV pool.

A run is a request's new tokens, where they start, the request's block table and how many of
its last rows need logits. The runner turns these into flat tensors (ids, positions, slots) and
attention metadata, calls the model and returns fp32 logits. Knows nothing about request queues,
sampling or speculation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.model.attention import AttentionMetadata
from specserve.model.llama import LlamaModel


@dataclass
class TokenRun:
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    num_logits: int
    """Rows at the end of the run whose logits are returned (0: none, e.g. a mid-prompt chunk)."""


def kv_bytes_per_block(model: LlamaModel, block_size: int, dtype: torch.dtype) -> int:
    a = model.arch
    return a.num_layers * 2 * block_size * a.num_kv_heads * a.head_dim * torch.finfo(dtype).bits // 8


class ModelRunner:
    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        a = model.arch
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.kv_cache = torch.zeros(
            a.num_layers, 2, num_blocks * block_size, a.num_kv_heads, a.head_dim, dtype=self.dtype, device=self.device
        )  # [layers, k/v, slots, kv_heads, head_dim]
        self.last_hidden: torch.Tensor | None = None  # [rows with logits, hidden] of the latest forward

    @property
    def vocab_size(self) -> int:
        return self.model.arch.vocab_size

    @torch.inference_mode()
    def forward(self, runs: list[TokenRun]) -> torch.Tensor:  # [sum(num_logits), vocab] fp32
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        query_lens, context_lens = [], []
        for run in runs:
            n = len(run.token_ids)
            ids.extend(run.token_ids)
            positions.extend(range(run.start_position, run.start_position + n))
            logit_rows.extend(range(len(ids) - run.num_logits, len(ids)))
            query_lens.append(n)
            context_lens.append(run.start_position + n)
        dev = self.device
        pos = torch.tensor(positions, dtype=torch.int64)  # [num_tokens]
        max_blocks = max(len(r.block_ids) for r in runs)
        table = torch.tensor([r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in runs])  # [batch, blocks]
        run_of_token = torch.repeat_interleave(torch.arange(len(runs)), torch.tensor(query_lens))  # [num_tokens]
        slot_mapping = table[run_of_token, pos // bs] * bs + pos % bs  # [num_tokens]
        ctx_pos = torch.arange(max(context_lens))  # [max_context]
        context_slots = table[:, ctx_pos // bs] * bs + ctx_pos % bs  # [batch, max_context]
        meta = AttentionMetadata.build(query_lens, context_lens, slot_mapping.to(dev), context_slots.to(dev))
        hidden = self.model(torch.tensor(ids, device=dev), pos.to(dev), self.kv_cache, meta)
        hidden = hidden[torch.tensor(logit_rows, dtype=torch.int64, device=dev)]
        self.last_hidden = hidden
        return self.model.compute_logits(hidden)
