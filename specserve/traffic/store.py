"""TrafficStore: where the traffic log's records live, written off the serving path; what every backend shares.

Threads. ``append`` is called from any thread (the server's event loop) and never waits on the
database: it puts the record into a bounded buffer or, when the buffer is full, drops it and counts
it. One writer thread per store takes what the buffer holds (up to ``batch_size`` records) and
writes it in one transaction, in which it also enforces the size bound (``max_records``,
``max_bytes``: oldest records first). When a write fails it counts the error, backs off (0.1 s
doubling to 10 s) and retries the same batch, so while the database is unwritable or unreachable
records wait in the buffer up to its bound and then are dropped. The retention period
(``retention_days``) is enforced by the writer at open and then once every ``prune_interval``
seconds. ``read``, ``count``, ``delete_key``, ``prune`` and ``summary`` are for the trainer and the
command line: any thread, on a connection of their own.

Schema: ``traffic_records`` (one row a record; arrays as little-endian blobs, see ``record``),
``traffic_totals`` (the record count and byte total, kept by triggers so neither needs a table scan)
and ``traffic_schema_version``. The project migrates it: opening a store applies the missing
migrations of its backend in order (``apply_migrations``), in one transaction; a database written by
a newer specserve is refused. Record ids come from AUTOINCREMENT (SQLite) or BIGSERIAL (PostgreSQL),
so they increase and are never reused after deletions: a reader that remembers the last id it saw
misses nothing.

Backends (``sqlite_store``, ``postgres_store``) supply connections and their SQL dialect; ``open_store``
(the package) picks one from a URL.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from specserve.traffic.record import EncodedRecord, TrafficRecord, decode, encode

logger = logging.getLogger(__name__)

BACKOFF_MIN, BACKOFF_MAX = 0.1, 10.0
"""Seconds the writer waits after a failed write: doubling from the first to the second."""
COLUMNS = (
    "created_at",
    "key_id",
    "draft_version",
    "m",
    "prompt_ids",
    "output_ids",
    "topm_ids",
    "topm_logprobs",
    "steps",
    "nbytes",
)
"""The columns a write fills: EncodedRecord's fields (and its size)."""
SELECT = (
    "SELECT record_id, created_at, key_id, draft_version, m, prompt_ids, output_ids, topm_ids, topm_logprobs, "
    "steps FROM traffic_records"
)


@dataclass(frozen=True)
class StoreConfig:
    max_records: int | None = None
    """Keep at most this many records; the oldest go first. None: no bound."""
    max_bytes: int | None = None
    """Keep at most this many bytes of record data (blobs and strings); the oldest go first. None: no bound."""
    retention_days: float | None = None
    """Delete records older than this many days. None: keep them until a size bound removes them."""
    max_buffered: int = 10_000
    """Most records waiting for the writer; beyond it ``append`` drops the record and counts it."""
    batch_size: int = 256
    """Most records written in one transaction."""
    prune_interval: float = 60.0
    """Seconds between the writer's retention-period passes."""

    def __post_init__(self) -> None:
        for name in ("max_records", "max_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (no bound), got {value}")
        if self.retention_days is not None and not self.retention_days > 0:
            raise ValueError(f"retention_days must be > 0 or None (keep), got {self.retention_days}")
        if self.max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {self.max_buffered}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.prune_interval > 0:
            raise ValueError(f"prune_interval must be > 0 seconds, got {self.prune_interval}")


@dataclass
class TrafficStats:
    """Counters since the store was opened (ints; read them from any thread)."""

    written_records: int = 0
    dropped_records: int = 0
    """Appended but never written: the buffer was full, or the store closed before the database came back."""
    write_errors: int = 0
    """Failed write (or retention) transactions; each failed write is retried."""
    evicted_records: int = 0
    """Deleted by the size bound or the retention period (by the writer)."""
    batches: int = 0
    """Write transactions that committed."""


