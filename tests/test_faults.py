"""Faults and load on a real server: vanishing clients, a failing request, KV exhaustion, a corrupted
draft, and a short soak.

Each server here is uvicorn on a free 127.0.0.1 port in a thread, over a tiny plain engine. After
every scenario the engine must hold nothing: no requests, an empty scheduler, every KV block free,
and no output routes left in the AsyncEngine. SIGTERM draining is tested in test_server.py
(``test_sigterm_drains_and_exits_zero``, ``test_shutdown_drains``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import shutil
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from polling import wait_until

from specserve.cli import main
from specserve.config import CacheConfig, EngineConfig, SchedulerConfig
from specserve.engine import engine as engine_module
from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.engine.engine import LLMEngine
from specserve.server import AsyncEngine, build_app

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "ignore_eos": True}
POISON = "POISON"


def make_engine(tiny, num_blocks: int = 128, max_num_seqs: int = 32) -> LLMEngine:
    config = EngineConfig(
        verifier=tiny["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=num_blocks, block_size=4),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs),
    )
    return LLMEngine(config)


@contextmanager
def serve(engine: LLMEngine, max_queue: int = 64) -> Iterator[tuple[str, AsyncEngine]]:
    async_engine = AsyncEngine(engine, max_queue=max_queue)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(async_engine, "tiny"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started), "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", async_engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive() and not async_engine.is_alive()


def holds_nothing(engine: LLMEngine, async_engine: AsyncEngine) -> bool:
    """No request anywhere: engine, scheduler, KV pool, the AsyncEngine's output routes."""
    s = engine.scheduler
    return (
        not engine.requests
        and not s.running
        and not s.waiting
        and not async_engine._live
        and engine.kv.num_free_blocks == engine.num_blocks
        and not engine.kv.req_blocks
    )


