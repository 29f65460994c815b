"""build_app: the FastAPI application: OpenAI routes, /health, /metrics and /admin over one AsyncEngine.

Async boundaries: the handlers are ``async def`` but do no model work. They validate, render chat
templates and tokenize on Starlette's worker threads (``run_in_threadpool``), hand requests to the
AsyncEngine, and await its outputs; generation runs on the engine thread. The app owns the
engine's lifetime: leaving its lifespan drains and stops the engine thread.

Access: /v1 routes resolve the bearer key to an ``APIKey`` and leave it on ``request.state.api_key``
(its ``key_id``, and ``log_traffic``: False when the client opted out of the traffic log). A
generation request then passes, in order: the body-size limit (413), validation, tokenization, the
prompt-token and max_tokens limits (400), the key's rate limits (429 with Retry-After), the
extraction monitor (observes only), and the engine's queue (429 / 503). /health and /metrics stay
open; /admin needs the admin key.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from specserve.engine.outputs import RequestOutput
from specserve.sampling_params import SamplingParams
from specserve.server import errors
from specserve.server.async_engine import AsyncEngine, RequestGroup
from specserve.server.auth import ANONYMOUS, AccessConfig, APIKey
from specserve.server.errors import APIError, invalid
from specserve.server.extraction import ExtractionConfig, ExtractionMonitor
from specserve.server.limits import BodySizeLimit, LimitsConfig, RateLimiter, Reservation
from specserve.server.logprobs import CompletionLogprobsWriter, TokenText, chat_logprobs, joined
from specserve.server.metrics import DraftWatchCollector, ServerMetrics, TrafficLogCollector, TrainerCollector
from specserve.server.numerics_header import NumericsHeader
from specserve.server.protocol import (
    SSE_DONE,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    SamplingRequest,
    UsageInfo,
    sse,
)

if TYPE_CHECKING:
    from specserve.server.draft_watcher import DraftWatcher
    from specserve.server.traffic_log import TrafficLog
    from specserve.server.trainer_process import TrainerProcess

MAX_N = 64
"""Most choices one request may ask for (each is an engine request)."""
DEFAULT_MAX_TOKENS = 16
"""/v1/completions' max_tokens when the request leaves it out, as OpenAI's."""


def derive_seed(seed: int | None, choice: int) -> int | None:
    """Seed of choice ``choice`` of a request seeded with ``seed``: choice 0 keeps the seed itself,
    so that n=1 and the first of n choices agree; the others hash it, so that they differ."""
    if seed is None or choice == 0:
        return seed
    digest = hashlib.sha256(f"{seed}/{choice}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Worker thread: the chat template (with the assistant's generation prompt), tokenized.

    The template writes any special tokens itself, so the tokenizer adds none.
    """
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise invalid(f"messages could not be rendered with the model's chat template: {e}", "messages") from e
    return tokenizer.encode(text, add_special_tokens=False)


def _mask(key: str) -> str:
    return key[:3] + "*" * max(0, len(key) - 7) + key[-4:] if len(key) > 8 else "*" * len(key)


def _bearer(request: Request) -> str:
    """The request's bearer token; 401 without one. (Read here, not declared as a header parameter, so
    that the OpenAPI schema does not invite clients to send keys as plain parameters.)"""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "no API key given: send the header 'Authorization: Bearer <key>'", code="invalid_api_key")
    return token.strip()


def _authenticate(access: AccessConfig) -> Callable:
    async def authenticate(request: Request) -> None:
        if access.open:
            request.state.api_key = ANONYMOUS
            return
        token = _bearer(request)
        key = access.authenticate(token)
        if key is None:
            raise APIError(401, f"incorrect API key provided: {_mask(token)}", code="invalid_api_key")
        request.state.api_key = key

    return authenticate


