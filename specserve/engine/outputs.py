"""RequestOutput: what one engine step reports about one request."""

from __future__ import annotations

from dataclasses import dataclass

from specserve.engine.logprobs import TokenLogprobs
from specserve.engine.trace import RequestTrace


@dataclass
class RequestOutput:
    request_id: str
    text: str
    """All text generated so far (final once finished; stop strings cut off)."""
    token_ids: list[int]
    """All generated token ids so far."""
    delta_text: str
    """Text that became final this step (safe to stream: no partial UTF-8 character, no partial stop string)."""
    delta_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    """'stop' (EOS, stop token or stop string), 'length' (max_tokens or context), 'abort', or None."""
    num_prompt_tokens: int
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended the request, if any."""
    trace: RequestTrace | None = None
    """Set once, on the finishing output, when the engine records traces (EngineConfig.trace_topm > 0)."""
    logprobs: list[TokenLogprobs] | None = None
    """One per generated token so far (the last len(delta_token_ids) are this step's), when the request's
    SamplingParams.logprobs is set: the verifier's raw logprobs (see engine/logprobs.py)."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """One per prompt token (None for the first), when SamplingParams.prompt_logprobs is set; complete from
    the first output on (outputs come once the prompt is computed), and no longer changing."""
