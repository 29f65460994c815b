"""Scheduler: which requests run this step and how many tokens each computes.

One accounting rule for prefill, decode and speculation: each step schedules, per request, the
gap between the tokens it knows and the tokens whose KV is computed, plus `k` lookahead slots
for draft tokens when the request is decoding. Prompts longer than the step's token budget are
prefilled in chunks. When the KV pool is full the most recently admitted running request is
preempted (its blocks freed, to be recomputed later). After the step, `commit` applies the same rule
backwards (computed += scheduled - rejected), appends the emitted tokens, decides stops and frees
finished requests. Never touches tensors.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from specserve.config import SchedulerConfig
from specserve.engine.kv_cache_manager import KVCacheManager
from specserve.engine.proposal import SpecChoice, SpecSource
from specserve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Verifier tokens computed this step, the k draft tokens included."""
    spec: SpecChoice | None = None
    """Who proposes the k draft tokens the verifier checks this step; None: no drafting."""

    @property
    def num_draft_tokens(self) -> int:
        """k: draft tokens the proposer fills in for verification."""
        return self.spec.k if self.spec is not None else 0

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens, so that it yields new tokens."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens - self.num_draft_tokens == r.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class SpeculationLength(Protocol):
    """Chooses each decoding request's proposal and learns from its verification (SpeculationLengthPolicy)."""

    def __call__(self, request: Request, num_running: int) -> SpecChoice | None: ...

    def observe(self, request: Request, choice: SpecChoice | None, num_accepted: int) -> None: ...

    def forget(self, request_id: str) -> None: ...


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        max_model_len: int,
        speculation_length: SpeculationLength | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.speculation_length = speculation_length
        self.hit_needs_draft_kv = False
        """A prefix-cache hit counts only as far as the draft's KV is cached too (the engine sets it for a draft
        that reads the verifier's features: past its own KV it would need features nobody computed)."""
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _spec(self, request: Request) -> SpecChoice | None:
        if self.speculation_length is None or request.num_tokens - request.num_computed_tokens != 1:
            return None  # still prefilling: the first token must be sampled before drafting past it
        choice = self.speculation_length(request, len(self.running))
        if choice is None:
            return None
        room_in_output = request.params.max_tokens - request.num_output_tokens - 1
        room_in_context = self.max_model_len - request.num_tokens
        return choice.clipped(min(room_in_output, room_in_context))

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_draft_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            gap = request.num_tokens - request.num_computed_tokens
            spec = self._spec(request)
            if spec is not None and gap + spec.k > budget:
                spec = spec.clipped(budget - gap)
            num_new = min(gap + (spec.k if spec is not None else 0), budget)
            while not self.kv.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, spec))
                budget -= num_new
                i += 1
        if out.preempted:
            return out  # the pool is short: admit nobody new this step
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            request = self.waiting[0]
            blocks, num_cached, num_draft_cached = self.kv.find_cached_prefix(request)
            if self.hit_needs_draft_kv:
                blocks, num_cached = blocks[: num_draft_cached // self.kv.block_size], num_draft_cached
            request.num_computed_tokens = num_cached
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate(request, num_new, blocks):
                request.num_computed_tokens = 0
                break
            request.num_draft_computed_tokens = num_draft_cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return out

    def commit(self, s: ScheduledRequest, emitted: list[int] | None, recompute_accepted: bool) -> list[int] | None:
        """Commit one scheduled request's step; returns the tokens it kept (None: a prompt chunk, nothing sampled).

        emitted: the verified tokens [accepted..., recovered or bonus]; those after a stop are dropped.
        recompute_accepted: the draft re-runs its accepted tokens (an EAGLE head), so none of its KV stays valid.
        """
        r, k = s.request, s.num_draft_tokens
        if emitted is None:  # a prompt chunk that did not reach the end
            r.num_computed_tokens += s.num_new_tokens
            self.kv.cache_finalised(r, r.num_computed_tokens, r.num_draft_computed_tokens)
            return None
        num_accepted = len(emitted) - 1
        # one accounting rule: computed += scheduled - rejected
        r.num_computed_tokens += s.num_new_tokens - (k - num_accepted)
        if s.spec is not None and s.spec.source is SpecSource.DRAFT:
            # the draft saw its own tokens up to d_{k-1}; those accepted stay valid (unless the
            # proposer re-runs them with better inputs: an EAGLE head's true features)
            keep = 0 if recompute_accepted else min(num_accepted, k - 1)
            r.num_draft_computed_tokens = r.num_tokens + keep
        if self.speculation_length is not None:
            self.speculation_length.observe(r, s.spec, num_accepted)
        kept = []
        for token in emitted:
            r.append_token(token)
            kept.append(token)
            if self._check_stop(r, token):
                break
        if r.is_finished:
            self.finish(r, r.status)
        else:
            self.kv.cache_finalised(r, r.num_computed_tokens, r.num_draft_computed_tokens)
        return kept

    def _check_stop(self, r: Request, token: int) -> bool:
        """Detokenize one new token and decide whether the request ends with it."""
        if token in r.stop_token_ids:
            r.status = RequestStatus.FINISHED_STOPPED
            # an EOS ends the request without a stop reason; a stop token the caller named is the reason
            r.stop_reason = token if token in r.params.stop_token_ids else None
            return True
        stop = r.detokenizer.add(token)
        if stop is not None:
            r.status = RequestStatus.FINISHED_STOPPED
            r.stop_reason = stop
            return True
        if r.num_output_tokens >= r.params.max_tokens or r.num_tokens >= self.max_model_len:
            r.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and free its blocks (and the policy's history of it)."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
        if self.speculation_length is not None:
            self.speculation_length.forget(request.request_id)
