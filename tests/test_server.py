"""The HTTP server on tiny models: OpenAI shapes, streaming, errors, disconnects, metrics, drain.

Most tests go through FastAPI's TestClient on a plain engine; the metrics test loads a draft
(speculative steps are slow on the CPU: the Triton interpreter runs the rejection sampler), and
the disconnect test and the official `openai` client run against a real uvicorn on a free
local port.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient

from specserve import SamplingParams
from specserve.config import CacheConfig, EngineConfig, SpeculativeConfig
from specserve.engine.engine import LLMEngine
from specserve.server import AsyncEngine, build_app
from specserve.server.async_engine import ShuttingDownError

MODEL = "tiny"
PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "ignore_eos": True}


def make_engine(tiny, draft: bool) -> LLMEngine:
    speculative = SpeculativeConfig(draft=tiny["draft"], num_speculative_tokens=2) if draft else SpeculativeConfig()
    config = EngineConfig(verifier=tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=64, block_size=4),
                          speculative=speculative)
    return LLMEngine(config)


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def events(text: str) -> list[str]:
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.startswith("data: ")]


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

LONG = "word " * 600


@pytest.mark.parametrize(
    "path, body, status, needle",
    [
        ("/v1/completions", {"prompt": ""}, 400, "prompt must not be empty"),
        ("/v1/completions", {"prompt": []}, 400, "prompt must not be empty"),
        ("/v1/completions", {"prompt": LONG}, 400, "the context holds 256"),
        ("/v1/completions", {"prompt": [5, 99999]}, 400, "99999"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, 400, "max_tokens must be an integer >= 1, got 0"),
        ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, 400, "temperature must be >= 0, got -1"),
        ("/v1/completions", {"prompt": PROMPT, "top_p": 2}, 400, "top_p must be in (0, 1], got 2"),
        ("/v1/completions", {"prompt": PROMPT, "n": 0}, 400, "got 0"),
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 2}, 400, "logprobs is not supported"),
        ("/v1/completions", {"prompt": PROMPT, "model": "gpt-9"}, 404, "'gpt-9' does not exist"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "'hello'"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages must be a non-empty list"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400,
         "got -1"),
        ("/v1/completions", {"prompt": PROMPT, "n": 9}, 429, "at most 8"),  # more choices than the queue holds
    ],
)
def test_bad_input_gives_openai_error(client, path, body, status, needle):
    r = client.post(path, json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert needle in error["message"], error


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
        text = client.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    drafted = [v for k, v in samples.items() if k.startswith("specserve_spec_decode_num_draft_tokens_total{")]
    assert drafted and drafted[0] > 0
    assert any(k.startswith("specserve_spec_decode_num_accepted_tokens_per_pos_total{") for k in samples)
    assert any(k.startswith("specserve_spec_decode_mean_acceptance_length{") for k in samples)
    assert samples['specserve_requests_finished_total{finish_reason="length"}'] >= 1
    assert samples["specserve_generation_tokens_total"] == 5
    assert samples["specserve_time_to_first_token_seconds_count"] >= 1
    assert samples["specserve_e2e_request_latency_seconds_count"] >= 1
    for name in ("specserve_num_requests_running", "specserve_num_requests_waiting", "specserve_kv_cache_usage_ratio"):
        assert name in samples


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


@pytest.fixture(scope="module")
def live(tiny):
    engine = make_engine(tiny, draft=False)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = build_app(AsyncEngine(engine), MODEL, api_key="sk-live-key")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started), "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", engine
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()
    assert not thread.is_alive()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_kv_blocks(live, stream):
    url, engine = live
    aborted = engine.metrics.finished_requests.get("abort", 0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 230, "stream": stream, **GREEDY}
    headers = {"Authorization": "Bearer sk-live-key"}
    if stream:  # read the first event, then hang up
        with httpx.Client(timeout=10) as http, http.stream("POST", f"{url}/v1/completions", json=body,
                                                           headers=headers) as r:
            assert r.status_code == 200
            assert next(line for line in r.iter_lines() if line.startswith("data: "))
    else:  # give up waiting for the whole completion
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(10, read=0.3))
    assert wait_until(lambda: engine.metrics.finished_requests.get("abort", 0) == aborted + 1, timeout=10)
    assert wait_until(lambda: engine.kv.num_free_blocks == engine.num_blocks)


def test_official_openai_client(live):
    url, _ = live
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-live-key", max_retries=0, timeout=30)
    assert [m.id for m in client.models.list()] == [MODEL]
    c = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert c.choices[0].finish_reason == "length" and c.usage.completion_tokens == 6
    messages = [{"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage = [], None
    for chunk in stream:
        parts += [ch.delta.content or "" for ch in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(parts) == whole.choices[0].message.content
    assert usage.completion_tokens == whole.usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-nope", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
