"""build_app: the FastAPI application: OpenAI routes, /health and /metrics over one AsyncEngine.

Async boundaries: the handlers are ``async def`` but do no model work. They validate, render chat
templates and tokenize on Starlette's worker threads (``run_in_threadpool``), hand requests to the
AsyncEngine, and await its outputs; generation runs on the engine thread. The app owns the
engine's lifetime: leaving its lifespan drains and stops the engine thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from transformers import PreTrainedTokenizerBase

from specserve.engine.outputs import RequestOutput
from specserve.server import errors
from specserve.server.async_engine import AsyncEngine, RequestGroup
from specserve.server.errors import APIError, invalid
from specserve.server.metrics import ServerMetrics
from specserve.server.protocol import (
    SSE_DONE,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    SamplingRequest,
    UsageInfo,
    sse,
)

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


def _api_key_check(api_key: str) -> Callable:
    async def check(authorization: str | None = Header(default=None)) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "no API key given: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        token = token.strip()
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, f"incorrect API key provided: {_mask(token)}", code="invalid_api_key")

    return check


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Handlers:
    """The routes' shared state: the engine, the served name and the metrics."""

    def __init__(self, async_engine: AsyncEngine, served_model_name: str, metrics: ServerMetrics) -> None:
        self.engine = async_engine
        self.model = served_model_name
        self.metrics = metrics

    # ---- shared steps -------------------------------------------------------------------------

    def check(self, body: SamplingRequest) -> None:
        if body.model and body.model != self.model:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model!r}",
                           param="model", code="model_not_found")
        refused = body.unsupported()
        if refused:
            raise invalid(refused[1], refused[0])
        if not 1 <= body.n <= MAX_N:
            raise invalid(f"n must be an integer in [1, {MAX_N}], got {body.n}", "n")

    async def submit(self, body: SamplingRequest, prompts: list, max_tokens: list[int],
                     request_id: str) -> RequestGroup:
        """One engine request per (prompt, choice); choice i * n + j is prompt i's j-th sample."""
        specs = [
            (prompt, body.sampling_params(max_tokens[i], derive_seed(body.seed, j)), f"{request_id}-{i * body.n + j}")
            for i, prompt in enumerate(prompts)
            for j in range(body.n)
        ]
        return await self.engine.add_requests(specs)

    def observe(self, group: RequestGroup, index: int, out: RequestOutput) -> None:
        self.metrics.output(group.members[index], out)

    def fit_context(self, prompt_tokens: int, max_tokens: int | None, field: str = "max_tokens") -> int:
        """``max_tokens`` if the prompt and that many tokens fit the context; None asks for all the room left.

        Raises a 400 naming both numbers otherwise, as OpenAI and vLLM do, instead of quietly
        stopping the output at the end of the context.
        """
        limit = self.engine.max_model_len
        if prompt_tokens >= limit:
            raise invalid(f"prompt is {prompt_tokens} tokens; the context holds {limit}, so the prompt must be "
                          "shorter to leave room for output", "prompt")
        if max_tokens is None:
            return limit - prompt_tokens
        if prompt_tokens + max_tokens > limit:
            raise invalid(f"this model's context holds {limit} tokens, but you asked for {prompt_tokens + max_tokens}"
                          f" ({prompt_tokens} in the prompt + {max_tokens} in {field}); lower {field} to at most "
                          f"{limit - prompt_tokens} or shorten the prompt", field)
        return max_tokens

    def usage(self, group: RequestGroup, n: int, completion_tokens: dict[int, int]) -> UsageInfo:
        # each prompt counts once however many choices it has, as OpenAI counts
        prompt = sum(m.num_prompt_tokens for m in group.members if m.index % n == 0)
        return UsageInfo.of(prompt, sum(completion_tokens.values()))

    async def collect(self, group: RequestGroup, request: Request) -> dict[int, RequestOutput] | None:
        """The finished output of every member; None if the client left first (the group is aborted)."""
        finals: dict[int, RequestOutput] = {}

        async def consume() -> None:
            async for index, out in group.outputs():
                self.observe(group, index, out)
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
        texts = body.prompts()
        prompts = await run_in_threadpool(lambda: [self.engine.encode_prompt(p) for p in texts])
        if body.max_tokens is None:
            # OpenAI's default of 16, cut to the room a prompt leaves: only an explicit max_tokens is refused
            max_tokens = [min(DEFAULT_MAX_TOKENS, self.fit_context(len(p), None)) for p in prompts]
        else:
            max_tokens = [self.fit_context(len(p), body.max_tokens) for p in prompts]
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        group = await self.submit(body, prompts, max_tokens, request_id)
        if body.stream:
            return _event_stream(self.stream_completion(group, body, request_id, created), group)
        finals = await self.collect(group, request)
        if finals is None:
            return Response(status_code=499)
        choices = [CompletionChoice(index=i, text=finals[i].text, finish_reason=finals[i].finish_reason)
                   for i in sorted(finals)]
        usage = self.usage(group, body.n, {i: len(o.token_ids) for i, o in finals.items()})
        return JSONResponse(CompletionResponse(id=request_id, created=created, model=self.model, choices=choices,
                                               usage=usage).model_dump())

    async def stream_completion(self, group: RequestGroup, body: CompletionRequest, request_id: str,
                                created: int) -> AsyncIterator[str]:
        include_usage = body.include_usage
        tokens: dict[int, int] = {}
        async for index, out in group.outputs():
            self.observe(group, index, out)
            tokens[index] = len(out.token_ids)
            if out.delta_text or out.finished:
                choice = CompletionChoice(index=index, text=out.delta_text, finish_reason=out.finish_reason)
                yield sse(CompletionChunk(id=request_id, created=created, model=self.model, choices=[choice]),
                          include_usage)
        if include_usage:
            usage = self.usage(group, body.n, tokens)
            yield sse(CompletionChunk(id=request_id, created=created, model=self.model, choices=[], usage=usage),
                      True)

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
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        group = await self.submit(body, [prompt_ids], [max_tokens], request_id)
        if body.stream:
            return _event_stream(self.stream_chat(group, body, request_id, created), group)
        finals = await self.collect(group, request)
        if finals is None:
            return Response(status_code=499)
        choices = [ChatChoice(index=i, message=ChatMessageOut(content=finals[i].text),
                              finish_reason=finals[i].finish_reason) for i in sorted(finals)]
        usage = self.usage(group, body.n, {i: len(o.token_ids) for i, o in finals.items()})
        return JSONResponse(ChatCompletionResponse(id=request_id, created=created, model=self.model,
                                                   choices=choices, usage=usage).model_dump())

    async def stream_chat(self, group: RequestGroup, body: ChatCompletionRequest, request_id: str,
                          created: int) -> AsyncIterator[str]:
        include_usage = body.include_usage

        def chunk(index: int, delta: DeltaMessage, finish_reason: str | None = None) -> str:
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason)
            return sse(ChatCompletionChunk(id=request_id, created=created, model=self.model, choices=[choice]),
                       include_usage)

        for m in group.members:
            yield chunk(m.index, DeltaMessage(role="assistant", content=""))
        tokens: dict[int, int] = {}
        async for index, out in group.outputs():
            self.observe(group, index, out)
            tokens[index] = len(out.token_ids)
            if out.delta_text:
                yield chunk(index, DeltaMessage(content=out.delta_text))
            if out.finished:
                yield chunk(index, DeltaMessage(), out.finish_reason)
        if include_usage:
            usage = self.usage(group, body.n, tokens)
            yield sse(ChatCompletionChunk(id=request_id, created=created, model=self.model, choices=[], usage=usage),
                      True)


