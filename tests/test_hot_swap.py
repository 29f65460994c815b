"""Draft hot-swap from a draft registry (online distillation), on tiny models.

A real registry directory (``registry.publish``), a real AsyncEngine thread and the real DraftWatcher:
new versions are swapped in while requests stream, broken ones are refused (the current draft stays),
a version that accepts worse than the draft it replaced is rolled back. Drafts: the verifier itself
(every greedy draft token is accepted), a random model of the verifier's shape (almost none is), the
small random draft of ``tiny``, and random EAGLE heads (standalone and EAGLE versions replace each other).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from polling import wait_until
from safetensors.torch import load_file, save_file
from test_eagle import build_head
from tiny_models import PROMPTS, build_llama, build_tokenizer, greedy
from transformers import PreTrainedTokenizerFast

from specserve import LLM
from specserve.config import CacheConfig, EngineConfig, SpeculativeConfig
from specserve.engine.eagle_proposer import EagleProposer
from specserve.engine.engine import LLMEngine
from specserve.engine.proposer import DraftProposer
from specserve.model.eagle import EagleHead
from specserve.online import registry
from specserve.server import AsyncEngine, build_app
from specserve.server.async_engine import ShuttingDownError
from specserve.server.draft_watcher import DraftWatchConfig, DraftWatcher

MODEL = "tiny"
NEVER = 3600.0
"""A poll interval for tests that poll by hand."""


@pytest.fixture(scope="module")
def drafts(tiny, tmp_path_factory) -> dict[str, str]:
    """Checkpoints to publish: 'twin' (random, the verifier's shape), 'nan' (the verifier with a NaN weight),
    'other_vocab' (a small draft over another vocabulary), 'missing_tensor' (the verifier less one tensor)."""
    root = tmp_path_factory.mktemp("drafts")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny["tokenizer"])
    twin = build_llama(str(root / "twin"), tokenizer, seed=7)

    def altered(name: str, change) -> str:
        path = str(root / name)
        shutil.copytree(tiny["llama"], path)
        weights = os.path.join(path, "model.safetensors")
        state = load_file(weights)
        change(state)
        save_file(state, weights, metadata={"format": "pt"})
        return path

    def poison(state: dict) -> None:
        state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")

    other_tok = build_tokenizer(str(root / "other_tok"), vocab_size=300)
    other = build_llama(str(root / "other_vocab"), other_tok, layers=1, hidden=32, heads=2, kv_heads=1)
    return {
        "twin": twin,
        "nan": altered("nan", poison),
        "missing_tensor": altered("missing_tensor", lambda s: s.pop("model.layers.0.self_attn.k_proj.weight")),
        "other_vocab": other,
    }


@pytest.fixture(scope="module")
def eagle_heads(tiny, tmp_path_factory) -> dict[str, str]:
    """EAGLE head checkpoints for tiny["llama"]: 'start' and 'new' (random; 'new' over a third of the vocabulary),
    'nan' (a NaN weight), 'other_verifier' (a head of tiny["qwen2"]: the same vocabulary, another verifier)."""
    root = tmp_path_factory.mktemp("eagle_heads")
    vocab = len(PreTrainedTokenizerFast.from_pretrained(tiny["tokenizer"]))
    third = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[: vocab // 3]
    nan = build_head(tiny["llama"], str(root / "nan"), seed=3)
    weights = os.path.join(nan, "model.safetensors")
    state = load_file(weights)
    state["fc.weight"][0, 0] = float("nan")
    save_file(state, weights)
    return {
        "start": build_head(tiny["llama"], str(root / "start")),
        "new": build_head(tiny["llama"], str(root / "new"), third, seed=1),
        "nan": nan,
        "other_verifier": build_head(tiny["qwen2"], str(root / "other_verifier"), seed=4),
    }


LONG = 120
"""Tokens of the requests a swap happens under: many more steps than loading a tiny draft takes."""


@pytest.fixture(scope="module")
def long_reference(tiny) -> list[list[int]]:
    """Plain greedy decoding of PROMPTS by the verifier: what every speculative run must reproduce."""
    llm = LLM(tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=256, block_size=4))
    return [c.token_ids for c in llm.generate(PROMPTS, greedy(LONG))]


@pytest.fixture(scope="module")
def reference(long_reference) -> list[list[int]]:
    """The first 48 tokens of each (greedy decoding: a prefix of the longer output)."""
    return [ids[:48] for ids in long_reference]


def make_async_engine(tiny, draft: str) -> AsyncEngine:
    spec = SpeculativeConfig(draft=draft, num_speculative_tokens=2, method="draft")
    config = EngineConfig(
        tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=128, block_size=4), speculative=spec
    )
    return AsyncEngine(LLMEngine(config))


def publish(tiny, directory: str, checkpoint: str, draft_type: str = "standalone") -> str:
    return registry.publish(
        directory,
        checkpoint,
        heldout_acceptance=0.5,
        records_seen=1,
        tokens_seen=10,
        verifier=registry.verifier_fingerprint(tiny["llama"]),
        draft_type=draft_type,
    )


async def _collect(
    async_engine: AsyncEngine, prompt: str, request_id: str, tokens: int, started: asyncio.Event | None = None
) -> list[int]:
    token_ids: list[int] = []
    async for out in async_engine.generate(prompt, greedy(tokens), request_id):
        token_ids = out.token_ids
        if started is not None:
            started.set()
    return token_ids


def stream_and_publish(async_engine: AsyncEngine, publish_one) -> list[list[int]]:
    """PROMPTS, LONG greedy tokens each; once every request has streamed output, `publish_one()` runs (a thread)."""

    async def scenario() -> list[list[int]]:
        started = [asyncio.Event() for _ in PROMPTS]
        tasks = [
            asyncio.create_task(_collect(async_engine, p, f"r{i}", LONG, started[i])) for i, p in enumerate(PROMPTS)
        ]
        for event in started:  # every request has streamed output before the new version exists
            await event.wait()
        await asyncio.to_thread(publish_one)
        return list(await asyncio.gather(*tasks))

    return asyncio.run(asyncio.wait_for(scenario(), timeout=300))


def generate(async_engine: AsyncEngine, prompts: list[str], tokens: int, tag: str) -> list[list[int]]:
    async def run() -> list[list[int]]:
        return await asyncio.gather(*(_collect(async_engine, p, f"{tag}-{i}", tokens) for i, p in enumerate(prompts)))

    return list(asyncio.run(asyncio.wait_for(run(), timeout=300)))


def shutdown(async_engine: AsyncEngine) -> None:
    asyncio.run(async_engine.shutdown())


# ---- swap -------------------------------------------------------------------------------------------------


def test_a_published_version_is_swapped_in_while_requests_stream_and_outputs_stay_exact(
    tiny, drafts, long_reference, tmp_path
):
    directory = str(tmp_path / "registry")
    async_engine = make_async_engine(tiny, drafts["twin"])
    engine = async_engine.engine
    first = engine.draft_version
    watcher = DraftWatcher(async_engine, DraftWatchConfig(directory, poll_seconds=0.02))
    watcher.start()  # nothing published yet: keeps the startup draft
    assert engine.draft_version == first

    try:
        outputs = stream_and_publish(async_engine, lambda: publish(tiny, directory, tiny["llama"]))  # the verifier
        assert wait_until(lambda: watcher.stats().swaps == 1)
        assert async_engine.stats().draft_version == engine.draft_version == "v0001"
        assert outputs == long_reference  # every request finished, token for token the verifier's greedy output
        old, new = engine.metrics.spec(first), engine.metrics.spec("v0001")
        # both drafts proposed for these same requests: the swap happened while they were in flight
        assert old.drafted_tokens > 0 and new.drafted_tokens > 0
        assert new.accepted_tokens == new.drafted_tokens > old.accepted_tokens  # the verifier as draft: all kept
        assert generate(async_engine, PROMPTS, LONG, "after") == long_reference  # same prompts after the swap
        assert watcher.stats().rejected == dict.fromkeys(watcher.stats().rejected, 0)
    finally:
        watcher.stop()
        shutdown(async_engine)
    assert not watcher.is_alive()
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_the_current_version_is_served_from_startup_and_the_watcher_stops_with_the_app(tiny, drafts, tmp_path):
    directory = str(tmp_path / "registry")
    publish(tiny, directory, tiny["llama"])
    publish(tiny, directory, tiny["draft"])  # v0002, the current one
    async_engine = make_async_engine(tiny, drafts["twin"])
    watcher = DraftWatcher(async_engine, DraftWatchConfig(directory, poll_seconds=0.05))
    with TestClient(build_app(async_engine, MODEL, draft_watcher=watcher)) as client:
        assert async_engine.engine.draft_version == "v0002"  # before the first request
        assert watcher.is_alive()
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "To", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        text = client.get("/metrics").text
        assert 'specserve_draft_version{version="v0002"} 1.0' in text
        assert "specserve_draft_swaps_total 1.0" in text and "specserve_draft_rollbacks_total 0.0" in text
    assert not watcher.is_alive() and not async_engine.is_alive()
    with pytest.raises(ShuttingDownError):
        async_engine.swap_draft(async_engine.engine.proposer.runner.model, "v0003")


# ---- refusals ---------------------------------------------------------------------------------------------


def _drop_weights(path: str) -> None:
    os.remove(os.path.join(path, "model.safetensors"))


def _flip_a_byte(path: str) -> None:
    with open(os.path.join(path, "model.safetensors"), "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(
    "checkpoint, tamper, reason",
    [
        ("llama", _drop_weights, "registry"),  # a partial version
        ("llama", _flip_a_byte, "registry"),  # sha256 mismatch
        ("nan", None, "nonfinite"),  # correct sha256, NaN inside
        ("other_vocab", None, "vocabulary"),
        ("missing_tensor", None, "load"),
    ],
    ids=["partial", "sha256-mismatch", "nan-weights", "other-vocabulary", "missing-tensor"],
)
def test_a_broken_version_is_refused_and_the_current_draft_stays(
    tiny, drafts, tmp_path, caplog, checkpoint, tamper, reason
):
    directory = str(tmp_path / "registry")
    version = publish(tiny, directory, tiny["llama"] if checkpoint == "llama" else drafts[checkpoint])
    if tamper is not None:
        tamper(registry.version_dir(directory, version))
    async_engine = make_async_engine(tiny, drafts["twin"])
    first = async_engine.engine.draft_version
    watcher = DraftWatcher(async_engine, DraftWatchConfig(directory, poll_seconds=NEVER))
    with caplog.at_level(logging.WARNING), TestClient(build_app(async_engine, MODEL, draft_watcher=watcher)) as client:
        # refused at startup: the server serves its startup draft
        assert async_engine.engine.draft_version == first
        assert watcher.stats().rejected[reason] == 1 and sum(watcher.stats().rejected.values()) == 1
        assert f'specserve_draft_rejected_total{{reason="{reason}"}} 1.0' in client.get("/metrics").text
        assert any("REJECTED draft v0001" in r.message and f"({reason})" in r.message for r in caplog.records)
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "To", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        watcher.poll()  # CURRENT still names it: it is not tried again
        assert sum(watcher.stats().rejected.values()) == 1 and async_engine.engine.draft_version == first
        publish(tiny, directory, tiny["llama"])  # a sound version after it is adopted
        watcher.poll()
        assert async_engine.engine.draft_version == "v0002" and watcher.stats().swaps == 1
    assert not watcher.is_alive()


def test_a_draft_needing_more_kv_than_reserved_is_refused(tiny, drafts, tmp_path):
    directory = str(tmp_path / "registry")
    async_engine = make_async_engine(tiny, tiny["draft"])
    first = async_engine.engine.draft_version
    publish(tiny, directory, drafts["twin"])
    watcher = DraftWatcher(async_engine, DraftWatchConfig(directory, poll_seconds=NEVER))
    try:
        watcher.poll()
        assert watcher.stats().rejected["kv_budget"] == 1 and async_engine.engine.draft_version == first
    finally:
        shutdown(async_engine)


def test_a_current_naming_a_version_not_visible_yet_is_waited_for_not_refused(tiny, tmp_path):
    directory = str(tmp_path / "registry")
    version = publish(tiny, directory, tiny["draft"])
    hidden = str(tmp_path / "elsewhere")
    os.rename(registry.version_dir(directory, version), hidden)  # a shared volume that has not caught up
    async_engine = make_async_engine(tiny, tiny["draft"])
    watcher = DraftWatcher(async_engine, DraftWatchConfig(directory, poll_seconds=NEVER))
    try:
        watcher.poll()
        assert sum(watcher.stats().rejected.values()) == 0 and watcher.stats().swaps == 0
        os.rename(hidden, registry.version_dir(directory, version))
        watcher.poll()
        assert async_engine.engine.draft_version == version
    finally:
        shutdown(async_engine)


# ---- EAGLE versions ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_an_eagle_version_is_swapped_in_while_requests_stream_and_outputs_stay_exact(
    tiny, eagle_heads, long_reference, tmp_path
):
    directory = str(tmp_path / "registry")
    async_engine = make_async_engine(tiny, eagle_heads["start"])  # an EAGLE head from startup
    engine = async_engine.engine
    first = engine.draft_version
    assert isinstance(engine.proposer, EagleProposer)
    watcher = DraftWatcher(async_engine, DraftWatchConfig(directory, poll_seconds=0.02))
    watcher.start()
    try:
        outputs = stream_and_publish(async_engine, lambda: publish(tiny, directory, eagle_heads["new"], "eagle"))
        assert wait_until(lambda: watcher.stats().swaps == 1)
        assert async_engine.stats().draft_version == engine.draft_version == "v0001"
        head = engine.proposer.runner.model
        assert isinstance(engine.proposer, EagleProposer) and isinstance(head, EagleHead) and head.trimmed
        assert outputs == long_reference  # every request finished, token for token the verifier's greedy output
        old, new = engine.metrics.spec(first), engine.metrics.spec("v0001")
        assert old.drafted_tokens > 0 and new.drafted_tokens > 0  # both heads proposed for these requests
        assert generate(async_engine, PROMPTS, LONG, "after") == long_reference
        assert sum(watcher.stats().rejected.values()) == 0
    finally:
        watcher.stop()
        shutdown(async_engine)
    assert engine.kv.num_free_blocks == engine.num_blocks


def test_standalone_and_eagle_versions_replace_each_other(tiny, drafts, eagle_heads, reference, tmp_path):
    directory = str(tmp_path / "registry")
    async_engine = make_async_engine(tiny, drafts["twin"])
    watcher = DraftWatcher(async_engine, DraftWatchConfig(directory, poll_seconds=NEVER))
    try:
        for checkpoint, draft_type, proposer in (
            (eagle_heads["new"], "eagle", EagleProposer),
            (tiny["llama"], "standalone", DraftProposer),
        ):
            version = publish(tiny, directory, checkpoint, draft_type)
            watcher.poll()
            engine = async_engine.engine
            assert engine.draft_version == version and type(engine.proposer) is proposer
            assert generate(async_engine, PROMPTS, 48, version) == reference
            assert engine.metrics.spec(version).drafted_tokens > 0
        assert watcher.stats().swaps == 2 and sum(watcher.stats().rejected.values()) == 0
    finally:
        shutdown(async_engine)


@pytest.mark.parametrize(
    "startup, checkpoint, draft_type, reason",
    [
        ("twin", "nan", "eagle", "nonfinite"),
        ("twin", "other_verifier", "eagle", "load"),  # load_eagle refuses a head of another verifier
        ("twin", "new", "standalone", "load"),  # an EAGLE head its manifest calls standalone
        ("twin", "llama", "eagle", "load"),  # a standalone draft its manifest calls an EAGLE head
        ("draft", "new", "eagle", "kv_budget"),  # a verifier-shaped layer: more KV than the tiny draft reserved
    ],
    ids=["nan-weights", "other-verifier", "eagle-called-standalone", "standalone-called-eagle", "kv-budget"],
)
def test_a_broken_eagle_version_is_refused_and_the_current_draft_stays(
    tiny, drafts, eagle_heads, reference, tmp_path, caplog, startup, checkpoint, draft_type, reason
):
    paths = {"twin": drafts["twin"], "draft": tiny["draft"], "llama": tiny["llama"], **eagle_heads}
    directory = str(tmp_path / "registry")
    publish(tiny, directory, paths[checkpoint], draft_type)
    async_engine = make_async_engine(tiny, paths[startup])
    first = async_engine.engine.draft_version
    watcher = DraftWatcher(async_engine, DraftWatchConfig(directory, poll_seconds=NEVER))
    try:
        with caplog.at_level(logging.WARNING):
            watcher.poll()
        stats = watcher.stats()
        assert stats.rejected[reason] == 1 and sum(stats.rejected.values()) == 1 and stats.swaps == 0
        assert any("REJECTED draft v0001" in r.message and f"({reason})" in r.message for r in caplog.records)
        assert async_engine.engine.draft_version == first
        assert generate(async_engine, PROMPTS[:2], 16, "after") == [ids[:16] for ids in reference[:2]]
    finally:
        shutdown(async_engine)


# ---- rollback ---------------------------------------------------------------------------------------------


def _serve_until_drafted(async_engine: AsyncEngine, version: str, tokens: int, reference) -> None:
    """Greedy traffic until ``version`` has proposed ``tokens`` draft tokens; outputs must stay exact."""
    rounds = 0
    while async_engine.engine.metrics.spec(version).drafted_tokens < tokens:
        assert generate(async_engine, PROMPTS, 48, f"{version}-{rounds}") == reference
        rounds += 1


@pytest.mark.parametrize(
    "start, new, rolled_back",
    [("llama", "twin", True), ("twin", "llama", False)],
    ids=["worse-rolls-back", "better-stays"],
)
def test_rollback_when_live_acceptance_falls_below_the_replaced_draft(
    tiny, drafts, reference, tmp_path, caplog, start, new, rolled_back
):
    paths = {"llama": tiny["llama"], "twin": drafts["twin"]}
    directory = str(tmp_path / "registry")
    async_engine = make_async_engine(tiny, paths[start])
    first = async_engine.engine.draft_version
    min_tokens = 60
    watcher = DraftWatcher(
        async_engine,
        DraftWatchConfig(directory, poll_seconds=NEVER, rollback_min_tokens=min_tokens, rollback_margin=0.1),
    )
    try:
        _serve_until_drafted(async_engine, first, min_tokens, reference)
        version = publish(tiny, directory, paths[new])
        watcher.poll()
        assert async_engine.engine.draft_version == version
        _serve_until_drafted(async_engine, version, min_tokens, reference)
        with caplog.at_level(logging.WARNING):
            watcher.poll()
        live = async_engine.engine.metrics
        assert (live.spec(version).acceptance_rate < live.spec(first).acceptance_rate - 0.1) == rolled_back
        stats = watcher.stats()
        if rolled_back:
            assert async_engine.engine.draft_version == first
            assert stats.rollbacks == 1 and stats.rolled_back == (version,)
            assert any("ROLLED BACK draft v0001" in r.message for r in caplog.records)
            watcher.poll()  # CURRENT still names the rolled-back version: never adopted again
            assert async_engine.engine.draft_version == first and watcher.stats().swaps == 1
            assert generate(async_engine, PROMPTS, 48, "after") == reference
        else:
            assert async_engine.engine.draft_version == version and stats.rollbacks == 0
    finally:
        shutdown(async_engine)


# ---- the online trainer subprocess ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def _trainer_pid(server_pid: int) -> int | None:
    for child in _children(server_pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"--online" in f.read().split(b"\0"):
                    return child
        except FileNotFoundError:
            pass
    return None


def _scrape(url: str) -> dict[str, float]:
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the trainer process through /proc")
def test_killing_the_trainer_leaves_serving_running_and_it_is_restarted(tiny, tmp_path):
    """`specserve serve --online-distill` on tiny models; the trainer is SIGKILLed after it has read traffic."""
    port, data = _free_port(), tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "specserve.cli", "serve", "--verifier", tiny["llama"], "--draft", tiny["draft"],
            "--dtype", "float32", "--kv-cache-memory", "0.01", "--port", str(port), "--data-dir", str(data),
            "--online-distill", "--draft-poll-seconds", "0.5", "--log-level", "warning"]  # fmt: skip
    state = data / "drafts" / "trainer_state.json"
    sent = 0

    def complete(n: int) -> None:
        nonlocal sent
        for i in range(n):
            body = {
                "prompt": f"{PROMPTS[i % len(PROMPTS)]} {sent}",
                "max_tokens": 16,
                "temperature": 0,
                "ignore_eos": True,
            }
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16, r.text
            sent += 1

    def trainer_read() -> int:
        try:
            return json.loads(state.read_text())["last_record_id"]
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: _healthy(url), timeout=300), (tmp_path / "serve.log").read_text()[-3000:]
        complete(8)
        assert wait_until(lambda: trainer_read() == sent, timeout=300)  # the trainer is at work on the traffic
        first = _trainer_pid(server.pid)
        assert first is not None
        os.kill(first, signal.SIGKILL)
        complete(4)  # serving does not notice
        assert wait_until(lambda: _scrape(url)["specserve_trainer_restarts_total"] == 1, timeout=120)
        assert wait_until(lambda: _scrape(url)["specserve_trainer_up"] == 1, timeout=60)
        second = _trainer_pid(server.pid)
        assert second not in (None, first)
        # no logged traffic was lost: the restarted trainer reads on to every record the server wrote
        complete(4)
        assert wait_until(lambda: trainer_read() == sent, timeout=300)
        assert _scrape(url)["specserve_traffic_records_written_total"] == sent == 16
    finally:
        server.send_signal(signal.SIGTERM)
        status = server.wait(timeout=120)
    assert status == 0
    assert not os.path.exists(f"/proc/{second}") or _trainer_pid(server.pid) is None


# ---- the demonstration, reduced -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.slow
def test_the_online_distillation_demo_runs_end_to_end(tmp_path):
    """bench/online_distill.py on tiny random models: a minute of traffic, one latency round; a few minutes."""
    out = tmp_path / "online_distill.json"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "online_distill.py")
    argv = [sys.executable, script, "--tiny", "--minutes", "1", "--sample-seconds", "3", "--latency-phase-seconds",
            "10", "--latency-rounds", "1", "--out", str(out), "--workdir", str(tmp_path / "work")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    demo = result["demonstration"]
    assert demo["requests"] > 0 and demo["num_errors"] == 0 and demo["server_exit_status"] == 0
    published = [m["version"] for m in demo["published"]]
    assert published and demo["swaps"]  # the trainer published and the server swapped, while traffic ran
    assert all(s["to"] in published for s in demo["swaps"])
    assert sum(w["drafted"] for w in demo["windows"]) > 0 and all(
        0 <= w["acceptance"] <= 1 for w in demo["windows"] if w["acceptance"] is not None
    )
    cost = result["trainer_cost"]
    assert [p["trainer"] for p in cost["phases"]] == [False, True] and cost["server_exit_status"] == 0
    assert all(p["requests"] > 0 and p["errors"] == 0 and p["server_itl_mean_ms"] > 0 for p in cost["phases"])
    assert cost["draft_version"] == published[-1]  # the second server adopted the registry's current version
    assert out.with_suffix(".png").stat().st_size > 0
