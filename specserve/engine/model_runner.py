"""ModelRunner: runs one model over a batch of token runs, on that model's own paged KV pool.

A run is a request's new tokens, where they start, the request's block table and how many of
its last rows need logits. The runner turns these into flat tensors (ids, positions, slots) and
attention metadata, calls the model and returns fp32 logits (`forward`), or the logits with the
hidden rows behind them (`run`: an EAGLE head reads those). On CUDA, small decode/verification
batches can replay captured CUDA graphs instead (`capture_cuda_graphs`, called once at engine
start). Knows nothing about request queues, sampling or speculation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specserve.engine.cuda_graphs import CudaGraphs, GraphShapes
from specserve.kernels import cpu_attention, hugepages
from specserve.model.attention import AttentionMetadata
from specserve.model.llama import LlamaModel


@dataclass
class TokenRun:
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    num_logits: int
    """Rows at the end of the run whose logits are returned (0: none, e.g. a mid-prompt chunk)."""


@dataclass(frozen=True)
class ForwardOutput:
    """One forward's results; the runner keeps none of them."""

    logits: torch.Tensor | None
    """[sum(num_logits), vocab] fp32; None when the caller computes its own from `hidden` (logits=False)."""
    hidden: torch.Tensor
    """[sum(num_logits), hidden]: the last layer's output at the rows with logits (an EAGLE head's next input)."""
    features: torch.Tensor | None = None
    """[num_tokens, width]: every row's, when asked for (keep_features): the last layer's output, after the inputs
    of the model's `feature_layers` where it has some (width = (len(feature_layers) + 1) * hidden)."""


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
        num_slots = num_blocks * block_size + 1  # the last slot is scratch: a CUDA graph's padding rows write there
        shape = (a.num_layers, 2, num_slots, a.num_kv_heads, a.head_dim)  # [layers, k/v, slots, kv_heads, head_dim]
        if self.device.type == "cpu":  # on 2 MB pages where the OS grants them: attention streams it every step
            self.kv_cache = hugepages.zeros(shape, self.dtype)
        else:
            self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cuda_graphs: CudaGraphs | None = None
        # every layer's attention will be the CPU C kernel's (fp32 on the CPU, built): metadata without a mask
        self.c_attention = self.device.type == "cpu" and self.dtype == torch.float32 and cpu_attention.available()

    @property
    def vocab_size(self) -> int:
        return self.model.arch.vocab_size

    def capture_cuda_graphs(self, shapes: GraphShapes) -> None:
        """Capture the model's forward for these decode/verification shapes (CUDA, a plain LlamaModel)."""
        if not isinstance(self.model, LlamaModel):
            raise ValueError(f"CUDA graphs capture a LlamaModel's forward, not a {type(self.model).__name__}'s")
        graphs = CudaGraphs(self.model, self.kv_cache, self.block_size, shapes)
        graphs.capture()
        self.cuda_graphs = graphs

    def forward(
        self,
        runs: list[TokenRun],
        features: torch.Tensor | None = None,  # [num_tokens, hidden]: an EAGLE head's input features
    ) -> torch.Tensor:  # [sum(num_logits), vocab] fp32
        """The logits of every run's last num_logits rows."""
        return self.run(runs, features).logits

    @torch.inference_mode()
    def run(
        self,
        runs: list[TokenRun],
        features: torch.Tensor | None = None,  # [num_tokens, hidden]: an EAGLE head's input features
        keep_features: bool = False,
        logits: bool = True,
    ) -> ForwardOutput:
        """keep_features: return every row's features too (an EAGLE head reads the verifier's). logits=False:
        skip the output layer (a caller that applies its own: a trimmed EAGLE head's draft vocabulary)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        query_lens, context_lens = [], []
        slots: list[int] = []  # each new token's pool slot
        for run in runs:
            n = len(run.token_ids)
            ids.extend(run.token_ids)
            positions.extend(range(run.start_position, run.start_position + n))
            # in Python: a step's few tokens cost less so than through tensor indexing (torch.repeat_interleave
            # alone took ~70 us, 8% of an EAGLE head's step)
            blocks = run.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(run.start_position, run.start_position + n))
            logit_rows.extend(range(len(ids) - run.num_logits, len(ids)))
            query_lens.append(n)
            context_lens.append(run.start_position + n)
        dev = self.device
        pos = torch.tensor(positions, dtype=torch.int64)  # [num_tokens]
        max_blocks = max(len(r.block_ids) for r in runs)
        table = torch.tensor([r.block_ids + [0] * (max_blocks - len(r.block_ids)) for r in runs])  # [batch, blocks]
        slot_mapping = torch.tensor(slots, dtype=torch.int64)  # [num_tokens]
        taps = [] if keep_features and getattr(self.model, "feature_layers", ()) else None
        key = None
        if self.cuda_graphs is not None and features is None and taps is None:
            key = self.cuda_graphs.bucket(len(runs), max(query_lens), max(context_lens), max_blocks)
        if key is not None:
            hidden = self.cuda_graphs.run(key, ids, pos, slot_mapping, query_lens, context_lens, table)
            if keep_features:  # the graph's output buffer is rewritten by its next replay
                hidden = hidden.clone()
        else:
            ctx_pos = torch.arange(max(context_lens))  # [max_context]
            context_slots = table[:, ctx_pos // bs] * bs + ctx_pos % bs  # [batch, max_context]
            batch_invariant = getattr(self.model, "batch_invariant", False)
            meta = AttentionMetadata.build(
                query_lens, context_lens, slot_mapping.to(dev), context_slots.to(dev),
                batch_invariant=batch_invariant, rows_only=self.c_attention and not batch_invariant,
            )  # fmt: skip
            args = () if features is None else (features.to(dev),)
            extra = {} if taps is None else {"taps": taps}
            hidden = self.model(torch.tensor(ids, device=dev), pos.to(dev), self.kv_cache, meta, *args, **extra)
        every_row = hidden if keep_features else None  # [num_tokens, width]
        if taps:
            every_row = torch.cat([taps[0], hidden], dim=1)
        hidden = hidden[torch.tensor(logit_rows, dtype=torch.int64, device=dev)]  # [sum(num_logits), hidden]
        scores = self.model.compute_logits(hidden) if logits else None
        if dev.type == "cuda":  # callers time this call (adaptive k fits those times): wait for the kernels
            torch.cuda.synchronize(dev)
        return ForwardOutput(scores, hidden, every_row)
