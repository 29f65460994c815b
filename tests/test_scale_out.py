"""Scale-out on one machine: two `specserve serve` replicas and one online trainer sharing a real PostgreSQL traffic
store and one draft registry directory, on tiny models.

Each replica has an API key of its own, so the store's per-key counts tell which replica wrote a record. Clients
stream greedy requests at both replicas the whole time. The test shows: records of both replicas land in the one
store and the one trainer reads them; the trainer publishes a version and both replicas swap to it and draft with
it; then PostgreSQL is stopped (pg_ctl stop -m fast) while both replicas keep answering, and once it is started
again the records they buffered meanwhile arrive: in the end the store holds exactly one record per request served,
none dropped. Every request returns 200. Everything is bounded in time; processes and the cluster are stopped in
finally blocks.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from polling import wait_until
from postgres_server import free_port
from tiny_models import PROMPTS

from specserve.online import registry
from specserve.online.trainer import STATE_FILE, trainer_command
from specserve.server.auth import APIKey
from specserve.traffic import open_store

pytestmark = pytest.mark.integration  # subprocesses and a PostgreSQL server

TOKENS = 16
"""Generated tokens per request (ignore_eos: exactly this many)."""
DOWN_REQUESTS = 3
"""Requests each replica must answer while PostgreSQL is down."""
STARTUP_S, PUBLISH_S, SWAP_S, ARRIVE_S = 300.0, 600.0, 120.0, 120.0
"""Bounds on the waits: a replica answering /health, the first published version, both replicas serving it, the
buffered records written once PostgreSQL is back."""


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics: (name, frozenset of its (label, value) pairs) -> value."""
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            pairs = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)
            samples[(name, frozenset(pairs))] = float(value)
    return samples


