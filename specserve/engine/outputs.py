"""RequestOutput: what one engine step reports about one request."""

from __future__ import annotations

from dataclasses import dataclass

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