@dataclass
class StoreSummary:
    records: int
    bytes: int
    oldest: float | None
    """created_at of the oldest record (unix time); None when empty."""
    newest: float | None
    per_key: dict[str, int] = field(default_factory=dict)
    per_draft_version: dict[str, int] = field(default_factory=dict)


def _decode_row(row: tuple) -> TrafficRecord:
    """A row of SELECT (record_id first); blobs may come back as memoryview, made bytes here."""
    record_id, created_at, key_id, draft_version, m, *blobs, steps = row
    return decode(EncodedRecord(created_at, key_id, draft_version, m, *map(bytes, blobs), steps), record_id)


class TrafficStore:
    """The writer thread and the SQL both backends share; a backend supplies connections and its dialect."""

    def __init__(self, name: str, config: StoreConfig) -> None:
        self.name = name
        """The store's URL, password hidden."""
        self.config = config
        self.stats = TrafficStats()
        self._cv = threading.Condition()
        # guarded by _cv:
        self._buffer: deque[TrafficRecord] = deque()
        self._in_flight = 0  # records the writer took and has not finished with
        self._closing = False
        self._deadline = math.inf  # once closing: when the writer gives up on an unwritable database
        self._caller_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="specserve-traffic-writer", daemon=True)

    # ---- any thread -----------------------------------------------------------------------------

    def append(self, record: TrafficRecord) -> None:
        """Queue ``record`` for the writer; drop it (counted in ``stats.dropped_records``) if the buffer is full."""
        with self._cv:
            if self._closing or len(self._buffer) >= self.config.max_buffered:
                self.stats.dropped_records += 1
                return
            self._buffer.append(record)
            self._cv.notify_all()

    @property
    def buffered(self) -> int:
        """Records appended and not yet written (waiting or being written)."""
        with self._cv:
            return len(self._buffer) + self._in_flight

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every record appended so far is written (or dropped); TimeoutError after ``timeout`` s."""
        with self._cv:
            done = self._cv.wait_for(
                lambda: not (self._buffer or self._in_flight) or not self._thread.is_alive(), timeout
            )
            if not done:
                raise TimeoutError(
                    f"traffic store {self.name}: {len(self._buffer) + self._in_flight} records still "
                    f"unwritten after {timeout} s ({self.stats.write_errors} write errors so far)"
                )

    def close(self, timeout: float = 10.0) -> None:
        """Write what is buffered (giving up after ``timeout`` s: the rest counts as dropped), stop the writer."""
        with self._cv:
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._close_connections()

    def __enter__(self) -> TrafficStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reads and deletions (any thread, own connection) ---------------------------------------

    def read(self, after_id: int = 0, limit: int = 1000) -> list[TrafficRecord]:
        """Up to ``limit`` records with record_id > ``after_id``, in record_id order."""
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        with self._caller() as conn:
            rows = self._execute(
                conn, f"{SELECT} WHERE record_id > ? ORDER BY record_id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [_decode_row(row) for row in rows]

    def count(self) -> int:
        with self._caller() as conn:
            return int(self._execute(conn, "SELECT records FROM traffic_totals").fetchone()[0])

    def delete_key(self, key_id: str) -> int:
        """Delete every record of ``key_id`` (those still buffered here are written first); returns how many."""
        self.flush(timeout=30.0)
        with self._caller() as conn, self._transaction(conn):
            return self._execute(conn, "DELETE FROM traffic_records WHERE key_id = ?", (key_id,)).rowcount

    def prune(self, retention_days: float) -> int:
        """Delete the records older than ``retention_days`` days; returns how many."""
        if not retention_days > 0:
            raise ValueError(f"retention_days must be > 0, got {retention_days}")
        with self._caller() as conn, self._transaction(conn):
            return self._delete_older(conn, retention_days)

    def summary(self) -> StoreSummary:
        with self._caller() as conn:
            records, nbytes = self._execute(conn, "SELECT records, bytes FROM traffic_totals").fetchone()
            oldest, newest = self._execute(
                conn, "SELECT MIN(created_at), MAX(created_at) FROM traffic_records"
            ).fetchone()
            per_key = self._execute(conn, "SELECT key_id, COUNT(*) FROM traffic_records GROUP BY key_id").fetchall()
            per_version = self._execute(
                conn, "SELECT draft_version, COUNT(*) FROM traffic_records GROUP BY draft_version"
            ).fetchall()
        return StoreSummary(int(records), int(nbytes), oldest, newest, dict(per_key), dict(per_version))

    # ---- the writer thread ------------------------------------------------------------------------

    def _start(self) -> None:
        """Backends call this once their database is ready (the end of their __init__)."""
        self._thread.start()

    def _run(self) -> None:
        next_prune = time.monotonic() if self.config.retention_days is not None else math.inf
        try:
            while True:
                if time.monotonic() >= next_prune:
                    self._prune_expired()
                    next_prune = time.monotonic() + self.config.prune_interval
                with self._cv:
                    while not self._buffer and not self._closing:
                        wait = None if next_prune == math.inf else max(0.0, next_prune - time.monotonic())
                        if not self._cv.wait(timeout=wait):
                            break  # time for the retention pass
                    if not self._buffer:
                        if self._closing:
                            return
                        continue
                    batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), self.config.batch_size))]
                    self._in_flight = len(batch)
                try:
                    self._write_until_done(batch)
                finally:
                    with self._cv:
                        self._in_flight = 0
                        self._cv.notify_all()
        except BaseException:
            logger.exception("traffic store %s: the writer thread stopped", self.name)
            raise
        finally:
            with self._cv:
                self._closing = True
                self.stats.dropped_records += len(self._buffer)
                self._buffer.clear()
                self._cv.notify_all()

    def _write_until_done(self, batch: list[TrafficRecord]) -> None:
        """Write ``batch`` in one transaction, retrying with backoff; once closing, give up at the deadline."""
        rows = [encode(r) for r in batch]
        delay, failures = BACKOFF_MIN, 0
        while True:
            try:
                conn = self._writer_connection()
                with self._transaction(conn):
                    self._insert(conn, rows)
                    evicted = self._enforce_bounds(conn)
                self.stats.written_records += len(rows)
                self.stats.evicted_records += evicted
                self.stats.batches += 1
                if failures:
                    logger.warning("traffic store %s: writing again after %d failed attempts", self.name, failures)
                return
            except Exception as e:
                self.stats.write_errors += 1
                failures += 1
                self._writer_failed()
                with self._cv:
                    left = self._deadline - time.monotonic()
                    if left <= 0:
                        logger.error(
                            "traffic store %s: closing with the database unwritable (%s); %d records dropped",
                            self.name,
                            e,
                            len(rows) + len(self._buffer),
                        )
                        self.stats.dropped_records += len(rows)
                        return
                    # the first failure and every tenth: a database that stays down must not flood the log
                    logger.log(
                        logging.WARNING if failures % 10 == 1 else logging.DEBUG,
                        "traffic store %s: writing %d records failed (%s); retrying in %.1f s, %d more buffered",
                        self.name,
                        len(rows),
                        e,
                        delay,
                        len(self._buffer),
                    )
                    self._cv.wait(timeout=min(delay, left))
                delay = min(2 * delay, BACKOFF_MAX)

    def _enforce_bounds(self, conn) -> int:
        """Inside the write transaction: delete the oldest records beyond max_records / max_bytes."""
        evicted = 0
        records, nbytes = self._execute(conn, "SELECT records, bytes FROM traffic_totals").fetchone()
        if self.config.max_records is not None and records > self.config.max_records:
            evicted += self._execute(
                conn,
                "DELETE FROM traffic_records WHERE record_id IN "
                "(SELECT record_id FROM traffic_records ORDER BY record_id LIMIT ?)",
                (records - self.config.max_records,),
            ).rowcount
            nbytes = self._execute(conn, "SELECT bytes FROM traffic_totals").fetchone()[0]
        if self.config.max_bytes is not None and nbytes > self.config.max_bytes:
            excess, freed, cutoff = nbytes - self.config.max_bytes, 0, 0
            while freed < excess:  # walk from the oldest until enough bytes are covered
                chunk = self._execute(
                    conn,
                    "SELECT record_id, nbytes FROM traffic_records WHERE record_id > ? ORDER BY record_id LIMIT 1000",
                    (cutoff,),
                ).fetchall()
                if not chunk:
                    break
                for record_id, size in chunk:
                    freed, cutoff = freed + size, record_id
                    if freed >= excess:
                        break
            evicted += self._execute(conn, "DELETE FROM traffic_records WHERE record_id <= ?", (cutoff,)).rowcount
        return evicted

    def _prune_expired(self) -> None:
        try:
            conn = self._writer_connection()
            with self._transaction(conn):
                self.stats.evicted_records += self._delete_older(conn, self.config.retention_days)
        except Exception as e:
            self.stats.write_errors += 1
            self._writer_failed()
            logger.warning(
                "traffic store %s: deleting records older than %s days failed (%s); retrying in %.0f s",
                self.name,
                self.config.retention_days,
                e,
                self.config.prune_interval,
            )

    def _delete_older(self, conn, retention_days: float) -> int:
        cutoff = time.time() - retention_days * 86400.0
        return self._execute(conn, "DELETE FROM traffic_records WHERE created_at < ?", (cutoff,)).rowcount

    # ---- backend hooks -------------------------------------------------------------------------------

    def _execute(self, conn, sql: str, params: tuple = ()):
        """Run one statement of the shared SQL (written with '?' parameter markers)."""
        return conn.execute(sql, params)

    def _insert(self, conn, rows: list[EncodedRecord]) -> None:
        marks = ", ".join("?" * len(COLUMNS))
        sql = f"INSERT INTO traffic_records ({', '.join(COLUMNS)}) VALUES ({marks})"
        for r in rows:
            self._execute(conn, sql, tuple(getattr(r, c) for c in COLUMNS))

    @contextmanager
    def _caller(self) -> Iterator:
        """The connection of callers other than the writer, one at a time."""
        raise NotImplementedError

    @contextmanager
    def _transaction(self, conn) -> Iterator[None]:
        raise NotImplementedError

    def _writer_connection(self):
        """Writer thread: its connection (opened, or reopened after a failure, here)."""
        raise NotImplementedError

    def _writer_failed(self) -> None:
        """Writer thread: a transaction failed; drop the connection if it may be broken."""

    def _close_connections(self) -> None:
        raise NotImplementedError


def apply_migrations(conn, migrations: list, target: int, placeholder: str) -> int:
    """The schema steps both backends share, inside the caller's transaction: read the version, refuse a newer
    schema, run the missing migrations up to `target`, record the version. `placeholder`: '?' or '%s'."""
    conn.execute("CREATE TABLE IF NOT EXISTS traffic_schema_version (version INTEGER NOT NULL)")
    row = conn.execute("SELECT version FROM traffic_schema_version").fetchone()
    version = 0 if row is None else row[0]
    if version > len(migrations):
        raise ValueError(
            f"the traffic store has schema version {version}, newer than this specserve knows "
            f"(up to {len(migrations)}); upgrade specserve"
        )
    for v in range(version + 1, target + 1):
        for statement in migrations[v - 1]:
            conn.execute(statement)
    new = max(version, target)
    if row is None:
        conn.execute(f"INSERT INTO traffic_schema_version VALUES ({placeholder})", (new,))
    else:
        conn.execute(f"UPDATE traffic_schema_version SET version = {placeholder}", (new,))
    return new
