"""Request: one generation's state as the engine sees it (tokens, counters, status).

The counters are the whole accounting: `num_computed_tokens` tokens have KV in the verifier's
pool, `num_draft_computed_tokens` in the draft's. A step schedules the gap between computed and
known tokens (plus speculative lookahead); rollback is moving a counter back.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.engine.trace import TraceRecorder
from specserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from specserve.engine.logprobs import TokenLogprobs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        detokenizer: IncrementalDetokenizer,
        eos_token_ids: set[int],
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids = list(prompt_token_ids)
        self.params = params
        self.detokenizer = detokenizer
        self.stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
        self.status = RequestStatus.WAITING
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.num_computed_tokens = 0
        self.num_draft_computed_tokens = 0
        self.num_preemptions = 0
        self.stop_reason: str | int | None = None
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.trace: TraceRecorder | None = None  # set by the engine when it records traces
        # an EAGLE head's input: the verifier's features of positions features_start.. (only with an EAGLE draft)
        self.features: torch.Tensor | None = None  # [positions, hidden]
        self.features_start = 0
        # logprobs, only when asked: one per output token; one per prompt token (the first has none: None)
        self.logprobs: list[TokenLogprobs] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprobs | None] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def scores_prompt(self) -> bool:
        """Whether prompt logprobs are asked for and not all recorded: the prompt's rows must be computed
        (a prefix-cache hit would skip them)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
