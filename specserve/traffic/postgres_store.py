"""PostgresTrafficStore: the traffic log in PostgreSQL, so that many server replicas write one store
and one trainer reads all of it.

The API, the writer thread, the bounded buffer and the retention rules are the SQLite store's
(``store``); what differs:

- The database may be unreachable at any time, startup included. Opening the store only checks the
  URL and tries one connection (a warning if it fails); the writer connects, and migrates, when it
  next writes, and after any failure drops its connection and reconnects with backoff. Meanwhile
  records wait in the bounded buffer, then are dropped and counted; serving never waits.
- Many writers: every write transaction first takes a transaction-level advisory lock, so record ids
  (BIGSERIAL) commit in increasing order (a reader tailing by record_id never skips a record that
  committed late) and one writer at a time enforces the size bound. Migrations take another advisory
  lock, so replicas that start together migrate once.
- The totals are kept by statement-level triggers over transition tables: one update per statement.

psycopg 3 is imported when a PostgreSQL store is opened: ``pip install 'specserve[postgres]'``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from specserve.traffic.record import EncodedRecord
from specserve.traffic.store import COLUMNS, StoreConfig, TrafficStore, apply_migrations
from specserve.traffic.url import describe

logger = logging.getLogger(__name__)

WRITE_LOCK, MIGRATE_LOCK = 0x7370_6563_0001, 0x7370_6563_0002
"""Advisory lock keys (any two constants this database's other users do not take)."""
CONNECT_TIMEOUT_S = 5

POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: the records
        """CREATE TABLE traffic_records (
            record_id BIGSERIAL PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL,
            key_id TEXT NOT NULL,
            draft_version TEXT NOT NULL,
            m INTEGER NOT NULL,
            prompt_ids BYTEA NOT NULL,
            output_ids BYTEA NOT NULL,
            topm_ids BYTEA NOT NULL,
            topm_logprobs BYTEA NOT NULL,
            steps TEXT NOT NULL)""",
        "CREATE INDEX traffic_records_created_at ON traffic_records (created_at)",
    ),
    (  # 2: record sizes and running totals (bounds without table scans); per-key deletion by index
        "ALTER TABLE traffic_records ADD COLUMN nbytes BIGINT NOT NULL DEFAULT 0",
        "UPDATE traffic_records SET nbytes = octet_length(prompt_ids) + octet_length(output_ids) "
        "+ octet_length(topm_ids) + octet_length(topm_logprobs) + length(steps) + length(key_id) "
        "+ length(draft_version)",
        "CREATE INDEX traffic_records_key_id ON traffic_records (key_id)",
        "CREATE TABLE traffic_totals (id INTEGER PRIMARY KEY CHECK (id = 1), records BIGINT NOT NULL, "
        "bytes BIGINT NOT NULL)",
        "INSERT INTO traffic_totals SELECT 1, COUNT(*), COALESCE(SUM(nbytes), 0) FROM traffic_records",
        """CREATE FUNCTION traffic_totals_add() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            UPDATE traffic_totals SET records = records + (SELECT COUNT(*) FROM new_rows),
                bytes = bytes + (SELECT COALESCE(SUM(nbytes), 0) FROM new_rows);
            RETURN NULL; END $$""",
        """CREATE FUNCTION traffic_totals_sub() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
            UPDATE traffic_totals SET records = records - (SELECT COUNT(*) FROM old_rows),
                bytes = bytes - (SELECT COALESCE(SUM(nbytes), 0) FROM old_rows);
            RETURN NULL; END $$""",
        "CREATE TRIGGER traffic_totals_insert AFTER INSERT ON traffic_records REFERENCING NEW TABLE AS new_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION traffic_totals_add()",
        "CREATE TRIGGER traffic_totals_delete AFTER DELETE ON traffic_records REFERENCING OLD TABLE AS old_rows "
        "FOR EACH STATEMENT EXECUTE FUNCTION traffic_totals_sub()",
    ),
)


def _psycopg():
    try:
        import psycopg
    except ImportError as e:
        raise ValueError(
            "a postgresql:// traffic store needs psycopg 3: pip install 'specserve[postgres]' "
            "(or pip install 'psycopg[binary]')"
        ) from e
    return psycopg


def migrate_postgres(conn, target: int = len(POSTGRES_MIGRATIONS)) -> int:
    """Bring the schema up to version ``target`` (default: the newest), in one transaction; returns the version."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        return apply_migrations(conn, POSTGRES_MIGRATIONS, target, "%s")


class PostgresTrafficStore(TrafficStore):
    def __init__(self, url: str, config: StoreConfig) -> None:
        super().__init__(describe(url), config)
        self._pg = _psycopg()
        try:
            self._pg.conninfo.conninfo_to_dict(url)
        except self._pg.ProgrammingError as e:
            raise ValueError(f"traffic store URL {describe(url)!r} is not a PostgreSQL connection string: {e}") from e
        self.url = url
        self._conn = None  # callers', under _caller_lock
        self._writer = None  # the writer thread's (set here before it starts)
        try:
            self._writer = self._connect()
        except Exception as e:
            logger.warning(
                "traffic store %s: cannot connect (%s); serving goes on, records are buffered (up to %d) "
                "while the writer keeps retrying",
                self.name,
                e,
                config.max_buffered,
            )
        self._start()

    def _connect(self):
        conn = self._pg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        try:
            migrate_postgres(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _execute(self, conn, sql: str, params: tuple = ()):
        # no parameters: no placeholder parsing (the SQL may hold a literal '%')
        return conn.execute(sql.replace("?", "%s"), params or None)

    def _insert(self, conn, rows: list[EncodedRecord]) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK,))
        marks = "(" + ", ".join(["%s"] * len(COLUMNS)) + ")"
        conn.execute(
            f"INSERT INTO traffic_records ({', '.join(COLUMNS)}) VALUES {', '.join([marks] * len(rows))}",
            tuple(getattr(r, c) for r in rows for c in COLUMNS),
        )

    @contextmanager
    def _caller(self) -> Iterator:
        with self._caller_lock:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            try:
                yield self._conn
            except self._pg.OperationalError:
                self._conn.close()
                self._conn = None
                raise

    @contextmanager
    def _transaction(self, conn) -> Iterator[None]:
        with conn.transaction():
            yield

    def _writer_connection(self):
        if self._writer is None or self._writer.closed:
            self._writer = self._connect()
        return self._writer

    def _writer_failed(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _close_connections(self) -> None:
        if self._writer is not None:
            self._writer.close()
        with self._caller_lock:
            if self._conn is not None:
                self._conn.close()
