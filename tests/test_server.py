"""The HTTP server on tiny models: OpenAI shapes, streaming, errors, disconnects, metrics, drain.

Most tests go through FastAPI's TestClient on a plain engine; the metrics test loads a draft
(speculative steps are slow on the CPU: the Triton interpreter runs the rejection sampler), and
the disconnect tests and the official `openai` client (sync and async) run against a real
uvicorn on a free local port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from polling import wait_until

from specserve import SamplingParams
from specserve.config import CacheConfig, EngineConfig, SpeculativeConfig
from specserve.engine.engine import LLMEngine
from specserve.server import AsyncEngine, build_app
from specserve.server.async_engine import ShuttingDownError
from specserve.server.runner import run_server

MODEL = "tiny"
PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "ignore_eos": True}


def make_engine(tiny, draft: bool, num_blocks: int = 64) -> LLMEngine:
    """64 blocks of 4: a context of 256 tokens."""
    speculative = SpeculativeConfig(draft=tiny["draft"], num_speculative_tokens=2) if draft else SpeculativeConfig()
    config = EngineConfig(verifier=tiny["llama"], dtype="float32",
                          cache=CacheConfig(num_blocks=num_blocks, block_size=4), speculative=speculative)
    return LLMEngine(config)


def events(text: str) -> list[str]:
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.startswith("data: ")]


def scrape(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


@pytest.fixture(scope="module")
def served(tiny):
    engine = make_engine(tiny, draft=False)
    async_engine = AsyncEngine(engine, max_queue=8)
    with TestClient(build_app(async_engine, MODEL)) as client:
        yield client, engine, async_engine
    assert not async_engine.is_alive()  # the app's lifespan stopped the engine thread


@pytest.fixture
def client(served) -> TestClient:
    return served[0]


def complete(client: TestClient, **body) -> dict:
    r = client.post("/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(client: TestClient, **body) -> dict:
    r = client.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


# ---- shapes -------------------------------------------------------------------------------------


def test_completion_shape_and_usage(served):
    client, engine, _ = served
    out = complete(client, prompt=PROMPT, max_tokens=8, **GREEDY)
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion" and out["model"] == MODEL
    assert isinstance(out["created"], int)
    (choice,) = out["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["finish_reason"] == "length"
    prompt_tokens = len(engine.tokenizer.encode(PROMPT))
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 8, "total_tokens": prompt_tokens + 8}
    # token-id prompts and a batch of prompts
    by_ids = complete(client, prompt=engine.tokenizer.encode(PROMPT), max_tokens=8, **GREEDY)
    assert by_ids["choices"][0]["text"] == choice["text"]
    batch = complete(client, prompt=[PROMPT, "To"], max_tokens=4, **GREEDY)
    assert [c["index"] for c in batch["choices"]] == [0, 1]


def test_chat_shape_and_usage(served):
    client, engine, _ = served
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    out = chat(client, messages=messages, max_tokens=6, **GREEDY)
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(engine.tokenizer.encode(text, add_special_tokens=False))
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 6, "total_tokens": prompt_tokens + 6}


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert client.get("/health").json() == {"status": "ok"}


def test_models_and_responses_name_the_numerics_mode(client):
    """A float32 engine without speculation: greedy and seeded outputs are both promised reproducible."""
    (card,) = client.get("/v1/models").json()["data"]
    assert card["numerics"] == {"dtype": "float32", "batch_invariant": False, "speculation_length": "none",
                                "greedy_equals_plain": True, "seeded_reproducible": True}  # fmt: skip
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **GREEDY})
    assert r.headers["x-specserve-numerics"] == (
        "dtype=float32; batch-invariant=no; greedy-equals-plain=yes; seeded-reproducible=yes; speculation-length=none"
    )
    bad = client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": -1})
    assert bad.status_code == 400 and "x-specserve-numerics" in bad.headers  # errors carry it too
    assert "x-specserve-numerics" not in client.get("/health").headers


# ---- streaming ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [GREEDY, {"temperature": 1.0, "seed": 3, "ignore_eos": True}])
def test_completion_stream_concatenates_to_the_same_text(client, sampling):
    body = {"prompt": PROMPT, "max_tokens": 12, **sampling}
    whole = complete(client, **body)
    r = client.post("/v1/completions", json={"model": MODEL, **body, "stream": True,
                                             "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = events(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    *text_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == whole["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]


def test_chat_stream(client):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 10, **GREEDY}
    whole = chat(client, **body)
    r = client.post("/v1/chat/completions", json={"model": MODEL, **body, "stream": True})
    data = events(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


# ---- sampling options ---------------------------------------------------------------------------


def test_stop_string(client):
    text = complete(client, prompt=PROMPT, max_tokens=16, **GREEDY)["choices"][0]["text"]
    stop = text[4:6]
    assert stop.strip(), f"the tiny model's greedy text {text!r} has no usable stop string"
    out = complete(client, prompt=PROMPT, max_tokens=16, stop=[stop], **GREEDY)
    assert out["choices"][0]["text"] == text[: text.index(stop)]
    assert out["choices"][0]["finish_reason"] == "stop"


def test_n_choices(client):
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    one = complete(client, **body)
    two = complete(client, n=2, **body)
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["choices"][0]["text"] == one["choices"][0]["text"]  # choice 0 keeps the seed
    assert two["usage"]["completion_tokens"] == 16
    assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counts once
    messages = [{"role": "user", "content": "Hi"}]
    streamed = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "n": 2,
                                                         "max_tokens": 4, "stream": True, **GREEDY})
    chunks = [json.loads(d) for d in events(streamed.text)[:-1]]
    finishes = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finishes == [0, 1]


# ---- errors -------------------------------------------------------------------------------------

LONG = "word " * 600  # 2401 tokens: beyond the context of every engine here
HI = [{"role": "user", "content": "hi"}]
ERROR_CASES = [
    ("/v1/completions", {"prompt": ""}, 400, "prompt must not be empty"),
    ("/v1/completions", {"prompt": []}, 400, "prompt must not be empty"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt is 2401 tokens; the context holds"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 600}, 400, "(8 in the prompt + 600 in max_tokens)"),
    ("/v1/completions", {"prompt": [PROMPT, LONG]}, 400, "prompt is 2401 tokens"),
    ("/v1/completions", {"prompt": [5, 99999]}, 400, "99999"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens must be an integer >= 1, got 0"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, 400, "temperature must be >= 0, got -1"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 2}, 400, "top_p must be in (0, 1], got 2"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "got 0"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 6}, 400, "logprobs must be an integer in [0, 5], got 6"),
    ("/v1/completions", {"prompt": PROMPT, "model": "gpt-9"}, 404, "'gpt-9' does not exist"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "'hello'"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages must be a non-empty list"),
    ("/v1/chat/completions", {"messages": HI, "temperature": -1}, 400, "got -1"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 600}, 400, "+ 600 in max_tokens"),
    ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": 600}, 400, "+ 600 in max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "the context holds"),
    ("/v1/completions", {"prompt": PROMPT, "n": 64}, 429, "the queue holds at most"),  # more choices than it holds
]


@pytest.mark.parametrize("path, body, status, needle", ERROR_CASES)
def test_bad_input_gives_openai_error(client, path, body, status, needle):
    r = client.post(path, json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"], error


def test_prompt_plus_max_tokens_must_fit_the_context(served):
    client, engine, _ = served
    assert engine.max_model_len == 256
    ids = engine.tokenizer.encode("word " * 70)
    prompt = ids[:240]  # long prompts leave little room: short generations
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 17, **GREEDY})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    message = r.json()["error"]["message"]
    assert "holds 256 tokens" in message and "(240 in the prompt + 17 in max_tokens)" in message, message
    assert "at most 16" in message
    assert complete(client, prompt=prompt, max_tokens=16, **GREEDY)["usage"]["completion_tokens"] == 16
    # left out, max_tokens is OpenAI's 16, or the room left where that is less
    assert complete(client, prompt=ids[:8], **GREEDY)["usage"]["completion_tokens"] == 16
    assert complete(client, prompt=ids[:250], **GREEDY)["usage"]["completion_tokens"] == 6
    # chat: an explicit max_tokens must fit too; without one the answer may fill the room left
    messages = [{"role": "user", "content": "word " * 58}]
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    m = len(engine.tokenizer.encode(text, add_special_tokens=False))
    assert 230 < m < 256
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 257 - m, **GREEDY})
    assert r.status_code == 400 and f"({m} in the prompt + {257 - m} in max_tokens)" in r.json()["error"]["message"]
    out = chat(client, messages=messages, **GREEDY)
    assert out["usage"] == {"prompt_tokens": m, "completion_tokens": 256 - m, "total_tokens": 256}
    assert out["choices"][0]["finish_reason"] == "length"


def test_malformed_json_and_unknown_route(client):
    r = client.post("/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]


def test_api_key(served):
    _, _, async_engine = served
    guarded = TestClient(build_app(async_engine, MODEL, api_key="sk-right-key"))  # no lifespan: shares the engine
    r = guarded.get("/v1/models", headers={"Authorization": "Bearer sk-wrong-key"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert "-key" in r.json()["error"]["message"] and "sk-wrong-key" not in r.json()["error"]["message"]
    assert guarded.post("/v1/completions", json={"prompt": PROMPT}).status_code == 401
    assert guarded.get("/v1/models", headers={"Authorization": "Bearer sk-right-key"}).status_code == 200
    assert guarded.get("/health").status_code == 200


def test_engine_failure_is_a_500_and_serving_goes_on(served):
    client, engine, _ = served
    real = engine.execute

    def fail_once(plan):
        engine.execute = real
        raise RuntimeError("injected fault")

    engine.execute = fail_once
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **GREEDY})
    assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "internal_server_error"
    engine.execute = fail_once  # mid-stream the status line is sent: the error comes as an event
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True, **GREEDY})
    *_, error, done = events(r.text)
    assert "injected fault" in json.loads(error)["error"]["message"] and done == "[DONE]"
    assert complete(client, prompt=PROMPT, max_tokens=4, **GREEDY)["choices"][0]["finish_reason"] == "length"
    assert wait_until(lambda: engine.kv.num_free_blocks == engine.num_blocks)


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_export_speculation(tiny):
    with TestClient(build_app(AsyncEngine(make_engine(tiny, draft=True)), MODEL)) as client:
        complete(client, prompt=PROMPT, max_tokens=5, **GREEDY)
        # the engine thread hands a step's outputs over before it publishes that step's metrics (AsyncEngine:
        # _publish after the outputs): a scrape right after the response may see the step before
        finished = 'specserve_requests_finished_total{finish_reason="length"}'
        assert wait_until(lambda: scrape(client.get("/metrics").text)[finished] >= 1, timeout=10)
        samples = scrape(client.get("/metrics").text)
    draft = f'draft_version="{tiny["draft"]}",source="draft"'  # prometheus_client sorts the labels
    ngram = 'draft_version="none",source="ngram"'  # hybrid: prompt lookup proposes too, without a draft model
    for name in ("specserve_spec_draft_tokens_total", "specserve_spec_accepted_tokens_total",
                 "specserve_spec_verify_steps_total", "specserve_spec_emitted_tokens_total",
                 "specserve_spec_mean_acceptance_length", "specserve_spec_acceptance_rate"):
        assert f"{name}{{{draft}}}" in samples and f"{name}{{{ngram}}}" in samples, name
    assert sum(v for k, v in samples.items() if k.startswith("specserve_spec_draft_tokens_total{")) > 0
    assert sum(v for k, v in samples.items() if k.startswith("specserve_spec_verify_steps_total{")) > 0
    positions = [k for k in samples if k.startswith("specserve_spec_accepted_tokens_per_position_total{")]
    assert positions and all('position="' in k for k in positions)
    assert samples[f'specserve_draft_version{{version="{tiny["draft"]}"}}'] == 1
    assert samples['specserve_kv_cache_usage_ratio{model="verifier"}'] == \
        samples['specserve_kv_cache_usage_ratio{model="draft"}']
    assert samples[finished] == 1
    assert samples["specserve_generation_tokens_total"] == 5
    assert samples["specserve_prompt_tokens_total"] == 8
    assert samples["specserve_time_to_first_token_seconds_count"] == 1
    assert samples["specserve_inter_token_latency_seconds_count"] >= 1  # 5 tokens came in more than one output
    assert samples["specserve_e2e_request_latency_seconds_count"] == 1
    assert samples["specserve_requests_running"] == 0 and samples["specserve_requests_waiting"] == 0


def test_metrics_without_a_draft(client):
    complete(client, prompt=PROMPT, max_tokens=4, **GREEDY)
    samples = scrape(client.get("/metrics").text)
    assert samples['specserve_draft_version{version="none"}'] == 1
    assert 'specserve_kv_cache_usage_ratio{model="verifier"}' in samples
    assert not any('model="draft"' in k or k.startswith("specserve_spec_") for k in samples)
    assert samples["specserve_inter_token_latency_seconds_count"] >= 3  # one token per output: 3 gaps at least


# ---- drain --------------------------------------------------------------------------------------


def test_shutdown_drains(tiny):
    engine = make_engine(tiny, draft=False)

    async def scenario() -> None:
        async_engine = AsyncEngine(engine)
        stream = async_engine.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True), "r0")
        first = await anext(stream)
        shutdown = asyncio.create_task(async_engine.shutdown())
        await asyncio.sleep(0)
        with pytest.raises(ShuttingDownError):
            await async_engine.add_requests([(PROMPT, SamplingParams(), "r1")])
        rest = [out async for out in stream]
        assert (rest or [first])[-1].finish_reason == "length"  # the request in flight finished
        await shutdown
        assert not async_engine.is_alive()
        app = TestClient(build_app(async_engine, MODEL))
        r = app.post("/v1/completions", json={"prompt": PROMPT})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert app.get("/health").status_code == 503

    asyncio.run(scenario())
    assert engine.kv.num_free_blocks == engine.num_blocks


# ---- a real server ------------------------------------------------------------------------------


API_KEY = "sk-live-key"


@pytest.fixture(scope="module")
def live(tiny):
    # 128 blocks of 4 (a 512-token context): 16 concurrent requests fit the pool without preemption
    engine = make_engine(tiny, draft=False, num_blocks=128)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = build_app(AsyncEngine(engine, max_queue=32), MODEL, api_key=API_KEY)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started), "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()
    assert not thread.is_alive()


@pytest.fixture
def sync_client(live) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live[0]}/v1", api_key=API_KEY, max_retries=0, timeout=30) as client:
        yield client


def async_client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.mark.integration
@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_kv_blocks(live, stream):
    url, engine = live
    aborted = engine.metrics.finished_requests.get("abort", 0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 230, "stream": stream, **GREEDY}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if stream:  # read the first event, then hang up
        with httpx.Client(timeout=10) as http, http.stream("POST", f"{url}/v1/completions", json=body,
                                                           headers=headers) as r:
            assert r.status_code == 200
            assert next(line for line in r.iter_lines() if line.startswith("data: "))
    else:  # give up waiting for the whole completion (230 tokens take ~0.4 s alone on the 2-core CPU)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(10, read=0.1))
    assert wait_until(lambda: engine.metrics.finished_requests.get("abort", 0) == aborted + 1, timeout=10)
    assert wait_until(lambda: engine.kv.num_free_blocks == engine.num_blocks)


SEEDED = {"temperature": 1.0, "seed": 11, "max_tokens": 10, "extra_body": {"ignore_eos": True}}
MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.mark.integration
def test_openai_client_sync(sync_client):
    client = sync_client
    assert [m.id for m in client.models.list()] == [MODEL]
    whole = client.completions.create(model=MODEL, prompt=PROMPT, **SEEDED)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10
    parts = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=PROMPT, stream=True,
                                                                   **SEEDED)]
    assert "".join(parts) == whole.choices[0].text
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, **SEEDED)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, **SEEDED)
    parts, usage = [], None
    for chunk in stream:
        parts += [ch.delta.content or "" for ch in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == whole.choices[0].message.content
    assert usage == whole.usage
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{client.base_url}", api_key="sk-nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)


async def _stream_text(client: openai.AsyncOpenAI, prompt: str, chat: bool, **kwargs) -> str:
    if chat:
        stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                      stream=True, **kwargs)
        return "".join([ch.delta.content or "" async for chunk in stream for ch in chunk.choices])
    stream = await client.completions.create(model=MODEL, prompt=prompt, stream=True, **kwargs)
    return "".join([ch.text async for chunk in stream for ch in chunk.choices])


@pytest.mark.integration
def test_openai_client_async(live):
    async def scenario() -> None:
        async with async_client(live[0]) as client:
            whole = await client.completions.create(model=MODEL, prompt=PROMPT, **SEEDED)
            assert await _stream_text(client, PROMPT, chat=False, **SEEDED) == whole.choices[0].text
            whole = await client.chat.completions.create(model=MODEL, messages=MESSAGES, **SEEDED)
            assert await _stream_text(client, "Hello", chat=True, **SEEDED) == whole.choices[0].message.content

    asyncio.run(asyncio.wait_for(scenario(), timeout=120))


@pytest.mark.integration
def test_concurrent_streams_match_sequential(live):
    url, engine = live
    prompts = [f"{word} {i}" for i, word in enumerate(["The", "Speculative", "def", "Natalia"] * 4)]
    greedy = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}

    async def scenario() -> tuple[list[str], list[str]]:
        async with async_client(url) as client:
            requests = [(p, i % 2 == 1) for i, p in enumerate(prompts)]  # completions and chats, interleaved
            alone = [await _stream_text(client, p, chat, **greedy) for p, chat in requests]
            together = await asyncio.gather(*(_stream_text(client, p, chat, **greedy) for p, chat in requests))
            return alone, list(together)

    alone, together = asyncio.run(asyncio.wait_for(scenario(), timeout=180))
    assert len(set(alone)) > 1 and all(alone)
    assert together == alone
    assert wait_until(lambda: engine.kv.num_free_blocks == engine.num_blocks)


@pytest.mark.integration
def test_serving_goes_on_after_errors(live, sync_client):
    url, _ = live
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
        for path, body, status, _ in ERROR_CASES:
            r = http.post(path, json={"model": MODEL, **body})
            assert r.status_code == status, (path, body, r.text)
    c = sync_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 4



@pytest.mark.integration
def test_sigterm_drains_and_exits_zero(tiny):
    """run_server in this (main) thread, a client in another: SIGTERM mid-stream, the stream still finishes."""
    engine = make_engine(tiny, draft=False)
    async_engine = AsyncEngine(engine)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url, seen = f"http://127.0.0.1:{port}", {}
    reraised = []

    def client() -> None:
        try:
            assert wait_until(lambda: _healthy(url), timeout=30)
            body = {"prompt": PROMPT, "max_tokens": 40, "stream": True, **GREEDY}
            with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                os.kill(os.getpid(), signal.SIGTERM)  # mid-stream: the request in flight still finishes
                seen["data"] = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        finally:
            if "data" not in seen:  # never leave the server running
                os.kill(os.getpid(), signal.SIGTERM)

    # stock uvicorn re-raises the signal after its shutdown; had run_server done so, this records it
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: reraised.append(sig))
    thread = threading.Thread(target=client, daemon=True)
    try:
        thread.start()
        status = run_server(build_app(async_engine, MODEL), async_engine, "127.0.0.1", port, "warning")
        thread.join(timeout=30)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 0 and not reraised and not async_engine.is_alive()
    data = seen["data"]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"
    assert engine.kv.num_free_blocks == engine.num_blocks


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
