"""Batch-invariant mode: a model whose every row is computed the same way however the engine batches it.

`enable_batch_invariant(model)` swaps, in place, the modules whose reductions a library would pick
by problem shape for ones built on `specserve.kernels.batch_invariant` (fixed-tile matmul, one-program-per-row
RMSNorm); the model marks itself (`model.batch_invariant`) so the model runner sends every attention
call, prefill included, through the paged Triton kernel with one fixed query tile (see
`specserve.model.attention.AttentionMetadata.build`). Everything else a forward does is elementwise
(embedding, rotary, SiLU, residual adds) or already per row (softmax over the vocabulary), so it was
invariant to begin with.

What it buys: a token's logits are the same bits in a 1-row decode step, a (k + 1)-row verification
pass and a step shared with any other requests, so greedy speculative output is the verifier's plain
greedy output in bf16 too, and a request's output does not depend on its neighbours. What it costs:
tensor-core tiles sized for the worst case (a decode step computes a 64-row tile), no cuBLAS; on the
CPU it runs only under Triton's interpreter (tests), which is far too slow to serve.

The swap keeps parameters and state_dict keys (the new classes subclass the old), so a hot-swapped or
reloaded draft can be armed the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from specserve.kernels.batch_invariant import batch_invariant_linear, batch_invariant_rms_norm
from specserve.model.eagle import EagleHead
from specserve.model.llama import LlamaModel, RMSNorm
from specserve.model.upcast import Linear


class BatchInvariantLinear(Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_invariant_linear(x, self.weight, self.bias)


class BatchInvariantRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_invariant_rms_norm(x, self.weight, self.eps)


class BatchInvariantLlamaModel(LlamaModel):
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return batch_invariant_linear(self.norm(hidden), self.output_weight).float()


class BatchInvariantEagleHead(EagleHead):
    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return batch_invariant_linear(self.verifier.norm(hidden), self.head_weight()).float()


_SWAPS: tuple[tuple[type, type], ...] = (
    (BatchInvariantLinear, Linear),
    (BatchInvariantRMSNorm, RMSNorm),
    (BatchInvariantLlamaModel, LlamaModel),
    (BatchInvariantEagleHead, EagleHead),
)


def enable_batch_invariant(model: nn.Module) -> None:
    """Arm `model` (a LlamaModel or an EAGLE head) and its submodules in place; idempotent."""
    if getattr(model, "logits_upcast", None) is not None:
        raise ValueError("batch-invariant mode replaces upcast matmuls: arm one or the other")
    for module in model.modules():
        for new, old in _SWAPS:
            if type(module) is old:
                module.__class__ = new
                break
    model.batch_invariant = True


def is_batch_invariant(model: nn.Module) -> bool:
    return bool(getattr(model, "batch_invariant", False))
