"""AsyncEngine: the asyncio face of the LLMEngine, and the one thread that drives it.

Threads and what they own:
- The *engine thread* (started here, named ``specserve-engine``) is the only caller of every
  LLMEngine method. It drains the inbox of commands (add / abort / swap the draft), calls ``step()`` while any
  request is unfinished, and sleeps on a condition variable when idle (no polling).
- *Event-loop threads* (the server's, or any test client's) call ``add_requests``/``generate``
  and iterate the returned ``RequestGroup``. A group belongs to the loop that created it: the
  engine thread hands it outputs with ``loop.call_soon_threadsafe`` only.
- Thread-safe from anywhere: ``abort``, ``begin_drain``, ``stats``, ``is_alive``, ``encode_prompt``,
  ``swap_draft`` (the draft watcher's thread calls it), the properties.

What it does not know: HTTP, OpenAI shapes, chat templates. Errors are its own exception types;
``server/errors.py`` maps them to status codes.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from specserve.engine.engine import LLMEngine
from specserve.engine.metrics import EngineMetrics
from specserve.engine.outputs import RequestOutput
from specserve.model.llama import LlamaModel
from specserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

NGRAM_SOURCE = "ngram"
"""The key of prompt-lookup proposals in ``EngineMetrics.speculation`` (draft-model ones use the draft version)."""


class QueueFullError(Exception):
    """More requests wait than ``max_queue`` allows (HTTP 429)."""


class ShuttingDownError(Exception):
    """The engine drains or has stopped and takes no new requests (HTTP 503)."""


class EngineError(Exception):
    """The engine failed while serving this request (HTTP 500); the server keeps running."""


@dataclass
class EngineStats:
    """A copy of the engine's numbers, published by the engine thread after every step."""

    metrics: EngineMetrics = field(default_factory=EngineMetrics)
    num_running: int = 0
    num_waiting: int = 0
    """Requests queued in the engine or in the inbox, not yet running."""
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    draft_version: str = "none"
    step_errors: int = 0


class RequestGroup:
    """The outputs of requests admitted together (a prompt list times n), on the loop that made them.

    The engine thread calls ``_put`` (thread-safe); the loop iterates ``outputs()``, which yields
    ``(index, RequestOutput)`` interleaved across the group. Leaving the iteration early (client
    gone, task cancelled) aborts the unfinished requests so that their KV blocks are freed.
    """

    def __init__(self, owner: AsyncEngine, requests: Sequence[tuple[str | list[int], SamplingParams, str]]) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.members = [Member(i, rid, prompt, params) for i, (prompt, params, rid) in enumerate(requests)]
        self._queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

    @property
    def finished(self) -> bool:
        return all(m.finished for m in self.members)

    def _put(self, index: int, item: RequestOutput | BaseException) -> None:
        """Engine thread: hand one output (or the error that ends the request) to the loop."""
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, (index, item))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every (index, output) until each request's finished one; EngineError if the engine failed one."""
        try:
            while not self.finished:
                index, item = await self._queue.get()
                member = self.members[index]
                if isinstance(item, BaseException):
                    raise item
                if item.delta_token_ids:
                    member.token_output(time.monotonic())
                if item.finished:
                    member.finished = True
                    member.finish_time = time.monotonic()
                yield index, item
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the group's unfinished requests (idempotent)."""
        for m in self.members:
            if not m.finished:
                m.finished = True
                self.owner.abort(m.request_id)


@dataclass
class Member:
    """One engine request of a group, with the times the server's metrics need."""

    index: int
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    """When the latest output that carried tokens reached the loop."""
    token_gap: float | None = None
    """Seconds between the latest two outputs that carried tokens; None until there are two."""
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    """Set by the engine thread when the request is added, before the group is handed out."""
    finished: bool = False

    def token_output(self, now: float) -> None:
        """Loop: an output carrying tokens arrived at ``now``."""
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            self.token_gap = now - self.last_token_time
        self.last_token_time = now


@dataclass
class _Add:
    group: RequestGroup
    ack: asyncio.Future
    """Settled on the group's loop: None when all were added, else the ValueError that refused them."""


@dataclass
class _Abort:
    request_id: str | None
    """None: every request in the engine."""


@dataclass
class _SwapDraft:
    model: LlamaModel
    version: str
    done: Future
    """Settled by the engine thread: the replaced (model, version), or the error that refused the swap."""