def _require_admin(access: AccessConfig, request: Request) -> None:
    """401 without a key or with an unknown one; 403 for a client key, or when no admin key is configured."""
    token = _bearer(request)
    if access.is_admin(token):
        return
    if access.admin is None:
        raise APIError(
            403,
            "admin endpoints are disabled: start the server with --admin-key (or $SPECSERVE_ADMIN_KEY)",
            type="permission_error",
            code="admin_disabled",
        )
    if access.authenticate(token) is not None:
        raise APIError(
            403,
            "this API key may not read admin endpoints; use the admin key",
            type="permission_error",
            code="not_admin",
        )
    raise APIError(401, f"incorrect admin key provided: {_mask(token)}", code="invalid_api_key")


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class _Call:
    """One admitted generation request: its engine requests, and the tokens reserved for it."""

    group: RequestGroup
    reservation: Reservation
    prompt_tokens: int
    """Tokens of its prompts, each counted once whatever n is."""
    generated: dict[int, int] = field(default_factory=dict)
    """Member index -> tokens generated so far."""
    log_as: str | None = None
    """The key id its finished traces enter the traffic log under; None: not logged (no log, or opted out)."""
    prompt_only: bool = False
    """echo with max_tokens 0: the one token each engine request samples is dropped, and not counted."""

    def settle(self) -> None:
        """The request ended (any way): its key is charged what it used, not what it reserved."""
        self.reservation.settle(self.prompt_tokens + sum(self.generated.values()))


