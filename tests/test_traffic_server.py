"""The traffic log in the server, on tiny models: what a served request leaves in the store, opted-out
keys, an unwritable store, the `specserve traffic` commands, and `specserve distill --traffic`."""

from __future__ import annotations

import json
import os

import pytest
import torch
from fastapi.testclient import TestClient
from tiny_models import CORPUS

from specserve.cli import main
from specserve.config import CacheConfig, EngineConfig
from specserve.engine.engine import LLMEngine
from specserve.server import AsyncEngine, build_app
from specserve.server.auth import AccessConfig, APIKey
from specserve.server.traffic_log import TrafficLog
from specserve.traffic import open_store

MODEL = "tiny"
TOPM = 5
GREEDY = {"temperature": 0, "ignore_eos": True}
ALICE, BOB = "sk-alice-0123456789", "sk-bob-0123456789"
KEYS = (APIKey.from_secret("alice", ALICE), APIKey.from_secret("bob", BOB, log_traffic=False))


def make_engine(verifier: str, trace_topm: int = TOPM) -> LLMEngine:
    config = EngineConfig(
        verifier=verifier, dtype="float32", cache=CacheConfig(num_blocks=128, block_size=4), trace_topm=trace_topm
    )
    return LLMEngine(config)


def scrape(text: str) -> dict[str, float]:
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def post(client: TestClient, key: str, path: str = "/v1/completions", **body) -> dict:
    r = client.post(path, json={"model": MODEL, **body}, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r


def test_served_requests_land_in_the_store_unless_opted_out(tiny, tmp_path):
    url = f"sqlite://{tmp_path}/data/traffic.db"
    traffic = TrafficLog.open(url)
    engine = make_engine(tiny["llama"])
    prompt = engine.tokenizer.encode("The quick brown fox")
    app = build_app(AsyncEngine(engine), MODEL, access=AccessConfig(KEYS), traffic=traffic)
    with TestClient(app) as client:
        out = post(client, ALICE, prompt=prompt, max_tokens=8, **GREEDY).json()
        post(client, BOB, prompt=prompt, max_tokens=8, **GREEDY)  # opted out: not logged
        stream = post(
            client,
            ALICE,
            "/v1/chat/completions",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            stream=True,
            **GREEDY,
        )
        assert stream.text.rstrip().endswith("data: [DONE]")
        traffic.store.flush(timeout=30)
        metrics = scrape(client.get("/metrics").text)
    assert metrics["specserve_traffic_records_written_total"] == 2
    assert metrics["specserve_traffic_records_dropped_total"] == 0
    assert metrics["specserve_traffic_write_errors_total"] == 0

    with open_store(url) as store:  # the lifespan closed the server's store; the file keeps the records
        completion, chat = store.read()
    assert completion.key_id == chat.key_id == KEYS[0].key_id  # the hashed key id, never the key
    assert completion.prompt_token_ids == prompt
    assert len(completion.output_token_ids) == 8 == out["usage"]["completion_tokens"]
    # (the served text withholds a trailing partial UTF-8 character: random tiny models emit those)
    assert engine.tokenizer.decode(completion.output_token_ids).startswith(out["choices"][0]["text"])
    assert completion.topm_ids.shape == (8, TOPM) == completion.topm_logprobs.shape
    assert completion.topm_ids[:, 0].tolist() == completion.output_token_ids  # greedy: the verifier's top-1
    logprobs = completion.topm_logprobs
    assert torch.all(logprobs <= 0) and torch.all(logprobs[:, :-1] >= logprobs[:, 1:])
    assert sum(a + 1 for _, _, a in completion.steps) == 8 and {s for s, _, _ in completion.steps} == {"none"}
    assert completion.draft_version == engine.draft_version
    assert len(chat.output_token_ids) == 6 and chat.topm_ids.shape == (6, TOPM)


def test_unwritable_store_leaves_the_server_serving(tiny, tmp_path, caplog):
    if os.geteuid() == 0:
        url = "sqlite:///proc/specserve-traffic/traffic.db"  # root writes anywhere on disk, but not under /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        url = f"sqlite://{locked}/data/traffic.db"
    traffic = TrafficLog.open(url)
    assert traffic.store is None and "cannot open the store" in caplog.text
    app = build_app(AsyncEngine(make_engine(tiny["llama"])), MODEL, traffic=traffic)
    with TestClient(app) as client:
        for _ in range(2):
            r = client.post("/v1/completions", json={"model": MODEL, "prompt": "To", "max_tokens": 4, **GREEDY})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        metrics = scrape(client.get("/metrics").text)
        assert client.get("/health").json() == {"status": "ok"}
    assert metrics["specserve_traffic_write_errors_total"] == 1
    assert metrics["specserve_traffic_records_dropped_total"] == 2
    assert metrics["specserve_traffic_records_written_total"] == 0


def test_a_traffic_log_needs_traces(tiny, tmp_path):
    traffic = TrafficLog.open(str(tmp_path / "t.db"))
    with pytest.raises(ValueError, match="trace_topm > 0"):
        build_app(AsyncEngine(make_engine(tiny["llama"], trace_topm=0)), MODEL, traffic=traffic)
    traffic.close()


def test_traffic_commands(tmp_path, capsys):
    from test_traffic_store import record

    url = f"sqlite://{tmp_path}/traffic.db"
    alice = KEYS[0].key_id
    with open_store(url) as store:
        for i in range(6):
            store.append(record(seed=i, key=alice if i % 2 else "anonymous", age_days=10.0 if i < 2 else 0.0))
    assert main(["traffic", "stats", "--store", url]) == 0
    out = capsys.readouterr().out
    assert "records:  6" in out and f"{alice}: 3" in out and "anonymous: 3" in out
    assert main(["traffic", "delete-key", "--store", url, "--api-key", ALICE]) == 0  # hashed as the server does
    assert f"deleted 3 records of {alice}" in capsys.readouterr().out
    assert main(["traffic", "prune", "--store", url, "--retention-days", "5"]) == 0
    assert "deleted 1 records older than 5 days" in capsys.readouterr().out
    with open_store(url) as store:
        assert store.count() == 2 and {r.key_id for r in store.read()} == {"anonymous"}
    assert main(["traffic", "stats", "--store", str(tmp_path / "missing.db")]) == 2
    assert "no traffic store at" in capsys.readouterr().err


@pytest.fixture(scope="module")
def bigram_verifier(tiny, tmp_path_factory) -> str:
    """tiny["llama"] with attention and MLP outputs zeroed: the next token depends on the current one only,
    so a student can learn the verifier's greedy text from a few dozen records (see test_distill.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    path = str(tmp_path_factory.mktemp("bigram"))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny["llama"]).save_pretrained(path)
    return path


def test_distill_from_logged_traffic(bigram_verifier, tmp_path):
    url = f"sqlite://{tmp_path}/traffic.db"
    words = " ".join(CORPUS[:6]).split()
    prompts = [" ".join(words[i : i + 3 + i % 5]) for i in range(0, 64, 2)]  # 32 prompts
    traffic = TrafficLog.open(url)
    with TestClient(build_app(AsyncEngine(make_engine(bigram_verifier, trace_topm=8)), MODEL, traffic=traffic)) as c:
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 16, **GREEDY})
        assert r.status_code == 200
    out = tmp_path / "draft"
    argv = [
        "distill",
        "--traffic",
        url,
        "--out",
        str(out),
        "--verifier",
        bigram_verifier,
        "--student-layers",
        "1",
        "--student-hidden",
        "32",
        "--student-heads",
        "2",
        "--student-kv-heads",
        "1",
        "--steps",
        "30",
        "--eval-every",
        "15",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    record = json.load(open(out / "distill.json"))
    assert record["status"] == "finished" and record["config"]["traffic"] == url and record["config"]["data"] == []
    assert record["num_train_examples"] + record["num_held_out_examples"] == 32
    assert record["num_train_response_tokens"] + record["num_held_out_response_tokens"] == 32 * 16
    # the logged top-8 taught it the verifier's token -> token map (0.02 -> 0.56 when written)
    assert record["final_agreement"] > record["initial_agreement"] + 0.3
    assert os.path.exists(out / "model.safetensors")