class AsyncEngine:
    """Owns the engine thread; see the module docstring for who may call what."""

    def __init__(self, engine: LLMEngine, max_queue: int = 256) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self._cv = threading.Condition()
        # guarded by _cv:
        self._inbox: list[_Add | _Abort | _SwapDraft] = []
        self._num_pending = 0  # requests in the inbox, not yet seen by the engine
        self._num_waiting = 0  # requests the engine holds but does not run yet
        self._draining = False
        self._stats = EngineStats(num_blocks=engine.num_blocks, num_free_blocks=engine.kv.num_free_blocks,
                                  draft_version=engine.draft_version)
        # A tokenizer saved with truncation or padding switched on resets them on its first encode;
        # do that here, so that the encodes of handler threads and this thread only ever read it.
        engine.tokenizer.encode("warm-up")
        # the keys engine.metrics.speculation will fill, so that /metrics shows them at zero from the start
        keys = [engine.draft_version] if engine.proposer is not None else []
        if engine.spec_policy is not None and engine.spec_policy.ngram is not None:
            keys.append(NGRAM_SOURCE)
        self.speculation_keys: tuple[str, ...] = tuple(keys)
        # engine thread only:
        self._live: dict[str, tuple[RequestGroup, int]] = {}
        self._thread = threading.Thread(target=self._run, name="specserve-engine", daemon=True)
        self._thread.start()

    # ---- any thread ---------------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self):
        """The engine's tokenizer. encode / decode / apply_chat_template are safe from other threads:
        HF fast tokenizers only conflict when truncation or padding settings change, and nobody does."""
        return self.engine.tokenizer

    @property
    def draining(self) -> bool:
        return self._draining

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids as the engine will see them; ValueError names a bad prompt.

        Safe off the engine thread: ``LLMEngine.encode_prompt`` reads only the tokenizer (see
        ``tokenizer``) and the vocabulary size, never the engine's mutable state.
        """
        return self.engine.encode_prompt(prompt)

    def stats(self) -> EngineStats:
        with self._cv:
            return self._stats

    def abort(self, request_id: str) -> None:
        self._post(_Abort(request_id))

    def begin_drain(self) -> None:
        """Refuse new requests from now on; those in flight run to the end, then the thread stops."""
        with self._cv:
            self._draining = True
            self._cv.notify()

    def swap_draft(self, model: LlamaModel, version: str) -> Future:
        """Ask the engine thread to serve ``model`` as draft ``version`` from the next step on.

        The returned future resolves to the replaced ``(model, version)``; it fails with the
        engine's ValueError (vocabulary, KV budget) or ShuttingDownError. Requests in flight go on
        with the new draft: their outputs cannot change, the verifier decides every token.
        """
        done: Future = Future()
        with self._cv:  # once draining, the engine thread may be past its last look at the inbox
            if self._draining or not self._thread.is_alive():
                raise ShuttingDownError("the engine is shutting down; no draft can be swapped in")
            self._inbox.append(_SwapDraft(model, version, done))
            self._cv.notify()
        return done

    def _post(self, command: _Add | _Abort) -> None:
        with self._cv:
            self._inbox.append(command)
            self._cv.notify()

    # ---- event loop ---------------------------------------------------------------------------

    async def add_requests(self, requests: Sequence[tuple[str | list[int], SamplingParams, str]]) -> RequestGroup:
        """Admit (prompt, params, request_id) triples together: all start, or none does.

        Raises ShuttingDownError (draining, or the engine thread is gone), QueueFullError (admitting
        them would leave more than ``max_queue`` requests waiting), or the engine's ValueError for
        the first bad input; all of these before any output is produced.
        """
        group = RequestGroup(self, requests)
        ack = group.loop.create_future()
        with self._cv:
            if self._draining or not self._thread.is_alive():
                raise ShuttingDownError("the server is shutting down and accepts no new requests")
            waiting = self._num_pending + self._num_waiting
            if waiting + len(group.members) > self.max_queue:
                raise QueueFullError(
                    f"{waiting} requests are already waiting and this one adds {len(group.members)}; "
                    f"the queue holds at most {self.max_queue} (--max-queue). Retry later."
                )
            self._num_pending += len(group.members)
            self._inbox.append(_Add(group, ack))
            self._cv.notify()
        try:
            await ack
        except asyncio.CancelledError:  # the client left before the engine took the request
            group.abort()
            raise
        return group

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; closing the iterator early aborts it (frees its KV blocks)."""
        group = await self.add_requests([(prompt, params, request_id)])
        try:
            async for _, out in group.outputs():
                yield out
        finally:
            group.abort()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Drain: refuse new requests, let those in flight finish, then stop the thread.

        After ``timeout`` seconds the requests still running are aborted instead.
        """
        self.begin_drain()
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            self._post(_Abort(None))
            await asyncio.to_thread(self._thread.join, 30.0)

    # ---- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._inbox and not self.engine.has_unfinished() and not self._draining:
                        self._cv.wait()
                    commands, self._inbox = self._inbox, []
                    if self._draining and not commands and not self.engine.has_unfinished():
                        return
                for command in commands:
                    self._apply(command)
                failed = self._step() if self.engine.has_unfinished() else False
                # one publish per turn: until it, the requests just added still count as pending
                self._publish(sum(len(c.group.members) for c in commands if isinstance(c, _Add)), failed)
        except BaseException:  # a bug here must not leave clients hanging: `finally` fails them
            logger.exception("the engine thread stopped")
            raise
        finally:
            with self._cv:
                self._draining = True
                leftover, self._inbox = self._inbox, []
            for command in leftover:
                if isinstance(command, _Add):
                    _settle(command.ack, ShuttingDownError("the engine stopped before taking the request"))
                elif isinstance(command, _SwapDraft):
                    command.done.set_exception(ShuttingDownError("the engine stopped before swapping the draft"))
            self._fail(list(self._live), EngineError("the engine stopped before the request finished"))

    def _apply(self, command: _Add | _Abort | _SwapDraft) -> None:
        if isinstance(command, _SwapDraft):
            self._swap(command)
            return
        if isinstance(command, _Abort):
            if command.request_id is None:  # shutdown ran out of time: tell every client why
                self._fail(list(self._live), ShuttingDownError("the server shut down before the request finished"))
            ids = list(self.engine.requests) if command.request_id is None else [command.request_id]
            for rid in ids:
                self._live.pop(rid, None)
                self.engine.abort_request(rid)
            return
        added = []
        try:
            for m in command.group.members:
                self.engine.add_request(m.prompt, m.params, m.request_id)
                added.append(m)
                m.num_prompt_tokens = self.engine.requests[m.request_id].num_prompt_tokens
        except Exception as e:
            for m in added:
                self.engine.abort_request(m.request_id)
            _settle(command.ack, e if isinstance(e, ValueError) else EngineError(f"could not add the request: {e!r}"))
            return
        for m in added:
            self._live[m.request_id] = (command.group, m.index)
        _settle(command.ack, None)

    def _swap(self, command: _SwapDraft) -> None:
        previous = (self.engine.proposer.runner.model, self.engine.draft_version) if self.engine.proposer else None
        try:
            self.engine.swap_draft(command.model, command.version)
        except Exception as e:
            command.done.set_exception(e)
            return
        if command.version not in self.speculation_keys:  # /metrics shows the new version at zero from now on
            self.speculation_keys = (*self.speculation_keys, command.version)
        command.done.set_result(previous)

    def _step(self) -> bool:
        """One engine step; outputs go to their groups. Returns whether the step failed."""
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed")
            # the running requests shared the failed batch: fail them and keep the waiting ones
            victims = [r.request_id for r in self.engine.scheduler.running] or list(self.engine.requests)
            for rid in victims:
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    logger.exception("could not abort %s after the failed step", rid)
            self._fail(victims, EngineError(f"the engine failed while generating: {e!r}"))
            return True
        for out in outputs:
            target = self._live.pop(out.request_id, None) if out.finished else self._live.get(out.request_id)
            if target is not None:
                group, index = target
                group._put(index, out)
        for rid, error in self.engine.take_failed():  # failed alone; the rest of its batch went on
            self._fail([rid], EngineError(f"the engine failed on this request: {error!r}"))
        return False

    def _fail(self, request_ids: list[str], error: Exception) -> None:
        for rid in request_ids:
            target = self._live.pop(rid, None)
            if target is not None:
                group, index = target
                group._put(index, error)

    def _publish(self, num_added: int, step_failed: bool) -> None:
        scheduler, kv = self.engine.scheduler, self.engine.kv
        metrics = copy.deepcopy(self.engine.metrics)
        with self._cv:
            self._num_pending -= num_added
            self._num_waiting = len(scheduler.waiting)
            self._stats = EngineStats(
                metrics=metrics,
                num_running=len(scheduler.running),
                num_waiting=self._num_waiting + self._num_pending,
                kv_usage=kv.usage,
                num_free_blocks=kv.num_free_blocks,
                num_blocks=self.engine.num_blocks,
                draft_version=self.engine.draft_version,
                step_errors=self._stats.step_errors + int(step_failed),
            )


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    """Engine thread: settle an ack future on its own loop (unless it was cancelled meanwhile)."""

    def settle() -> None:
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    try:
        future.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:
        pass