class _Handlers:
    """The routes' shared state: the engine, the served name, metrics, limits and the extraction monitor."""

    def __init__(
        self,
        async_engine: AsyncEngine,
        served_model_name: str,
        metrics: ServerMetrics,
        limits: LimitsConfig,
        limiter: RateLimiter,
        extraction: ExtractionMonitor,
        clock: Callable[[], float],
        traffic: TrafficLog | None = None,
    ) -> None:
        self.engine = async_engine
        self.traffic = traffic
        self.model = served_model_name
        self.metrics = metrics
        self.limits = limits
        self.limiter = limiter
        self.extraction = extraction
        self.clock = clock
        self.token_text = TokenText(async_engine.tokenizer)

    # ---- shared steps -------------------------------------------------------------------------

    def check(self, body: SamplingRequest) -> None:
        if body.model and body.model != self.model:
            raise APIError(
                404,
                f"the model {body.model!r} does not exist; this server serves {self.model!r}",
                param="model",
                code="model_not_found",
            )
        refused = body.unsupported()
        if refused:
            raise invalid(refused[1], refused[0])
        if not 1 <= body.n <= MAX_N:
            raise invalid(f"n must be an integer in [1, {MAX_N}], got {body.n}", "n")

    async def admit(
        self,
        body: SamplingRequest,
        request: Request,
        prompts: list[list[int]],
        max_tokens: list[int],
        texts: list[str],
        request_id: str,
    ) -> _Call:
        """Rate-limit, observe and submit: one engine request per (prompt, choice); choice i * n + j is
        prompt i's j-th sample. ``texts`` are the prompts as the extraction monitor sees them."""
        specs: list[tuple[list[int], SamplingParams, str]] = [
            (prompt, body.sampling_params(max_tokens[i], derive_seed(body.seed, j)), f"{request_id}-{i * body.n + j}")
            for i, prompt in enumerate(prompts)
            for j in range(body.n)
        ]
        key: APIKey = request.state.api_key
        rpm = self.limits.requests_per_minute if key.requests_per_minute is None else key.requests_per_minute
        tpm = self.limits.tokens_per_minute if key.tokens_per_minute is None else key.tokens_per_minute
        prompt_tokens = sum(len(p) for p in prompts)
        reservation = self.limiter.reserve(key.key_id, rpm, tpm, prompt_tokens + body.n * sum(max_tokens))
        try:
            group = await self.engine.add_requests(specs)
        except BaseException:
            reservation.cancel()
            raise
        self.extraction.observe(key.key_id, texts, self.clock())
        log_as = key.key_id if self.traffic is not None and key.log_traffic else None
        return _Call(group, reservation, prompt_tokens, log_as=log_as)

    def observe(self, call: _Call, index: int, out: RequestOutput) -> None:
        self.metrics.output(call.group.members[index], out)
        call.generated[index] = 0 if call.prompt_only else len(out.token_ids)
        if out.trace is not None and call.log_as is not None:  # only a finished output carries the trace
            self.traffic.record(out.trace, call.log_as)

    def fit_context(self, prompt_tokens: int, max_tokens: int | None, field: str = "max_tokens") -> int:
        """``max_tokens`` if the prompt and that many tokens fit the context and the server's limits; None
        asks for all the room left (at most --max-output-tokens).

        Raises a 400 naming the numbers otherwise, as OpenAI and vLLM do, instead of quietly
        stopping the output at the end of the context.
        """
        most_prompt, most_output = self.limits.max_prompt_tokens, self.limits.max_output_tokens
        if most_prompt is not None and prompt_tokens > most_prompt:
            raise invalid(
                f"prompt is {prompt_tokens} tokens; this server accepts prompts of at most {most_prompt} "
                "tokens (--max-prompt-tokens)",
                "prompt",
            )
        limit = self.engine.max_model_len
        if prompt_tokens >= limit:
            raise invalid(
                f"prompt is {prompt_tokens} tokens; the context holds {limit}, so the prompt must be "
                "shorter to leave room for output",
                "prompt",
            )
        if max_tokens is None:
            return limit - prompt_tokens if most_output is None else min(limit - prompt_tokens, most_output)
        if most_output is not None and max_tokens > most_output:
            raise invalid(
                f"{field} is {max_tokens}; this server generates at most {most_output} tokens per request "
                f"(--max-output-tokens): lower {field} to {most_output} or less",
                field,
            )
        if prompt_tokens + max_tokens > limit:
            raise invalid(
                f"this model's context holds {limit} tokens, but you asked for {prompt_tokens + max_tokens}"
                f" ({prompt_tokens} in the prompt + {max_tokens} in {field}); lower {field} to at most "
                f"{limit - prompt_tokens} or shorten the prompt",
                field,
            )
        return max_tokens

    async def collect(self, call: _Call, request: Request) -> dict[int, RequestOutput] | None:
        """The finished output of every member; None if the client left first (the group is aborted)."""
        finals: dict[int, RequestOutput] = {}
        group = call.group

        async def consume() -> None:
            async for index, out in group.outputs():
                self.observe(call, index, out)
                if out.finished:
                    finals[index] = out

        work = asyncio.ensure_future(consume())
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
                group.abort()
        if not work.done() or work.cancelled():
            return None
        work.result()  # re-raises the engine's error, if any
        return finals

    # ---- /v1/completions ----------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check(body)
        # tokenized here, on a worker thread, to check each prompt against the context; the engine gets the ids
        given = body.prompts()

        def tokenize() -> tuple[list[list[int]], list[str]]:
            ids = [self.engine.encode_prompt(p) for p in given]
            return ids, [p if isinstance(p, str) else self.engine.tokenizer.decode(p) for p in given]

        prompts, texts = await run_in_threadpool(tokenize)
        if body.max_tokens is None:
            # OpenAI's default of 16, cut to the room a prompt leaves: only an explicit max_tokens is refused
            max_tokens = [min(DEFAULT_MAX_TOKENS, self.fit_context(len(p), None)) for p in prompts]
        else:
            max_tokens = [self.fit_context(len(p), body.max_tokens) for p in prompts]
        if body.prompt_only:  # the engine samples at least one token: the prefill's, dropped here
            max_tokens = [1] * len(prompts)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        call = await self.admit(body, request, prompts, max_tokens, texts, request_id)
        call.prompt_only = body.prompt_only
        echoed = list(zip(prompts, texts))  # per prompt: what echo prepends
        if body.stream:
            return _EventStream(self.stream_completion(call, body, echoed, request_id, created), call)
        try:
            finals = await self.collect(call, request)
        finally:
            call.settle()
        if finals is None:
            return Response(status_code=499)
        choices = []
        for i in sorted(finals):
            out, writer = finals[i], CompletionLogprobsWriter(self.token_text)
            piece = self.completion_piece(body, echoed[i // body.n], out, out.text, len(out.token_ids), writer, True)
            text, logprobs = piece
            finish = "length" if body.prompt_only else out.finish_reason
            choices.append(CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=finish))
        usage = UsageInfo.of(call.prompt_tokens, sum(call.generated.values()))
        return JSONResponse(
            CompletionResponse(
                id=request_id, created=created, model=self.model, choices=choices, usage=usage
            ).model_dump()
        )

    def completion_piece(
        self,
        body: CompletionRequest,
        echoed: tuple[list[int], str],
        out: RequestOutput,
        text: str,
        num_new: int,
        writer: CompletionLogprobsWriter,
        first: bool,
    ) -> tuple[str, CompletionLogprobs | None]:
        """What a choice adds to its text and logprobs: on its ``first`` piece the echoed prompt (ids, text),
        then ``text`` and the logprobs of its ``num_new`` latest tokens (none of either when only scoring)."""
        parts = []
        prefix = ""
        if body.echo and first:
            prefix = echoed[1]
            if body.logprobs is not None:
                parts.append(writer.prompt(echoed[0], out.prompt_logprobs, echoed[1]))
        if body.prompt_only:
            text, num_new = "", 0
        if body.logprobs is not None and num_new:
            parts.append(writer.generated(out.logprobs[len(out.logprobs) - num_new :]))
        return prefix + text, joined(parts) if body.logprobs is not None else None

    async def stream_completion(
        self,
        call: _Call,
        body: CompletionRequest,
        echoed: list[tuple[list[int], str]],
        request_id: str,
        created: int,
    ) -> AsyncIterator[str]:
        include_usage = body.include_usage
        writers: dict[int, CompletionLogprobsWriter] = {}  # per choice, from its first output on
        async for index, out in call.group.outputs():
            self.observe(call, index, out)
            first = index not in writers
            writer = writers.setdefault(index, CompletionLogprobsWriter(self.token_text))
            text, logprobs = self.completion_piece(
                body, echoed[index // body.n], out, out.delta_text, len(out.delta_token_ids), writer, first
            )
            if text or out.finished or (logprobs is not None and logprobs.tokens):
                finish = "length" if body.prompt_only and out.finished else out.finish_reason
                choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
                yield sse(
                    CompletionChunk(id=request_id, created=created, model=self.model, choices=[choice]), include_usage
                )
        if include_usage:
            usage = UsageInfo.of(call.prompt_tokens, sum(call.generated.values()))
            yield sse(CompletionChunk(id=request_id, created=created, model=self.model, choices=[], usage=usage), True)

    # ---- /v1/chat/completions -----------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check(body)
        if not body.messages:
            raise invalid("messages must be a non-empty list of {role, content} objects, got []", "messages")
        messages = [m.template_dict() for m in body.messages]
        prompt_ids = await run_in_threadpool(render_chat, self.engine.tokenizer, messages)
        if body.max_completion_tokens is not None:
            max_tokens = self.fit_context(len(prompt_ids), body.max_completion_tokens, "max_completion_tokens")
        else:  # None: all the room the prompt leaves
            max_tokens = self.fit_context(len(prompt_ids), body.max_tokens)
        # the extraction monitor compares what the user asks, not the system prompt an app puts before it
        asked = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), messages[-1]["content"])
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        call = await self.admit(body, request, [prompt_ids], [max_tokens], [asked], request_id)
        if body.stream:
            return _EventStream(self.stream_chat(call, body, request_id, created), call)
        try:
            finals = await self.collect(call, request)
        finally:
            call.settle()
        if finals is None:
            return Response(status_code=499)
        choices = [
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=finals[i].text),
                logprobs=chat_logprobs(self.token_text, finals[i].logprobs) if body.logprobs else None,
                finish_reason=finals[i].finish_reason,
            )
            for i in sorted(finals)
        ]
        usage = UsageInfo.of(call.prompt_tokens, sum(call.generated.values()))
        return JSONResponse(
            ChatCompletionResponse(
                id=request_id, created=created, model=self.model, choices=choices, usage=usage
            ).model_dump()
        )

    async def stream_chat(
        self, call: _Call, body: ChatCompletionRequest, request_id: str, created: int
    ) -> AsyncIterator[str]:
        include_usage = body.include_usage

        def chunk(
            index: int, delta: DeltaMessage, finish_reason: str | None = None, logprobs: ChatLogprobs | None = None
        ) -> str:
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
            return sse(
                ChatCompletionChunk(id=request_id, created=created, model=self.model, choices=[choice]), include_usage
            )

        for m in call.group.members:
            yield chunk(m.index, DeltaMessage(role="assistant", content=""))
        async for index, out in call.group.outputs():
            self.observe(call, index, out)
            new = out.logprobs[len(out.logprobs) - len(out.delta_token_ids) :] if body.logprobs else []
            if out.delta_text or new:  # a token's logprobs go out with the step that made it, text or not yet
                logprobs = chat_logprobs(self.token_text, new) if body.logprobs else None
                yield chunk(index, DeltaMessage(content=out.delta_text), logprobs=logprobs)
            if out.finished:
                yield chunk(index, DeltaMessage(), out.finish_reason)
        if include_usage:
            usage = UsageInfo.of(call.prompt_tokens, sum(call.generated.values()))
            yield sse(
                ChatCompletionChunk(id=request_id, created=created, model=self.model, choices=[], usage=usage), True
            )


