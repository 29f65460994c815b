"""RequestTrace: what a finished request leaves behind for the traffic log and the online trainer.

The verifier's top-m log-probabilities (temperature 1, before any sampling transform) at every
generated position come from the verification forward pass that ran anyway: recording them costs a
log-softmax and a top-m over rows the engine already holds, no extra model work. Knows nothing
about where traces are stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SpecStep:
    """One verification step of a request: who proposed, how many, how many were accepted."""

    source: str  # 'draft', 'ngram' or 'none' (plain decoding, k = 0)
    num_draft_tokens: int
    num_accepted: int


@dataclass
class RequestTrace:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    topm_ids: torch.Tensor  # [num_output, m] int32: the verifier's m most likely tokens per generated position
    topm_logprobs: torch.Tensor  # [num_output, m] float32: their log-probabilities (temperature 1)
    steps: list[SpecStep] = field(default_factory=list)
    draft_version: str = "none"
    finish_reason: str | None = None


class TraceRecorder:
    """Accumulates one request's top-m rows and steps while it runs."""

    def __init__(self, m: int) -> None:
        self.m = m
        self.ids: list[torch.Tensor] = []  # each [rows, m]
        self.logprobs: list[torch.Tensor] = []
        self.steps: list[SpecStep] = []

    def add(self, logits: torch.Tensor, num_kept: int, step: SpecStep) -> None:  # logits: [k + 1, vocab] fp32
        rows = logits[:num_kept].float()
        top = torch.topk(torch.log_softmax(rows, dim=-1), self.m, dim=-1)
        self.ids.append(top.indices.to(torch.int32).cpu())
        self.logprobs.append(top.values.cpu())
        self.steps.append(step)

    def finish(self, request, draft_version: str) -> RequestTrace:
        m = self.m
        return RequestTrace(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            output_token_ids=list(request.output_token_ids),
            topm_ids=torch.cat(self.ids) if self.ids else torch.zeros(0, m, dtype=torch.int32),
            topm_logprobs=torch.cat(self.logprobs) if self.logprobs else torch.zeros(0, m),
            steps=self.steps,
            draft_version=draft_version,
            finish_reason=request.finish_reason,
        )
