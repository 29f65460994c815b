"""The OpenAI wire format: pydantic models of /v1/completions and /v1/chat/completions, in and out.

Requests ignore unknown fields (as OpenAI does) and carry three extensions: ``top_k``,
``ignore_eos`` and ``stop_token_ids``. Values are checked where they become SamplingParams, so
that the error names the value; fields this server cannot honour are listed by ``unsupported()``
instead of being silently ignored. Logprobs (chat ``logprobs``/``top_logprobs``, completions
``logprobs``/``echo``) are the verifier's raw logprobs (see ``specserve/engine/logprobs.py``).
Knows nothing about engines, tokenizers or HTTP.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from specserve.sampling_params import SamplingParams

INT64_MIN, UINT64_MAX = -(2**63), 2**64 - 1
GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily, as vLLM's do: dividing logits by less overflows to inf."""
MAX_TOP_LOGPROBS = 20
"""Chat ``top_logprobs`` accepted, as OpenAI's."""
MAX_COMPLETION_LOGPROBS = 5
"""/v1/completions ``logprobs`` accepted, as OpenAI's."""


def _surrogate_at(value: Any, where: str) -> str | None:
    """Where in a JSON value a string holds a lone UTF-16 surrogate (JSON allows "\\ud800"; Unicode does not)."""
    if isinstance(value, str):
        return where if any("\ud800" <= ch <= "\udfff" for ch in value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _surrogate_at(k, where) if isinstance(k, str) else None
        found = found or _surrogate_at(v, f"{where}.{k}" if where else str(k))
        if found:
            return found
    return None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


def _ranged(default: Any = None, **bounds: float) -> Any:
    """A field whose OpenAPI schema states the values accepted, while the check itself (with the error
    message naming the value) stays where SamplingParams are built."""
    return Field(default=default, json_schema_extra=bounds)


class SamplingRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    """The served model name; None or empty means the one this server serves."""
    temperature: float | None = _ranged(minimum=0)
    top_p: float | None = _ranged(exclusiveMinimum=0, maximum=1)
    top_k: int | None = _ranged(minimum=-1)
    n: int = _ranged(1, minimum=1)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=UINT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # extensions
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # tokenizers and JSON encoders refuse lone surrogates: refuse them here, with a 400 that says where
        where = _surrogate_at(data, "")
        if where is not None:
            raise ValueError(
                f"{where or 'the body'} holds a lone UTF-16 surrogate (e.g. \\ud800), which is not valid Unicode text"
            )
        return data

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def logprob_counts(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) of the engine's SamplingParams; neither endpoint's default asks for any.
        Raises ValueError naming a value out of range."""
        return None, None

    def sampling_params(self, max_tokens: int, seed: int | None) -> SamplingParams:
        """Raises the engine's ValueError (which names the value) for anything out of range."""
        temperature = 1.0 if self.temperature is None else self.temperature
        logprobs, prompt_logprobs = self.logprob_counts()
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0 if 0 <= temperature < GREEDY_BELOW else temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            seed=seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first field whose value this server cannot honour."""
        if self.presence_penalty:
            return "presence_penalty", f"presence_penalty is not supported (got {self.presence_penalty}); use 0"
        if self.frequency_penalty:
            return "frequency_penalty", f"frequency_penalty is not supported (got {self.frequency_penalty}); use 0"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported; leave it out"
        return None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = _ranged(minimum=0)
    """None: 16 (OpenAI's default), or less where a prompt leaves less room in the context. Given, each
    prompt + max_tokens must fit the context. 0 only with ``echo``: the prompt is scored, nothing generated."""
    logprobs: int | None = _ranged(minimum=0, maximum=MAX_COMPLETION_LOGPROBS)
    """Per token, its logprob and those of the ``logprobs`` most likely tokens (the legacy format)."""
    echo: bool = False
    """Prepend the prompt to the text; with ``logprobs``, the prompt tokens' logprobs too (the first's is null)."""
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per entry: a string, or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValueError("prompt must not be empty: give a string, a list of strings or token ids")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)

    @property
    def prompt_only(self) -> bool:
        """echo with max_tokens 0: score the prompt (lm-eval-harness loglikelihood style), generate nothing."""
        return self.echo and self.max_tokens == 0

    def logprob_counts(self) -> tuple[int | None, int | None]:
        n = self.logprobs
        if n is not None and not 0 <= n <= MAX_COMPLETION_LOGPROBS:
            raise ValueError(f"logprobs must be an integer in [0, {MAX_COMPLETION_LOGPROBS}], got {n}")
        return n, n if self.echo else None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", f"best_of is not supported (got {self.best_of}); use n instead"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server"
        return super().unsupported()


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. tool_calls: handed to the chat template as they are
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template expects it: content flattened to one string."""
        content = self.content
        if isinstance(content, list):
            bad = [part.type for part in content if part.type != "text"]
            if bad:
                raise ValueError(f"messages content part type {bad[0]!r} is not supported; only 'text' parts are")
            content = "".join(part.text or "" for part in content)
        out = self.model_dump(exclude_none=True)
        out["content"] = content or ""
        return out


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = _ranged(minimum=1)
    """None: the room the prompt leaves in the context. Given, prompt + max_tokens must fit the context."""
    max_completion_tokens: int | None = _ranged(minimum=1)
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool | None = None
    """Return each generated token's logprob (``choices[i].logprobs.content``)."""
    top_logprobs: int | None = _ranged(minimum=0, maximum=MAX_TOP_LOGPROBS)
    """With ``logprobs``: also the ``top_logprobs`` most likely tokens at each position."""
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def logprob_counts(self) -> tuple[int | None, int | None]:
        n = self.top_logprobs
        if n is not None and not 0 <= n <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {n}")
        if n is not None and not self.logprobs:
            raise ValueError(f"top_logprobs (got {n}) needs logprobs: true")
        return (n or 0, None) if self.logprobs else (None, None)

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools (function calling) are not supported by this server"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return (
                "response_format",
                f"response_format {self.response_format.get('type')!r} is not supported; only 'text'",
            )
        return super().unsupported()


# ---- responses ------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


def _now() -> int:
    return int(time.time())


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    """The token's UTF-8 bytes (its text may hold only part of a character)."""


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
    """The ``top_logprobs`` most likely tokens at this position, most likely first."""


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """The legacy format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    """null for the first prompt token (echo): nothing before it to score it."""
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    """token text -> logprob: the n most likely and the chosen token (up to n + 1 entries)."""
    text_offset: list[int] = Field(default_factory=list)
    """Where each token's text starts in the choice's text."""


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer
    def _drop_none(self) -> dict[str, Any]:
        # OpenAI sends only the keys that change: role in the first chunk, content after, {} at the end
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class CompletionChunk(BaseModel):
    """A streamed /v1/completions event: OpenAI reuses the ``text_completion`` object for it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


def sse(chunk: BaseModel, include_usage: bool) -> str:
    """One Server-Sent Event. With include_usage every chunk carries ``usage`` (null until the last)."""
    exclude = None if include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "specserve"
    root: str | None = None
    max_model_len: int | None = None
    numerics: dict | None = None
    """specserve's extension: the engine's numerics mode and what it promises (specserve/engine/numerics.py)."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