class _EventStream(StreamingResponse):
    """Server-Sent Events ending in ``data: [DONE]``; an error mid-stream becomes an error event
    (the status line is gone by then). However the response ends (even when the client left before
    the first event, so that the events were never iterated), the call's unfinished requests are
    aborted, freeing their KV blocks, and its key is charged the tokens used."""

    def __init__(self, chunks: AsyncIterator[str], call: _Call) -> None:
        super().__init__(
            self._events(chunks, call.group), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.call = call

    @staticmethod
    async def _events(chunks: AsyncIterator[str], group: RequestGroup) -> AsyncIterator[str]:
        try:
            async for event in chunks:
                yield event
        except Exception as e:
            yield f"data: {errors.from_exception(e).response().body.decode()}\n\n"
        finally:
            group.abort()
        yield SSE_DONE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.call.group.abort()
            self.call.settle()


def build_app(
    async_engine: AsyncEngine,
    served_model_name: str,
    api_key: str | None = None,
    *,
    access: AccessConfig | None = None,
    limits: LimitsConfig | None = None,
    extraction: ExtractionConfig | None = None,
    clock: Callable[[], float] = time.monotonic,
    draft_watcher: DraftWatcher | None = None,
    trainer: TrainerProcess | None = None,
    traffic: TrafficLog | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over ``async_engine``.

    ``access`` says which keys the /v1 routes need (no keys: open) and the admin key; ``api_key``
    adds one more client key, named 'default'. ``clock`` times rate limits and the extraction monitor.
    ``draft_watcher`` and ``trainer`` (online distillation) start with the app and stop before the engine drains.
    ``traffic`` logs every finished request of a key that did not opt out (the engine must record traces:
    EngineConfig.trace_topm > 0); the app closes it after the engine has drained.
    """
    if traffic is not None and not async_engine.engine.config.trace_topm:
        raise ValueError("a traffic log needs the engine to record traces: set EngineConfig.trace_topm > 0")
    access = access or AccessConfig()
    if api_key:
        access = AccessConfig((*access.keys, APIKey.from_secret("default", api_key)), access.admin)
    limits = limits or LimitsConfig()
    limiter = RateLimiter(clock)
    monitor = ExtractionMonitor(extraction)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if trainer is not None:
            trainer.start()
        if draft_watcher is not None:  # adopts the registry's current draft before the first request
            await asyncio.to_thread(draft_watcher.start)
        yield
        if draft_watcher is not None:
            await asyncio.to_thread(draft_watcher.stop)
        if trainer is not None:
            await asyncio.to_thread(trainer.stop)
        await async_engine.shutdown()
        if traffic is not None:  # after the drain: the last requests' records are in its buffer
            await asyncio.to_thread(traffic.close)

    app = FastAPI(
        title="specserve",
        summary="OpenAI-compatible speculative-decoding server. /v1 routes take "
        "'Authorization: Bearer <key>' when the server has API keys.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(NumericsHeader, value=async_engine.engine.numerics.header())
    errors.install(app)
    metrics = ServerMetrics(async_engine, limiter, monitor, clock)
    if draft_watcher is not None:
        metrics.registry.register(DraftWatchCollector(draft_watcher))
    if trainer is not None:
        metrics.registry.register(TrainerCollector(trainer))
    if traffic is not None:
        metrics.registry.register(TrafficLogCollector(traffic))
    h = _Handlers(async_engine, served_model_name, metrics, limits, limiter, monitor, clock, traffic)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.extraction = monitor

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authenticate(access))])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await h.completions(body, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await h.chat(body, request)

    @v1.get("/models")
    async def models() -> ModelList:
        card = ModelCard(
            id=served_model_name,
            root=async_engine.engine.config.verifier,
            max_model_len=async_engine.max_model_len,
            numerics=async_engine.engine.numerics.to_dict(),
        )
        return ModelList(data=[card])

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive():
            return APIError(
                503, "the engine thread is not running", type="service_unavailable", code="engine_dead"
            ).response()
        return JSONResponse({"status": "draining" if async_engine.draining else "ok"})

    @app.get("/metrics")
    def prometheus() -> Response:  # sync: FastAPI runs it on a worker thread
        return Response(metrics.render(), media_type=ServerMetrics.CONTENT_TYPE)

    @app.get("/admin/extraction")
    def extraction_report(request: Request) -> JSONResponse:  # sync: the report is CPU work, off the loop
        """Per API key, the signals of distillation-style extraction and whether they flag the key (admin key)."""
        _require_admin(access, request)
        keys = [{**s.to_dict(), "name": access.name_of(s.key_id)} for s in monitor.report(clock())]
        return JSONResponse({"object": "extraction_report", "config": asdict(monitor.config), "keys": keys})

    return app