def metric(url: str, name: str, **labels: str) -> float | None:
    """One sample of the replica at ``url``; None when it has no such series."""
    return scrape(url).get((name, frozenset(labels.items())))


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class Replica:
    """One `specserve serve` subprocess and the client thread that streams requests at it."""

    name: str
    url: str
    secret: str
    process: subprocess.Popen
    log_path: str
    ok: list[float] = field(default_factory=list)
    """Wall-clock times at which requests finished with 200 and TOKENS tokens."""
    failures: list[str] = field(default_factory=list)

    @property
    def key_id(self) -> str:
        return APIKey.from_secret(self.name, self.secret).key_id

    def log_tail(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f"--- {self.name} ---\n" + f.read()[-3000:]

    def send(self, stop: threading.Event, deadline: float) -> None:
        """Greedy completions, one after another, until ``stop`` or ``deadline`` (time.monotonic())."""
        headers = {"Authorization": f"Bearer {self.secret}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=120) as client:
            i = 0
            while not stop.is_set() and time.monotonic() < deadline:
                body = {
                    "prompt": f"{PROMPTS[i % len(PROMPTS)]} {self.name} {i}",
                    "max_tokens": TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                try:
                    r = client.post("/v1/completions", json=body)
                    if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == TOKENS:
                        self.ok.append(time.time())
                    else:
                        self.failures.append(f"request {i}: {r.status_code} {r.text[:300]}")
                except httpx.HTTPError as e:
                    self.failures.append(f"request {i}: {type(e).__name__}: {e}")
                i += 1


def start_replica(name: str, tiny: dict, tmp_path, traffic_url: str, drafts: str, env: dict) -> Replica:
    port = free_port()
    secret = f"sk-{name}-scale-out-test"
    keys = tmp_path / f"keys-{name}.json"
    keys.write_text(json.dumps([{"name": name, "key": secret}]))
    argv = [sys.executable, "-m", "specserve.cli", "serve", "--verifier", tiny["llama"], "--draft", tiny["draft"],
            "--dtype", "float32", "--kv-cache-memory", "0.01", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(tmp_path / f"data-{name}"), "--api-keys-file", str(keys),
            "--traffic-store", traffic_url, "--draft-registry", drafts, "--draft-poll-seconds", "0.5",
            "--speculative-method", "draft", "--num-speculative-tokens", "2", "--log-level", "warning"]  # fmt: skip
    log_path = str(tmp_path / f"serve-{name}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Replica(name, f"http://127.0.0.1:{port}", secret, process, log_path)


def stop_process(process: subprocess.Popen) -> int:
    """SIGTERM (a server drains), then SIGKILL if it has not exited within 60 s; returns the exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=60)


def test_two_replicas_one_trainer_one_postgres_store(tiny, postgres, tmp_path):
    traffic_url = postgres.new_database()
    drafts = str(tmp_path / "drafts")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    replicas: list[Replica] = []
    trainer = None
    stop = threading.Event()
    clients: list[threading.Thread] = []
    try:
        replicas = [start_replica(name, tiny, tmp_path, traffic_url, drafts, env) for name in ("a", "b")]
        argv = trainer_command(traffic_url, drafts, tiny["draft"], threads=1, verifier=tiny["llama"], device="cpu",
                               lr=1e-2, eval_every=3, margin=0.0, poll_seconds=0.5)  # fmt: skip
        trainer_log = tmp_path / "trainer.log"
        with open(trainer_log, "wb") as log:
            trainer = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)

        def logs() -> str:
            return "\n".join([r.log_tail() for r in replicas] + ["--- trainer ---", trainer_log.read_text()[-3000:]])

        for r in replicas:
            assert wait_until(lambda r=r: healthy(r.url) or r.process.poll() is not None, STARTUP_S), logs()
            assert r.process.poll() is None, logs()
        deadline = time.monotonic() + 1500  # the clients stop by themselves, whatever happens below
        clients = [threading.Thread(target=r.send, args=(stop, deadline), daemon=True) for r in replicas]
        for c in clients:
            c.start()

        # ---- the trainer publishes from both replicas' traffic; both replicas swap to the version ----------
        published = wait_until(lambda: registry.current(drafts) is not None or trainer.poll() is not None, PUBLISH_S)
        assert published and trainer.poll() is None, "the trainer published nothing / exited\n" + logs()
        stop_process(trainer)
        version = registry.current(drafts)  # the trainer is stopped: this stays the current version
        registry.verify(drafts, version)

        def serves(r: Replica) -> bool:
            return metric(r.url, "specserve_draft_version", version=version) == 1.0

        def drafted(r: Replica) -> float:
            return metric(r.url, "specserve_spec_draft_tokens_total", source="draft", draft_version=version) or 0.0

        for r in replicas:
            assert wait_until(lambda r=r: serves(r), SWAP_S), f"{r.name} did not swap to {version}\n{logs()}"
            assert wait_until(lambda r=r: drafted(r) > 0, SWAP_S), f"{r.name}: {version} proposed nothing\n{logs()}"
            assert metric(r.url, "specserve_draft_swaps_total") >= 1
        # the one store holds both replicas' records, and the one trainer read records of both
        last_read = json.loads((tmp_path / "drafts" / STATE_FILE).read_text())["last_record_id"]
        with open_store(traffic_url) as store:
            per_key = store.summary().per_key
            read_by_trainer = {rec.key_id for rec in store.read(0, limit=last_read)}
        assert set(per_key) == {r.key_id for r in replicas} and min(per_key.values()) > 0, per_key
        assert read_by_trainer == {r.key_id for r in replicas}
        assert registry.load_manifest(drafts, version)["records_seen"] > 0

        # ---- PostgreSQL down: both replicas keep answering; their writes fail and are buffered -------------
        errors = {r.name: metric(r.url, "specserve_traffic_write_errors_total") for r in replicas}
        served = {r.name: len(r.ok) for r in replicas}
        down_at = time.time()
        postgres.stop("fast")
        for r in replicas:
            # + 1: the request in flight when it stopped may have finished (and been logged) just before
            assert wait_until(lambda r=r: len(r.ok) >= served[r.name] + DOWN_REQUESTS + 1, SWAP_S), logs()
            assert wait_until(
                lambda r=r: metric(r.url, "specserve_traffic_write_errors_total") > errors[r.name], SWAP_S
            ), f"{r.name} wrote no record while PostgreSQL was down?\n{logs()}"
            assert healthy(r.url)
        up_at = time.time()
        postgres.start()

        # ---- back up: the buffered records arrive; exactly one record per request served --------------------
        for r in replicas:
            served[r.name] = len(r.ok)
            assert wait_until(lambda r=r: len(r.ok) >= served[r.name] + 2, SWAP_S), logs()  # traffic goes on
        stop.set()
        for c in clients:
            c.join(timeout=180)
        assert not any(c.is_alive() for c in clients)
        expected = {r.key_id: len(r.ok) for r in replicas}

        def written() -> bool:
            return all(metric(r.url, "specserve_traffic_records_written_total") == len(r.ok) for r in replicas)

        assert wait_until(written, ARRIVE_S), logs()
        with open_store(traffic_url) as store:
            assert store.count() == sum(expected.values())
            assert store.summary().per_key == expected
            during = [rec.key_id for rec in store.read(0, limit=10 * sum(expected.values()))
                      if down_at < rec.created_at < up_at]  # fmt: skip
        for r in replicas:
            # the records of requests served while PostgreSQL was down are in the store now
            assert during.count(r.key_id) >= DOWN_REQUESTS
            assert metric(r.url, "specserve_traffic_records_dropped_total") == 0
            assert serves(r)  # no rollback, no other version meanwhile
            assert r.failures == [], f"{r.name}: {r.failures[:5]}"
            assert len(r.ok) > 0
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=180)
        statuses = [stop_process(p) for p in [*(r.process for r in replicas), *([trainer] if trainer else [])]]
    assert statuses[: len(replicas)] == [0] * len(replicas), "a replica did not drain cleanly on SIGTERM"