def _event_stream(chunks: AsyncIterator[str], group: RequestGroup) -> StreamingResponse:
    """Server-Sent Events ending in ``data: [DONE]``; an error mid-stream becomes an error event
    (the status line is gone by then). However the stream ends, the group's unfinished requests
    are aborted, so a client that leaves mid-stream frees its KV blocks."""

    async def events() -> AsyncIterator[str]:
        try:
            async for event in chunks:
                yield event
        except Exception as e:
            yield f"data: {errors.from_exception(e).response().body.decode()}\n\n"
        finally:
            group.abort()
        yield SSE_DONE

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over ``async_engine``; with ``api_key`` the /v1 routes need it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await async_engine.shutdown()

    app = FastAPI(title="specserve", summary="OpenAI-compatible speculative-decoding server", lifespan=lifespan)
    errors.install(app)
    metrics = ServerMetrics(async_engine)
    h = _Handlers(async_engine, served_model_name, metrics)
    app.state.async_engine = async_engine
    app.state.metrics = metrics

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_api_key_check(api_key))] if api_key else [])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await h.completions(body, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await h.chat(body, request)

    @v1.get("/models")
    async def models() -> ModelList:
        card = ModelCard(id=served_model_name, root=async_engine.engine.config.verifier,
                         max_model_len=async_engine.max_model_len)
        return ModelList(data=[card])

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive():
            return APIError(503, "the engine thread is not running", type="service_unavailable",
                            code="engine_dead").response()
        return JSONResponse({"status": "draining" if async_engine.draining else "ok"})

    @app.get("/metrics")
    def prometheus() -> Response:  # sync: FastAPI runs it on a worker thread
        return Response(metrics.render(), media_type=ServerMetrics.CONTENT_TYPE)

    return app
