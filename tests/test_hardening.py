"""Access and abuse: API keys, rate limits, request limits, and extraction monitoring.

Rate limits and the extraction monitor run on an injected clock, so that nothing here sleeps: a
test moves the clock instead. Requests go through FastAPI's TestClient on a tiny plain engine.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
from fastapi.testclient import TestClient

from specserve.cli import access_config, build_parser, main
from specserve.config import CacheConfig, EngineConfig
from specserve.engine.engine import LLMEngine
from specserve.server import AsyncEngine, build_app
from specserve.server.auth import AccessConfig, APIKey, load_keys, parse_keys
from specserve.server.extraction import ExtractionConfig, ExtractionMonitor, normalise
from specserve.server.limits import LimitsConfig, RateLimiter, RateLimitExceeded

MODEL = "tiny"
PROMPT = "The quick brown fox"  # 8 tokens
GREEDY = {"temperature": 0, "ignore_eos": True}
KEYS = [
    {"name": "alice", "key": "sk-alice-0123456789", "requests_per_minute": 3},
    {"name": "bob", "key": "sk-bob-0123456789", "tokens_per_minute": 100, "log_traffic": False},
    {"name": "carol", "key": "sk-carol-0123456789"},
]
ADMIN = "sk-admin-0123456789"
SECRETS = [k["key"] for k in KEYS] + [ADMIN]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {next(k['key'] for k in KEYS if k['name'] == name)}"}


class StateProbe:
    """ASGI middleware that keeps the request.state each /v1 call leaves behind (what a traffic log would read)."""

    def __init__(self, app) -> None:
        self.app = app
        self.seen: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http":
            self.seen.append(dict(scope.get("state", {})))


@pytest.fixture(scope="module")
def engine(tiny):
    config = EngineConfig(verifier=tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=64, block_size=4))
    return LLMEngine(config)


@pytest.fixture(scope="module")
def async_engine(engine):
    a = AsyncEngine(engine, max_queue=16)
    yield a
    a.begin_drain()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(async_engine, clock):
    """A fresh app (fresh buckets and monitor) over the shared engine; no lifespan, so the engine lives on."""
    access = AccessConfig.build(parse_keys(json.dumps(KEYS), "test keys"), admin_key=ADMIN)
    limits = LimitsConfig(max_body_bytes=4096, max_prompt_tokens=64, max_output_tokens=40)
    app = build_app(async_engine, MODEL, access=access, limits=limits, clock=clock)
    probe = StateProbe(app)
    return TestClient(probe), probe


def complete(client: TestClient, name: str, **body):
    return client.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, **body}, headers=auth(name))


def assert_openai_error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


# ---- keys -----------------------------------------------------------------------------------------


def test_key_file_format_and_errors(tmp_path):
    keys = parse_keys(json.dumps(KEYS), "test keys")
    assert [k.name for k in keys] == ["alice", "bob", "carol"]
    assert keys[0].requests_per_minute == 3 and keys[1].tokens_per_minute == 100
    assert keys[1].log_traffic is False and keys[0].log_traffic is True
    # the key is kept only as a digest: neither the object nor its id show it
    for key, secret in zip(keys, SECRETS):
        assert key.key_id.startswith("key-") and len(key.key_id) == 16
        assert secret not in repr(key) and secret not in key.key_id and secret.encode() not in key.digest
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    assert load_keys(str(path)) == keys
    bad = [
        ("[{", "not valid JSON"),
        ('{"name": "a", "key": "b"}', "must hold a JSON list"),
        ('[{"name": "a"}]', "must be an object with 'name' and 'key'"),
        ('[{"name": "a", "key": "b", "log_trafic": false}]', "unknown fields ['log_trafic']"),
        ('[{"name": "a", "key": "  "}]', "'a' has an empty key"),
        ('[{"name": "a", "key": "b", "requests_per_minute": 0}]', "requests_per_minute must be an integer >= 1, got 0"),
        ('[{"name": "a", "key": "b", "log_traffic": "no"}]', "log_traffic must be true or false, got 'no'"),
    ]
    for text, needle in bad:
        with pytest.raises(ValueError, match=None) as e:
            parse_keys(text, "test keys")
        assert needle in str(e.value), (text, str(e.value))
    with pytest.raises(ValueError, match="names must be unique"):
        AccessConfig(keys + (APIKey.from_secret("alice", "sk-other"),))
    with pytest.raises(ValueError, match=r"\['alice', 'x'\] have the same key"):
        AccessConfig(keys + (APIKey.from_secret("x", KEYS[0]["key"]),))
    with pytest.raises(ValueError, match="admin key must differ"):
        AccessConfig.build(keys, admin_key=KEYS[0]["key"])
    with pytest.raises(ValueError, match="cannot read the API keys file"):
        load_keys(str(tmp_path / "missing.json"))


def test_serve_refuses_a_bad_key_file_before_loading_models(tmp_path, capsys, monkeypatch):
    path = tmp_path / "keys.json"
    path.write_text('[{"name": "a", "key": "sk-1", "tokens_per_minut": 5}]')
    assert main(["serve", "--api-keys-file", str(path), "--verifier", str(tmp_path / "no-model")]) == 2
    assert "unknown fields ['tokens_per_minut']" in capsys.readouterr().err
    # the environment variable takes the same JSON
    monkeypatch.setenv("SPECSERVE_API_KEYS", "not json")
    assert main(["serve", "--verifier", str(tmp_path / "no-model")]) == 2
    assert "$SPECSERVE_API_KEYS is not valid JSON" in capsys.readouterr().err


def test_serve_flags_build_the_access_and_limits_configs(tmp_path, monkeypatch):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(KEYS))
    for variable in ("SPECSERVE_ADMIN_KEY", "SPECSERVE_API_KEY", "SPECSERVE_API_KEYS"):
        monkeypatch.delenv(variable, raising=False)
    argv = [
        "serve",
        "--api-keys-file",
        str(path),
        "--api-key",
        "sk-single-0123",
        "--admin-key",
        ADMIN,
        "--requests-per-minute",
        "30",
        "--tokens-per-minute",
        "9000",
        "--max-body-bytes",
        "2048",
        "--max-prompt-tokens",
        "100",
        "--max-output-tokens",
        "50",
    ]
    access, limits = access_config(build_parser().parse_args(argv))
    assert [k.name for k in access.keys] == ["alice", "bob", "carol", "default"]
    assert access.authenticate("sk-single-0123").name == "default" and access.is_admin(ADMIN)
    assert limits == LimitsConfig(
        max_body_bytes=2048, max_prompt_tokens=100, max_output_tokens=50, requests_per_minute=30, tokens_per_minute=9000
    )
    monkeypatch.setenv("SPECSERVE_API_KEYS", json.dumps(KEYS[:1]))  # the file wins over the variable
    assert len(access_config(build_parser().parse_args(argv[:3]))[0].keys) == 3
    access, limits = access_config(build_parser().parse_args(["serve"]))
    assert [k.name for k in access.keys] == ["alice"] and access.admin is None and limits == LimitsConfig()
    with pytest.raises(ValueError, match="requests_per_minute must be >= 1"):
        access_config(build_parser().parse_args(["serve", "--requests-per-minute", "0"]))


def test_each_key_gets_in_and_its_settings_reach_the_handlers(server, caplog):
    client, probe = server
    caplog.set_level(logging.DEBUG)
    for name in ("alice", "bob", "carol"):
        r = complete(client, name, max_tokens=2, **GREEDY)
        assert r.status_code == 200, r.text
        key = probe.seen[-1]["api_key"]
        assert key.name == name and key.log_traffic is (name != "bob")
    wrong = assert_openai_error(
        client.get("/v1/models", headers={"Authorization": "Bearer sk-alice-0123456780"}), 401, "invalid_api_key"
    )
    assert "sk-alice-0123456780" not in wrong["message"] and "6780" in wrong["message"]  # masked, as OpenAI does
    assert_openai_error(client.post("/v1/completions", json={"prompt": PROMPT}), 401, "invalid_api_key")
    assert_openai_error(client.get("/v1/models", headers={"Authorization": ADMIN}), 401)  # no 'Bearer'
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    # neither the server's logs nor its metrics ever carry a key
    text = caplog.text + client.get("/metrics").text
    assert not [s for s in SECRETS if s in text]


def test_open_server_calls_everyone_anonymous(async_engine):
    probe = StateProbe(build_app(async_engine, MODEL))
    r = TestClient(probe).post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1})
    assert r.status_code == 200
    key = probe.seen[-1]["api_key"]
    assert key.key_id == "anonymous" and key.log_traffic is True


# ---- rate limits ------------------------------------------------------------------------------------


def test_requests_per_minute(server, clock):
    client, _ = server
    for _ in range(3):  # alice: 3 requests per minute, a bucket of 3 refilled at one every 20 s
        assert complete(client, "alice", max_tokens=1).status_code == 200
    r = complete(client, "alice", max_tokens=1)
    error = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error" and "requests per minute: limit 3" in error["message"]
    assert r.headers["Retry-After"] == "20"
    assert complete(client, "carol", max_tokens=1).status_code == 200  # other keys are not affected
    clock.now += 10
    assert complete(client, "alice", max_tokens=1).headers["Retry-After"] == "10"
    clock.now += 10
    assert complete(client, "alice", max_tokens=1).status_code == 200
    samples = client.get("/metrics").text
    alice = AccessConfig.build(parse_keys(json.dumps(KEYS), "k")).keys[0].key_id
    assert f'specserve_rate_limited_requests_total{{key_id="{alice}",limit="requests"}} 2.0' in samples


def test_tokens_per_minute_reserve_and_settle(server, clock, engine):
    client, _ = server
    # bob: 100 tokens per minute. A request reserves prompt (8) + max_tokens (40) = 48.
    assert complete(client, "bob", max_tokens=40, **GREEDY).status_code == 200  # used all 48: 52 left
    assert complete(client, "bob", max_tokens=40, **GREEDY).status_code == 200  # 4 left
    r = complete(client, "bob", max_tokens=40, **GREEDY)
    error = assert_openai_error(r, 429, "rate_limit_exceeded")
    assert "tokens per minute: limit 100" in error["message"]
    assert r.headers["Retry-After"] == "27"  # (48 - 4) tokens at 100 / 60 per second: 26.4 s
    clock.now += 60  # full again
    # a request that stops after one token is charged 8 + 1, not the 48 it reserved
    first = engine.tokenizer.encode(complete(client, "carol", max_tokens=1, **GREEDY).json()["choices"][0]["text"])
    stopped = complete(client, "bob", max_tokens=40, temperature=0, stop_token_ids=first)
    assert stopped.status_code == 200 and stopped.json()["usage"]["completion_tokens"] == 1
    assert complete(client, "bob", max_tokens=40, **GREEDY).status_code == 200  # 91 - 48: fits only if settled
    # more than the whole minute's budget can never pass: a 400 that says so, not a 429 to retry forever
    error = assert_openai_error(complete(client, "bob", max_tokens=40, n=3, **GREEDY), 400)
    assert "more than the 100 tokens per minute" in error["message"]


def test_token_bucket_unit():
    clock = Clock()
    limiter = RateLimiter(clock)
    r = limiter.reserve("k", None, 60, 50)  # 60 per minute = 1 per second
    with pytest.raises(RateLimitExceeded) as e:
        limiter.reserve("k", None, 60, 20)
    assert e.value.limit == "tokens" and e.value.retry_after == pytest.approx(10.0)
    r.settle(40)  # used 40 of the 50: 10 come back
    limiter.reserve("k", None, 60, 20).cancel()  # refused later (e.g. queue full): everything comes back
    clock.now += 5
    limiter.reserve("k", None, 60, 25)  # 20 + 5 refilled
    assert limiter.rejections() == {("k", "tokens"): 1}


# ---- request limits ---------------------------------------------------------------------------------


def test_body_prompt_and_output_limits(server, engine):
    client, _ = server
    big = {"model": MODEL, "prompt": "x" * 5000}
    error = assert_openai_error(client.post("/v1/completions", json=big, headers=auth("carol")), 413)
    assert "at most 4096 bytes" in error["message"]

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = client.post("/v1/completions", content=chunked(), headers={**auth("carol"), "content-type": "application/json"})
    assert_openai_error(r, 413)
    long_prompt = engine.tokenizer.encode("word " * 40)[:65]
    error = assert_openai_error(complete(client, "carol", prompt=long_prompt), 400)
    assert (
        error["param"] == "prompt"
        and "prompt is 65 tokens; this server accepts prompts of at most 64" in error["message"]
    )
    error = assert_openai_error(complete(client, "carol", max_tokens=41), 400)
    assert error["param"] == "max_tokens" and "generates at most 40 tokens" in error["message"]
    messages = [{"role": "user", "content": "hi"}]
    body = {"messages": messages, "max_completion_tokens": 41}
    error = assert_openai_error(client.post("/v1/chat/completions", json=body, headers=auth("carol")), 400)
    assert error["param"] == "max_completion_tokens"
    # a chat without max_tokens may use the room the prompt leaves, but no more than the limit
    r = client.post("/v1/chat/completions", json={"messages": messages, **GREEDY}, headers=auth("carol"))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40


# ---- the admin endpoint -----------------------------------------------------------------------------


def test_admin_endpoint_needs_the_admin_key(server, async_engine):
    client, _ = server
    assert_openai_error(client.get("/admin/extraction"), 401)
    assert_openai_error(client.get("/admin/extraction", headers={"Authorization": "Bearer sk-guess"}), 401)
    assert_openai_error(client.get("/admin/extraction", headers=auth("carol")), 403, "not_admin")
    complete(client, "carol", max_tokens=1)
    r = client.get("/admin/extraction", headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 200
    (carol,) = r.json()["keys"]
    assert carol["name"] == "carol" and carol["requests"] == 1 and carol["flagged"] is False
    assert r.json()["config"]["min_requests"] == ExtractionConfig().min_requests
    without = TestClient(build_app(async_engine, MODEL, api_key="sk-only"))
    r = without.get("/admin/extraction", headers={"Authorization": "Bearer sk-only"})
    assert_openai_error(r, 403, "admin_disabled")


# ---- extraction monitoring --------------------------------------------------------------------------

TOPICS = [
    "photosynthesis",
    "gravity",
    "the french revolution",
    "black holes",
    "compilers",
    "inflation",
    "dna replication",
    "volcanoes",
    "neural networks",
    "the roman empire",
    "plate tectonics",
    "jazz",
]
TEMPLATES = [
    "Explain {} in detail, step by step, for a student.",
    "Write three exam questions about {} with their answers.",
    "Summarise the key facts about {} in {} bullet points.",
]
HUMAN = [
    "hey can you help me write an email to my landlord about the broken heater?",
    "what's a good recipe for dinner tonight with chickpeas",
    "why is the sky blue",
    "fix this python: for i in range(10) print(i)",
    "Tell me a joke about cats",
    "how do I get to the airport from downtown by train",
    "what does 'ephemeral' mean",
    "summarise the plot of hamlet",
    "is coffee bad for you",
    "ideas for a 7 year old's birthday party",
    "what's the capital of australia",
    "explain how vaccines work",
    "translate good morning into german",
    "my plant's leaves are turning yellow, what am I doing wrong?",
    "write a haiku about autumn rain",
    "compare renting and buying a flat in a big city",
    "what is the difference between TCP and UDP",
]


def scripted(i: int) -> str:
    """An extraction script: templates x topics, with numbers that differ every time."""
    return TEMPLATES[i % 3].format(TOPICS[(i // 3) % len(TOPICS)], 3 + i % 5) + f" (item {i})"


def test_normalise_masks_what_varies():
    assert (
        normalise('Translate "hello there" to French, item 42.5 at https://x.y/z')
        == "translate <q> to french, item <n> at <url>"
    )
    assert normalise("What is 17 + 25?") == normalise("what is 3 + 4?")
    assert normalise("don't 'quote' me") == "don't <q> me"


def test_scripted_extraction_is_flagged_and_a_person_is_not():
    monitor = ExtractionMonitor()
    for i in range(200):  # one request every 2 s, like a script on a timer
        monitor.observe("bot", [scripted(i)], now=1000.0 + 2.0 * i)
    rng, t = random.Random(0), 1000.0
    for _ in range(12):  # a few varied prompts at irregular, human gaps
        t += rng.expovariate(1 / 90)
        monitor.observe("person", [rng.choice(HUMAN)], now=t)
    report = {s.key_id: s for s in monitor.report(now=1500.0)}
    bot, person = report["bot"], report["person"]
    assert bot.flagged and set(bot.signals) == {"templated", "regular_timing"}
    assert bot.requests == 200 and bot.distinct_prompts == 200 and bot.templates <= 12
    assert bot.templated_fraction > 0.9 and bot.timing_cv == pytest.approx(0.0, abs=1e-9)
    assert not person.flagged and person.signals == () and person.templated_fraction == 0.0
    assert person.timing_cv is not None and person.timing_cv > 0.5


def test_a_busy_person_is_not_flagged_but_a_busy_timer_is_only_one_signal():
    monitor = ExtractionMonitor()
    rng, t = random.Random(1), 0.0
    for _ in range(80):  # enough volume, but varied prompts at irregular gaps (retries repeat a prompt)
        t += rng.expovariate(1 / 30)
        monitor.observe("busy", [rng.choice(HUMAN)], now=t)
    for i in range(80):  # a health check on a timer: regular, but one prompt over and over, no template fills
        monitor.observe("probe", ["ping"], now=float(i * 30))
    report = {s.key_id: s for s in monitor.report(now=t)}
    assert report["busy"].requests == 80 and not report["busy"].flagged and report["busy"].signals == ()
    assert report["probe"].signals == ("regular_timing",) and not report["probe"].flagged


def test_templates_shared_across_keys_are_flagged_even_at_human_timing():
    monitor = ExtractionMonitor()
    rng, t = random.Random(2), 0.0
    for i in range(120):  # one job split over two accounts, with jittered timing to look human
        t += rng.expovariate(1 / 20)
        monitor.observe("acct-a" if i % 2 else "acct-b", [scripted(i)], now=t)
        monitor.observe("person", [rng.choice(HUMAN)], now=t + 1)
    report = {s.key_id: s for s in monitor.report(now=t + 1)}
    for key in ("acct-a", "acct-b"):
        assert report[key].flagged and set(report[key].signals) == {"templated", "shared_templates"}, report[key]
        assert report[key].shared_fraction > 0.5
    assert not report["person"].flagged and report["person"].shared_fraction == 0.0


def test_the_window_expires_and_stays_bounded():
    config = ExtractionConfig(window_seconds=100.0, max_window_prompts=50)
    monitor = ExtractionMonitor(config)
    for i in range(120):
        monitor.observe("bot", [scripted(i)], now=float(i))
    (bot,) = monitor.report(now=119.0)
    assert bot.prompts == 50 and bot.requests == 50  # the latest 50 only
    assert monitor.report(now=1000.0) == []  # silent for a whole window: forgotten
    with pytest.raises(ValueError, match="similarity must be in"):
        ExtractionConfig(similarity=0)


def test_extraction_over_http(server, clock):
    """A scripted client through the server: the admin endpoint and /metrics flag its key, not the others."""
    client, _ = server
    for i in range(60):
        clock.now += 3.0
        r = client.post("/v1/completions", json={"prompt": scripted(i), "max_tokens": 1}, headers=auth("carol"))
        assert r.status_code == 200, r.text
    for i, asked in enumerate(["why is the sky blue", "Tell me a joke about cats", "is coffee bad for you"]):
        clock.now += 41.0 * (i + 1)
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": asked}]
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1}, headers=auth("bob"))
        assert r.status_code == 200, r.text
    report = client.get("/admin/extraction", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    by_name = {k["name"]: k for k in report["keys"]}
    assert by_name["carol"]["flagged"] and by_name["carol"]["requests"] == 60
    assert not by_name["bob"]["flagged"] and by_name["bob"]["requests"] == 3
    carol = by_name["carol"]["key_id"]
    samples = client.get("/metrics").text
    assert f'specserve_extraction_flagged{{key_id="{carol}"}} 1.0' in samples
    assert f'specserve_extraction_window_requests{{key_id="{carol}"}} 60.0' in samples
    assert f'specserve_extraction_flagged{{key_id="{by_name["bob"]["key_id"]}"}} 0.0' in samples
