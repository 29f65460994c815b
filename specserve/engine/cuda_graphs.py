"""CudaGraphs: one model's small decode/verification forward passes, captured once and replayed.

A CUDA graph replays fixed kernels on fixed memory, so a captured pass has static input buffers
and static shapes: (batch B, query length Q) means B request rows and B * Q token rows, and the
context is read through a block table of a fixed width (`max_context` rounded up to whole blocks).
A step with b <= B requests of at most Q new tokens each (t tokens in all) fits by padding:

* requests b..B-1 are empty (no queries, context 0), which the decode kernel skips;
* token rows t..B*Q-1 belong to no request: id and position 0, their keys and values go to the
  pool's scratch slot (its last one, which no block owns), their hidden rows are never read;
* `context_slots` is computed inside the graph from the block table, and the decode kernel reads
  each request's true length from `context_lens`, so no dense gather depends on the lengths.

Every operation of the model works row by row except attention, which reads only a request's own
context, so padding never changes a real row. Only the decode-kernel attention path has static
shapes, so the torch path (CPU, long prefills) never runs here. The static pass can also run
without capture (`run` before `capture`), which is how the CPU tests check the padding.

Knows nothing about requests or speculation: the model runner hands it flat token lists.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.config import EngineConfig
from specserve.model.attention import MAX_DECODE_KERNEL_QUERY, AttentionMetadata
from specserve.model.llama import LlamaModel

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
"""Batch sizes captured (up to the scheduler's max_num_seqs); larger batches run eagerly."""


@dataclass(frozen=True)
class GraphShapes:
    batch_sizes: tuple[int, ...]
    """Request counts to capture, ascending; a batch runs in the smallest one that holds it."""
    query_lens: tuple[int, ...]
    """New tokens per request to capture, ascending (1: plain decoding; k + 1: verifying k drafts)."""
    max_context: int
    """Longest context, in tokens, that a captured pass can attend to."""

    def __post_init__(self) -> None:
        for name, values in (("batch_sizes", self.batch_sizes), ("query_lens", self.query_lens)):
            if not values or list(values) != sorted(set(values)) or values[0] < 1:
                raise ValueError(f"{name} must be distinct positive integers, ascending; got {values}")
        if self.query_lens[-1] > MAX_DECODE_KERNEL_QUERY:
            raise ValueError(
                f"query_lens go up to {self.query_lens[-1]}; the decode kernel path takes at most "
                f"{MAX_DECODE_KERNEL_QUERY} queries per request"
            )
        if self.max_context < 1:
            raise ValueError(f"max_context must be >= 1, got {self.max_context}")


def graph_shapes(config: EngineConfig, max_model_len: int) -> GraphShapes | None:
    """What an engine captures: None unless it runs on CUDA with `cuda_graphs` on.

    Query lengths 1..k_max + 1 cover plain decoding and every verification (and the draft's
    one-token steps and short catch-ups); k_max is the fixed k or the adaptive k's bound.
    """
    if not config.cuda_graphs or torch.device(config.device).type != "cuda":
        return None
    spec = config.speculative
    max_k = 0
    if spec.resolved_method is not None:
        max_k = spec.max_speculative_tokens if spec.num_speculative_tokens is None else spec.num_speculative_tokens
    max_batch = min(config.scheduler.max_num_seqs, GRAPH_BATCH_SIZES[-1])
    batch_sizes = sorted({b for b in GRAPH_BATCH_SIZES if b < max_batch} | {max_batch})
    # a verification pass near the end of the context reaches k positions past max_model_len
    return GraphShapes(tuple(batch_sizes), tuple(range(1, max_k + 2)), max_model_len + max_k)


class CudaGraphs:
    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,  # [layers, 2, num_slots, kv_heads, head_dim]; the last slot is scratch
        block_size: int,
        shapes: GraphShapes,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.shapes = shapes
        self.scratch_slot = kv_cache.shape[2] - 1
        self.max_blocks = -(-shapes.max_context // block_size)
        device = kv_cache.device
        max_batch, max_tokens = shapes.batch_sizes[-1], shapes.batch_sizes[-1] * shapes.query_lens[-1]
        # Every input in one int64 buffer, block table last: one host-to-device copy per step, of the
        # prefix the step's shape uses. Offsets: ids, positions, slot mapping, query starts, context lens.
        sizes = [max_tokens, max_tokens, max_tokens, max_batch + 1, max_batch, max_batch * self.max_blocks]
        self._offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._host = torch.zeros(self._offsets[-1], dtype=torch.int64, pin_memory=device.type == "cuda")
        self._device = torch.zeros(self._offsets[-1], dtype=torch.int64, device=device)
        o = self._offsets
        self._host[o[2] : o[3]] = self.scratch_slot  # until a step says otherwise, every row is padding
        self._device.copy_(self._host)
        ctx_pos = torch.arange(self.max_blocks * block_size, device=device)  # [max_context, rounded up]
        self._ctx_block, self._ctx_offset = ctx_pos // block_size, ctx_pos % block_size
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._outputs: dict[tuple[int, int], torch.Tensor] = {}  # [B * Q, hidden] each graph's output
        self.num_replays = 0  # steps served by a captured graph (what the GPU tests check)

    def _views(self, buffer: torch.Tensor, batch: int, num_tokens: int) -> tuple[torch.Tensor, ...]:
        """(ids, positions, slot_mapping [num_tokens], query_start [batch + 1], context_lens [batch],
        block_table [batch, max_blocks]) inside `buffer`."""
        o = self._offsets
        return (
            buffer[o[0] : o[0] + num_tokens],
            buffer[o[1] : o[1] + num_tokens],
            buffer[o[2] : o[2] + num_tokens],
            buffer[o[3] : o[3] + batch + 1],
            buffer[o[4] : o[4] + batch],
            buffer[o[5] : o[5] + batch * self.max_blocks].view(batch, self.max_blocks),
        )

    def bucket(self, batch: int, max_query: int, max_context: int, max_blocks: int) -> tuple[int, int] | None:
        """The smallest captured (B, Q) that holds a step, or None if it must run eagerly."""
        if max_context > self.shapes.max_context or max_blocks > self.max_blocks:
            return None
        b = next((b for b in self.shapes.batch_sizes if b >= batch), None)
        q = next((q for q in self.shapes.query_lens if q >= max_query), None)
        return None if b is None or q is None else (b, q)

    def _forward(self, batch: int, query_len: int) -> torch.Tensor:  # [batch * query_len, hidden]
        """The static pass: reads only the device buffer, so it can be captured."""
        ids, positions, slot_mapping, query_start, context_lens, table = self._views(
            self._device, batch, batch * query_len
        )
        context_slots = table[:, self._ctx_block] * self.block_size + self._ctx_offset  # [batch, max_context]
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            context_slots=context_slots,
            mask=None,
            token_index=None,
            batch=batch,
            max_query=query_len,
            query_start=query_start,
            context_lens=context_lens,
            batch_invariant=getattr(self.model, "batch_invariant", False),
        )
        return self.model(ids, positions, self.kv_cache, meta)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every shape (CUDA only; the engine calls this once, at start, before any request).

        Largest first, into one memory pool, so that smaller graphs reuse the larger ones' memory:
        only one graph runs at a time, and its output is read before the next replay.
        """
        if self.kv_cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the KV cache is on {self.kv_cache.device}")
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.shapes.batch_sizes):
            for q in reversed(self.shapes.query_lens):
                # A warm-up pass on a side stream compiles the Triton kernels and lets cuBLAS pick its
                # algorithms outside the capture. Every row is padding: only the scratch slot is written.
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self._forward(b, q)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._outputs[(b, q)] = self._forward(b, q)
                self._graphs[(b, q)] = graph
        torch.cuda.synchronize()

    @property
    def captured(self) -> int:
        return len(self._graphs)

    def run(
        self,
        key: tuple[int, int],  # (B, Q) from `bucket`
        ids: list[int],  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens] int64
        slot_mapping: torch.Tensor,  # [num_tokens] int64
        query_lens: list[int],  # [batch]
        context_lens: list[int],  # [batch]
        block_table: torch.Tensor,  # [batch, blocks] int64, blocks <= max_blocks
    ) -> torch.Tensor:  # [num_tokens, hidden]; a captured graph's output is valid until the next run
        batch, query_len = key
        num_tokens, t, b = batch * query_len, len(ids), len(query_lens)
        ids_h, pos_h, slots_h, starts_h, ctx_h, table_h = self._views(self._host, batch, num_tokens)
        ids_h[:t] = torch.tensor(ids, dtype=torch.int64)
        ids_h[t:] = 0
        pos_h[:t] = positions
        pos_h[t:] = 0
        slots_h[:t] = slot_mapping
        slots_h[t:] = self.scratch_slot
        starts_h[0] = 0
        starts_h[1 : b + 1] = torch.tensor(query_lens, dtype=torch.int64).cumsum(0)
        starts_h[b + 1 :] = t
        ctx_h[:b] = torch.tensor(context_lens, dtype=torch.int64)
        ctx_h[b:] = 0
        # block ids past a request's context are never dereferenced, so stale ones may stay
        table_h[:b, : block_table.shape[1]] = block_table
        end = self._offsets[5] + batch * self.max_blocks
        # a blocking copy: the host buffer is rewritten by the next step, so it must have landed
        self._device[:end].copy_(self._host[:end])
        graph = self._graphs.get(key)
        if graph is None:
            return self._forward(batch, query_len)[:t]
        graph.replay()
        self.num_replays += 1
        return self._outputs[key][:t]
