"""SQLiteTrafficStore: the traffic log in one SQLite file, the embedded default.

WAL mode, so readers never block the writer nor it them; the writer thread, the buffer and the SQL
are ``store.TrafficStore``'s. ``SQLITE_MIGRATIONS`` is this backend's schema history.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from specserve.traffic.store import StoreConfig, TrafficStore, apply_migrations

SQLITE_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the records
        """CREATE TABLE traffic_records (
            record_id INTEGER PRIMARY KEY AUTOINCREMENT,
            created_at REAL NOT NULL,
            key_id TEXT NOT NULL,
            draft_version TEXT NOT NULL,
            m INTEGER NOT NULL,
            prompt_ids BLOB NOT NULL,
            output_ids BLOB NOT NULL,
            topm_ids BLOB NOT NULL,
            topm_logprobs BLOB NOT NULL,
            steps TEXT NOT NULL)""",
        "CREATE INDEX traffic_records_created_at ON traffic_records (created_at)",
    ),
    (  # 2: record sizes and running totals (bounds without table scans); per-key deletion by index
        "ALTER TABLE traffic_records ADD COLUMN nbytes INTEGER NOT NULL DEFAULT 0",
        "UPDATE traffic_records SET nbytes = length(prompt_ids) + length(output_ids) + length(topm_ids) "
        "+ length(topm_logprobs) + length(steps) + length(key_id) + length(draft_version)",
        "CREATE INDEX traffic_records_key_id ON traffic_records (key_id)",
        "CREATE TABLE traffic_totals (id INTEGER PRIMARY KEY CHECK (id = 1), records INTEGER NOT NULL, "
        "bytes INTEGER NOT NULL)",
        "INSERT INTO traffic_totals SELECT 1, COUNT(*), COALESCE(SUM(nbytes), 0) FROM traffic_records",
        "CREATE TRIGGER traffic_totals_insert AFTER INSERT ON traffic_records BEGIN "
        "UPDATE traffic_totals SET records = records + 1, bytes = bytes + NEW.nbytes; END",
        "CREATE TRIGGER traffic_totals_delete AFTER DELETE ON traffic_records BEGIN "
        "UPDATE traffic_totals SET records = records - 1, bytes = bytes - OLD.nbytes; END",
    ),
)


class SQLiteTrafficStore(TrafficStore):
    """The embedded default: one SQLite file in WAL mode (readers never block the writer, nor it them)."""

    BUSY_TIMEOUT_MS = 5000
    """How long a statement waits for another connection's write lock before failing (then retried)."""

    def __init__(self, path: str, config: StoreConfig) -> None:
        super().__init__(f"sqlite://{os.path.abspath(path)}", config)
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._conn = self._connect()
        try:
            migrate_sqlite(self._conn)
            self._writer = self._connect()
        except BaseException:
            self._conn.close()
            raise
        self._start()

    def _connect(self) -> sqlite3.Connection:
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE takes the write lock up front)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self.BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise ValueError(f"traffic store {self.path}: SQLite refused WAL mode (journal_mode is {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: a crash loses at most the last commits, never corrupts
        return conn

    @contextmanager
    def _caller(self) -> Iterator[sqlite3.Connection]:
        with self._caller_lock:
            yield self._conn

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also after a failed COMMIT, which leaves the transaction open
                conn.execute("ROLLBACK")
            raise

    def _writer_connection(self) -> sqlite3.Connection:
        return self._writer

    def _close_connections(self) -> None:
        self._writer.close()
        with self._caller_lock:
            self._conn.close()


def migrate_sqlite(conn: sqlite3.Connection, target: int = len(SQLITE_MIGRATIONS)) -> int:
    """Bring the schema up to version ``target`` (default: the newest), in one transaction; returns the version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = apply_migrations(conn, SQLITE_MIGRATIONS, target, "?")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return version