def sse_data(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


async def stream_text(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) of a streamed greedy completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, **GREEDY}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        data = sse_data([line async for line in r.aiter_lines()])
    assert data[-1] == "[DONE]", data
    chunks = [json.loads(d) for d in data[:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    return "".join(c["choices"][0]["text"] for c in chunks), chunks[-1]["choices"][0]["finish_reason"]


# ---- clients that vanish ------------------------------------------------------------------------


def _hang_up_raw(url: str, body: dict) -> None:
    """Send a whole request over a bare socket and close it without reading a byte."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head + payload)


@pytest.mark.integration
def test_clients_vanishing_at_random_points_leak_nothing(tiny):
    engine = make_engine(tiny)
    rng = random.Random(7)
    plan = [rng.choice(["raw", "stream", "wait"]) for _ in range(24)]
    with serve(engine) as (url, async_engine):

        async def vanish(i: int, how: str) -> None:
            body = {"prompt": f"{PROMPT} {i}", "max_tokens": 200, "stream": how != "wait", **GREEDY}
            await asyncio.sleep(rng.uniform(0, 0.3))
            if how == "raw":  # gone before the server even answers
                await asyncio.to_thread(_hang_up_raw, url, body)
            elif how == "stream":  # gone after a random number of events
                async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                    async with http.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        wanted, seen = rng.randrange(0, 6), 0
                        async for line in r.aiter_lines():
                            seen += line.startswith("data: ")
                            if seen > wanted:
                                break
            else:  # not streaming: gives up waiting for the whole completion (450 tokens: ~0.8 s, alone)
                with pytest.raises(httpx.ReadTimeout):
                    async with httpx.AsyncClient(
                        base_url=url, timeout=httpx.Timeout(30, read=rng.uniform(0.05, 0.25))
                    ) as http:
                        await http.post("/v1/completions", json={**body, "max_tokens": 450})

        async def scenario() -> tuple[str, str]:
            await asyncio.gather(*(vanish(i, how) for i, how in enumerate(plan)))
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:  # and the server still serves
                return await stream_text(http, PROMPT, 8)

        aborted = engine.metrics.finished_requests.get("abort", 0)
        text, reason = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
        assert reason == "length" and text
        assert wait_until(lambda: holds_nothing(engine, async_engine)), (engine.requests, engine.kv.num_free_blocks)
        # every vanished request was aborted, none ran on to its 200 tokens
        assert engine.metrics.finished_requests.get("abort", 0) - aborted == len(plan)
        assert engine.metrics.finished_requests.get("length", 0) == 1


# ---- one request fails, the others go on --------------------------------------------------------


class PoisonAtAdd(IncrementalDetokenizer):
    """Fault injection: a detokenizer that cannot be built for prompts containing POISON."""

    def __init__(self, tokenizer, prompt_token_ids, stop) -> None:
        if POISON in tokenizer.decode(prompt_token_ids):
            raise RuntimeError("injected fault: detokenizer setup")
        super().__init__(tokenizer, prompt_token_ids, stop)


class PoisonAtToken(IncrementalDetokenizer):
    """Fault injection: a detokenizer that breaks on the third generated token of prompts containing POISON."""

    def __init__(self, tokenizer, prompt_token_ids, stop) -> None:
        super().__init__(tokenizer, prompt_token_ids, stop)
        self.poisoned = POISON in tokenizer.decode(prompt_token_ids)
        self.added = 0

    def add(self, token_id: int) -> str | None:
        self.added += 1
        if self.poisoned and self.added == 3:
            raise RuntimeError("injected fault: detokenizing")
        return super().add(token_id)


def _assert_engine_error(r: httpx.Response, needle: str) -> None:
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "internal_server_error" and error["code"] == "engine_error" and needle in error["message"]


@pytest.mark.integration
def test_a_request_failing_on_the_engine_thread_fails_alone(tiny, monkeypatch):
    """The engine raises while taking one request in; the streams already running finish untouched."""
    engine = make_engine(tiny)
    prompts = [f"{PROMPT} {i}" for i in range(3)]
    with serve(engine) as (url, async_engine):

        async def scenario() -> tuple[list, list, httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                alone = [await stream_text(http, p, 40) for p in prompts]
                monkeypatch.setattr(engine_module, "IncrementalDetokenizer", PoisonAtAdd)
                running = [asyncio.create_task(stream_text(http, p, 40)) for p in prompts]
                await asyncio.sleep(0.05)
                poisoned = await http.post("/v1/completions", json={"prompt": f"{POISON} x", "max_tokens": 4})
                return alone, await asyncio.gather(*running), poisoned

        alone, together, poisoned = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
        _assert_engine_error(poisoned, "injected fault: detokenizer setup")
        assert together == alone and all(reason == "length" for _, reason in together)
        assert wait_until(lambda: holds_nothing(engine, async_engine))


@pytest.mark.integration
def test_a_request_failing_mid_generation_fails_alone(tiny, monkeypatch):
    """A detokenizer that breaks on one request's third token: that request gets a 500 (non-streaming) or an
    error event (streaming); the requests sharing its batch, and those queued behind it, complete."""
    engine = make_engine(tiny)
    monkeypatch.setattr(engine_module, "IncrementalDetokenizer", PoisonAtToken)
    with serve(engine) as (url, async_engine):

        async def scenario():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                poisoned = asyncio.create_task(
                    http.post("/v1/completions", json={"prompt": POISON, "max_tokens": 8, **GREEDY})
                )
                await asyncio.sleep(0.05)
                others = [asyncio.create_task(stream_text(http, f"{PROMPT} {i}", 12)) for i in range(3)]
                body = {"prompt": POISON, "max_tokens": 8, "stream": True, **GREEDY}
                async with http.stream("POST", "/v1/completions", json=body) as r:
                    streamed = sse_data([line async for line in r.aiter_lines()])
                return await poisoned, await asyncio.gather(*others), streamed

        poisoned, others, streamed = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
        _assert_engine_error(poisoned, "injected fault: detokenizing")
        assert all(text and reason == "length" for text, reason in others)
        *_, error, done = streamed
        assert done == "[DONE]" and "injected fault: detokenizing" in json.loads(error)["error"]["message"]
        assert wait_until(lambda: holds_nothing(engine, async_engine))


# ---- KV exhaustion ------------------------------------------------------------------------------


@pytest.mark.integration
def test_kv_exhaustion_preempts_instead_of_failing(tiny):
    """24 blocks of 4 tokens; six requests of 8 + 60 tokens need 18 blocks each: they take turns."""
    engine = make_engine(tiny, num_blocks=24)
    prompts = [f"{PROMPT} {i}" for i in range(6)]
    with serve(engine) as (url, async_engine):

        async def scenario() -> tuple[list, list]:
            async with httpx.AsyncClient(base_url=url, timeout=120) as http:
                alone = [await stream_text(http, p, 60) for p in prompts]
                together = await asyncio.gather(*(stream_text(http, p, 60) for p in prompts))
                return alone, list(together)

        preempted = engine.metrics.preemptions
        alone, together = asyncio.run(asyncio.wait_for(scenario(), timeout=300))
        assert engine.metrics.preemptions > preempted
        assert together == alone and all(reason == "length" for _, reason in together)
        assert wait_until(lambda: holds_nothing(engine, async_engine))
        samples = httpx.get(f"{url}/metrics").text
        assert f"specserve_preemptions_total {float(engine.metrics.preemptions)}" in samples


# ---- a corrupted draft --------------------------------------------------------------------------


def test_a_corrupted_draft_is_a_clear_startup_error(tiny, tmp_path, capsys):
    draft = tmp_path / "draft"
    shutil.copytree(tiny["draft"], draft)
    weights = draft / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    args = [
        "serve",
        "--verifier",
        tiny["llama"],
        "--draft",
        str(draft),
        "--dtype",
        "float32",
        "--port",
        "0",
        "--no-traffic-log",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"specserve: error: {str(weights)!r} is not a readable safetensors file" in err
    assert "truncated or corrupted" in err and "Traceback" not in err
    (draft / "config.json").write_text('{"model_type": "llama",')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "specserve: error:" in err and "config.json" in err and "Traceback" not in err


# ---- load and soak ------------------------------------------------------------------------------


def _soak_module():
    spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[1] / "bench" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_soak_reduced(tiny):
    """bench/soak.py's client, reduced for CI: 16 streaming clients for 10 s. No request fails, the KV pool
    is empty afterwards, and resident memory does not run away (a generous bound: this process holds the
    clients and pytest too; the full run, 64 clients x 5 min against a server process, bounds it by 10%)."""
    soak = _soak_module()
    engine = make_engine(tiny, num_blocks=256)
    with serve(engine, max_queue=256) as (url, async_engine):
        report = asyncio.run(soak.soak(url, clients=16, duration=10.0, max_tokens=16, max_requests=5000))
        assert report["failed"] == 0, report["failures"]
        assert report["requests"] > 16 and report["idle_after"]
        assert report["kv_free_blocks_after"] == report["kv_blocks"] == engine.num_blocks
        assert report["rss_growth_pct"] < 25.0, report
        assert wait_until(lambda: holds_nothing(engine, async_engine))
