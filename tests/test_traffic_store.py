"""The traffic store: round trips, WAL, the writer thread's batching and dropping, retention, deletion,
migrations; on SQLite and on a real PostgreSQL server.

The PostgreSQL tests start their own server (the `postgres` fixture of conftest.py: initdb + pg_ctl
in a temporary directory, on 127.0.0.1 and a free port; tests/postgres_server.py) and are skipped,
saying why, when no server binary or no psycopg is found.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest
import torch
from polling import wait_until
from postgres_server import free_port

from specserve.traffic import open_store
from specserve.traffic.record import TrafficRecord, encode
from specserve.traffic.sqlite_store import SQLITE_MIGRATIONS, SQLiteTrafficStore, migrate_sqlite
from specserve.traffic.store import TrafficStore
from specserve.traffic.url import describe

DAY = 86400.0


def record(n: int = 6, m: int = 4, key: str = "key-a", seed: int = 0, age_days: float = 0.0) -> TrafficRecord:
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(n, 50, generator=g), dim=-1).topk(m, dim=-1)
    return TrafficRecord(
        prompt_token_ids=torch.randint(0, 1000, (5 + seed % 3,), generator=g).tolist(),
        output_token_ids=torch.randint(0, 1000, (n,), generator=g).tolist(),
        topm_ids=logprobs.indices.to(torch.int32) * 1000 + seed,  # large ids: int32 must survive
        topm_logprobs=logprobs.values,
        steps=[("draft", 3, 2), ("ngram", 2, 0), ("none", 0, 0)],
        draft_version=f"v{seed % 2}",
        key_id=key,
        created_at=time.time() - age_days * DAY,
    )


def assert_same(stored: TrafficRecord, original: TrafficRecord) -> None:
    assert stored.prompt_token_ids == original.prompt_token_ids
    assert stored.output_token_ids == original.output_token_ids
    assert stored.topm_ids.dtype == torch.int32 and torch.equal(stored.topm_ids, original.topm_ids)
    # log-probs are stored as float16: exactly the float16 values come back, as float32
    assert stored.topm_logprobs.dtype == torch.float32
    assert torch.equal(stored.topm_logprobs, original.topm_logprobs.half().float())
    assert stored.steps == original.steps
    assert (stored.draft_version, stored.key_id) == (original.draft_version, original.key_id)
    assert stored.created_at == pytest.approx(original.created_at, abs=1e-6)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/traffic.db"
    return request.getfixturevalue("postgres").new_database()


def opened(url: str, **options) -> TrafficStore:
    return open_store(url, **options)


# ---- both backends ---------------------------------------------------------------------------------


def test_round_trip_and_increasing_ids(store_url):
    originals = [record(n=1 + i, m=3 + i % 2, seed=i) for i in range(7)] + [record(n=0, seed=9)]
    with opened(store_url) as store:
        for r in originals:
            store.append(r)
        store.flush(timeout=30)
        assert store.count() == len(originals)
        stored = store.read()
        assert store.stats.written_records == len(originals) and store.stats.dropped_records == 0
    ids = [r.record_id for r in stored]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for s, o in zip(stored, originals):
        assert_same(s, o)
    # reopening keeps them; reading pages by record_id
    with opened(store_url) as store:
        assert store.count() == len(originals)
        page = store.read(after_id=ids[2], limit=3)
        assert [r.record_id for r in page] == ids[3:6]
        assert store.read(after_id=ids[-1]) == []


def test_retention_by_count_keeps_the_newest(store_url):
    with opened(store_url, max_records=5) as store:
        for i in range(12):
            store.append(record(seed=i))
        store.flush(timeout=30)
        kept = store.read()
        assert store.count() == 5 and len(kept) == 5
        assert store.stats.evicted_records == 7
    assert [r.output_token_ids for r in kept] == [record(seed=i).output_token_ids for i in range(7, 12)]


def test_retention_by_bytes_keeps_the_newest(store_url):
    sizes = [encode(record(seed=i)).nbytes for i in range(6)]
    with opened(store_url, max_bytes=sum(sizes[3:])) as store:  # room for exactly the newest three
        for i in range(6):
            store.append(record(seed=i))
        store.flush(timeout=30)
        kept = store.read()
        summary = store.summary()
    assert [r.output_token_ids for r in kept] == [record(seed=i).output_token_ids for i in range(3, 6)]
    assert summary.records == 3 and summary.bytes == sum(sizes[3:])


def test_retention_period_deletes_old_records(store_url):
    ages = [10.0, 6.0, 4.0, 0.0]
    with opened(store_url) as store:
        for i, age in enumerate(ages):
            store.append(record(seed=i, age_days=age))
        store.flush(timeout=30)
        assert store.prune(retention_days=8) == 1  # the command-line path
        assert store.count() == 3
    # the writer's own pass: at open, then every prune_interval seconds
    with opened(store_url, retention_days=5, prune_interval=0.05) as store:
        assert wait_until(lambda: store.count() == 2)
        store.append(record(seed=7, age_days=7.0))  # arrives already expired: the next pass removes it
        store.flush(timeout=30)
        assert wait_until(lambda: store.count() == 2)
        assert store.stats.evicted_records >= 2
        assert [round((time.time() - r.created_at) / DAY) for r in store.read()] == [4, 0]


def test_delete_key(store_url):
    with opened(store_url) as store:
        for i in range(9):
            store.append(record(seed=i, key=f"key-{i % 3}"))
        assert store.delete_key("key-1") == 3  # records still buffered are written, then deleted too
        assert store.count() == 6
        assert {r.key_id for r in store.read()} == {"key-0", "key-2"}
        assert store.delete_key("nobody") == 0
        assert store.summary().per_key == {"key-0": 3, "key-2": 3}


def test_ids_are_never_reused_after_deleting_the_newest(store_url):
    with opened(store_url) as store:
        store.append(record(seed=0, key="a"))
        store.append(record(seed=1, key="b"))
        store.flush(timeout=30)
        newest = store.read()[-1].record_id
        store.delete_key("b")
    with opened(store_url) as store:
        store.append(record(seed=2, key="c"))
        store.flush(timeout=30)
        assert store.read()[-1].record_id > newest


# ---- SQLite -------------------------------------------------------------------------------------------


def test_sqlite_is_in_wal_mode(tmp_path):
    path = tmp_path / "sub" / "traffic.db"
    with open_store(str(path)) as store:
        store.append(record())
        store.flush(timeout=30)
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # a reader sees committed records while the store stays open
        assert conn.execute("SELECT COUNT(*) FROM traffic_records").fetchone()[0] == 1
        conn.close()


def test_writer_batches_and_append_never_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(SQLiteTrafficStore, "BUSY_TIMEOUT_MS", 20)  # fail fast while the test holds the lock
    path = tmp_path / "traffic.db"
    store = open_store(str(path), max_buffered=10)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the database: every write attempt fails
    try:
        store.append(record(seed=0))
        assert wait_until(lambda: store.stats.write_errors >= 1)  # the writer holds that record and retries
        for i in range(1, 61):  # 10 fit the buffer, 50 are dropped; append returns at once (else: a hang)
            store.append(record(seed=i))
        assert store.stats.dropped_records == 50
        assert store.buffered == 11 and store.stats.written_records == 0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.flush(timeout=60)
    assert store.stats.written_records == 11 and store.count() == 11
    assert store.stats.batches == 2  # the retried record, then the 10 buffered ones in one transaction
    assert [r.output_token_ids for r in store.read()] == [record(seed=i).output_token_ids for i in range(11)]
    store.close()


def test_close_drops_what_an_unwritable_database_never_took(tmp_path, monkeypatch):
    monkeypatch.setattr(SQLiteTrafficStore, "BUSY_TIMEOUT_MS", 20)
    path = tmp_path / "traffic.db"
    store = open_store(str(path))
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    for i in range(3):
        store.append(record(seed=i))
    store.close(timeout=0.2)
    blocker.execute("ROLLBACK")
    assert store.stats.dropped_records == 3 and store.stats.written_records == 0
    assert store.stats.write_errors >= 1
    store.append(record())  # after close: dropped, no exception
    assert store.stats.dropped_records == 4


def test_migration_from_schema_version_1(tmp_path):
    path = str(tmp_path / "old.db")
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate_sqlite(conn, target=1) == 1
    old = record(seed=3)
    e = encode(old)
    conn.execute(
        "INSERT INTO traffic_records (created_at, key_id, draft_version, m, prompt_ids, output_ids, topm_ids, "
        "topm_logprobs, steps) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            e.created_at,
            e.key_id,
            e.draft_version,
            e.m,
            e.prompt_ids,
            e.output_ids,
            e.topm_ids,
            e.topm_logprobs,
            e.steps,
        ),
    )
    conn.close()
    with open_store(path, max_bytes=10 * e.nbytes) as store:
        assert store.count() == 1 and store.summary().bytes == e.nbytes  # sizes and totals backfilled
        assert_same(store.read()[0], old)
        store.append(record(seed=4))
        store.flush(timeout=30)
        assert store.count() == 2
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT version FROM traffic_schema_version").fetchall() == [(len(SQLITE_MIGRATIONS),)]
    conn.execute("UPDATE traffic_schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="schema version 99, newer"):
        open_store(path)


def test_unwritable_directory_fails_at_open(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/specserve/traffic.db"  # root may write anywhere on disk, not under /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "traffic.db")
    with pytest.raises(OSError):
        open_store(target)


def test_urls():
    assert describe("postgresql://u:secret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert describe("sqlite:///a/b.db") == "sqlite:///a/b.db"
    with pytest.raises(ValueError, match="scheme 'mysql'"):
        open_store("mysql://u:secret@h/db")
    with pytest.raises(ValueError, match="names no file"):
        open_store("sqlite://")
    with pytest.raises(ValueError, match="max_records must be >= 1"):
        open_store("x.db", max_records=0)


def test_record_validation():
    r = record(n=3)
    with pytest.raises(ValueError, match="3 rows for 2 output tokens"):
        TrafficRecord([1], [1, 2], r.topm_ids, r.topm_logprobs, [], "v", "k", 0.0)
    with pytest.raises(ValueError, match="step source"):
        TrafficRecord([1], r.output_token_ids, r.topm_ids, r.topm_logprobs, [("eagle", 1, 1)], "v", "k", 0.0)


# ---- PostgreSQL ---------------------------------------------------------------------------------------


def test_postgres_migration_from_schema_version_1(postgres):
    import psycopg

    from specserve.traffic.postgres_store import POSTGRES_MIGRATIONS, migrate_postgres

    url = postgres.new_database()
    old = record(seed=5)
    e = encode(old)
    with psycopg.connect(url, autocommit=True) as conn:
        assert migrate_postgres(conn, target=1) == 1
        conn.execute(
            "INSERT INTO traffic_records (created_at, key_id, draft_version, m, prompt_ids, output_ids, topm_ids, "
            "topm_logprobs, steps) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                e.created_at,
                e.key_id,
                e.draft_version,
                e.m,
                e.prompt_ids,
                e.output_ids,
                e.topm_ids,
                e.topm_logprobs,
                e.steps,
            ),
        )
    with open_store(url) as store:
        assert store.count() == 1 and store.summary().bytes == e.nbytes
        assert_same(store.read()[0], old)
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM traffic_schema_version").fetchall() == [(len(POSTGRES_MIGRATIONS),)]


def test_postgres_many_writers_commit_in_id_order(postgres):
    url = postgres.new_database()
    stores = [open_store(url, batch_size=4) for _ in range(3)]
    threads = [
        threading.Thread(target=lambda s=s, k=k: [s.append(record(seed=i, key=f"r{k}")) for i in range(40)])
        for k, s in enumerate(stores)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in stores:
        s.flush(timeout=60)
    reader = stores[0]
    ids = [r.record_id for r in reader.read(limit=1000)]
    assert len(ids) == 120 == reader.count() and ids == sorted(ids)
    assert reader.summary().per_key == {"r0": 40, "r1": 40, "r2": 40}
    for s in stores:
        s.close()


def test_postgres_down_buffers_then_drops_and_recovers(postgres):
    url = postgres.new_database()
    store = open_store(url, max_buffered=5)
    store.append(record(seed=0))
    store.flush(timeout=30)
    postgres.stop()
    try:
        store.append(record(seed=1))
        assert wait_until(lambda: store.stats.write_errors >= 1)  # the writer holds that record and retries
        for i in range(2, 10):  # serving goes on: append returns at once; 5 are buffered, 3 dropped
            store.append(record(seed=i))
        assert store.stats.dropped_records == 3 and store.buffered == 6
    finally:
        postgres.start()
    store.flush(timeout=60)  # the writer reconnects (backoff) and writes what it buffered
    assert store.stats.written_records == 7 and store.count() == 7
    assert [r.output_token_ids for r in store.read()] == [record(seed=i).output_token_ids for i in range(7)]
    store.close()


def test_postgres_unreachable_at_open_is_not_an_error():
    pytest.importorskip("psycopg")
    store = open_store(f"postgresql://nobody:pw@127.0.0.1:{free_port()}/none", max_buffered=2)
    store.append(record(seed=0))
    assert wait_until(lambda: store.stats.write_errors >= 1)
    for i in range(1, 5):
        store.append(record(seed=i))
    assert store.stats.dropped_records == 2 and store.buffered == 3
    assert "pw" not in store.name
    store.close(timeout=0.3)
    assert store.stats.dropped_records == 5 and store.stats.written_records == 0
