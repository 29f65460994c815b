"""OptimizerConfig: the AdamW settings every draft trainer shares (standalone, EAGLE, online), and the optimizer,
warmup length and gradient clipping built from them.

Each trainer's config keeps its own flat fields (the command line and the recorded configs are built from them)
and hands out an OptimizerConfig. The learning-rate schedules stay with their trainers: the standalone run uses
transformers' warmup + cosine schedule, the EAGLE run sets the rate by hand each step (so a resumed run needs no
scheduler state), the online trainer keeps it constant. Knows nothing about data, models or losses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float
    """Peak AdamW learning rate (the constant rate where there is no schedule)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_fraction: float = 0.0
    """Share of the steps spent warming the learning rate up linearly; 0: no warmup."""
    grad_clip: float = 1.0
    """Gradient-norm clipping threshold."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def adamw(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def warmup_steps(self, steps: int) -> int:
        """Steps of linear warmup in a run of `steps` steps."""
        return math.floor(self.warmup_fraction * steps)

    def clip(self, params: Iterable[torch.nn.Parameter]) -> None:
        torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
