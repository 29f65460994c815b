"""Proposal: the records a speculative proposal travels in, from the policy's choice to the verifier.

`SpecChoice` is what the speculation-length policy decides for one request at scheduling time (who
proposes, how many tokens, the tokens themselves when prompt lookup already knows them); the
scheduler's plan carries it to execute() and update(). `Proposer` is the one interface of every
proposer (the draft model, an EAGLE head, prompt lookup): a batch of choices in, a `Proposal` out
(draft token ids, their distribution q or None for a deterministic proposal, and what it cost).
Knows nothing about models or scheduling.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from specserve.engine.request import Request


class SpecSource(enum.Enum):
    """Who proposes a request's draft tokens; the value is the metric label."""

    DRAFT = "draft"  # the draft model (a standalone draft or an EAGLE head)
    NGRAM = "ngram"  # prompt lookup


@dataclass(frozen=True)
class SpecChoice:
    """One request's proposal for one step, as the policy chose it."""

    source: SpecSource
    k: int
    """Draft tokens to propose (>= 1)."""
    token_ids: tuple[int, ...] = ()
    """The proposed tokens when already known at scheduling time (prompt lookup: k of them); else empty."""
    match_len: int = 0
    """Prompt lookup: the length n of the n-gram match the tokens follow; 0 for the draft model."""

    def clipped(self, k: int) -> SpecChoice | None:
        """The same choice proposing at most k tokens (None at k <= 0: plain decoding)."""
        if k <= 0:
            return None
        return self if k >= self.k else replace(self, k=k, token_ids=self.token_ids[:k])


ProposeItem = tuple["Request", SpecChoice, list[int]]
"""(request, its choice, its block ids)."""


@dataclass(frozen=True)
class Proposal:
    """A proposer's answer for a batch of requests, row i for item i."""

    token_ids: torch.Tensor
    """[batch, max_k] int64: the draft tokens; -1 pads rows past their k."""
    probs: torch.Tensor | None
    """[batch, max_k, vocab]: q, the distribution each draft token was drawn from; None: one-hot at token_ids."""
    seconds: float = 0.0
    """Time a draft model spent on this call (0 for prompt lookup, which runs none)."""
    step_seconds: float | None = None
    """A single-token draft step of this call (its forward and sampling), when one ran."""
    catchup: tuple[int, float] | None = None
    """(tokens, seconds) of the call's first forward (the draft catching up), when a model ran."""


class Proposer(Protocol):
    recompute_accepted: bool
    """Whether the proposer re-runs accepted draft tokens (an EAGLE head, with the verifier's true features)."""
    reads_verifier_features: bool
    """Whether the proposer catches up on the verifier's features of every position (an EAGLE head): then a
    prefix-cache hit is only worth what the draft's own KV covers, since the verifier computes no features
    for the positions it skips."""

    def propose(self, items: list[ProposeItem]) -> Proposal:
        """Draft tokens for every item (k >= 1 each); the requests are not changed."""
        ...
