"""Scheduler: which requests run this step and how many tokens each computes.

One accounting rule for prefill, decode and speculation: each step schedules, per request, the
gap between the tokens it knows and the tokens whose KV is computed, plus `k` lookahead slots
for draft tokens when the request is decoding. Prompts longer than the step's token budget are
prefilled in chunks. When the KV pool is full the most recently admitted running request is
preempted (its blocks freed, to be recomputed later). Never touches tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from specserve.config import SchedulerConfig
from specserve.engine.kv_cache_manager import KVCacheManager
from specserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    """Verifier tokens computed this step, the k draft tokens included."""
    num_draft_tokens: int = 0
    """k: draft tokens the proposer fills in for verification."""

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


# (request, number of running requests) -> k
SpeculationLength = Callable[[Request, int], int]


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
        self.speculation_length = speculation_length or (lambda request, batch: 0)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _draft_tokens(self, request: Request) -> int:
        if request.num_tokens - request.num_computed_tokens != 1:
            return 0  # still prefilling: the first token must be sampled before drafting past it
        k = self.speculation_length(request, len(self.running))
        room_in_output = request.params.max_tokens - request.num_output_tokens - 1
        room_in_context = self.max_model_len - request.num_tokens
        return max(0, min(k, room_in_output, room_in_context))

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
            k = self._draft_tokens(request)
            if gap + k > budget:
                k = max(0, budget - gap)
            num_new = min(gap + k, budget)
            while not self.kv.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append(ScheduledRequest(request, num_new, k))
                budget -= num_new
                i += 1
        if out.preempted:
            return out  # the pool is short: admit nobody new this step
        while self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            request = self.waiting[0]
            blocks, num_cached, num_draft_cached = self.kv.find_cached_prefix(request)
            request.num_computed_tokens = num_cached
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate(request, num_new, blocks):
                request.num_computed_tokens = 0
                break
            request.num_draft_computed_tokens = num_draft_cached
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, 0))
            budget -= num_new
        return out

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and free its blocks."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request)
