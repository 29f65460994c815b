"""TrafficLog: the server's end of the traffic log: each finished request's trace becomes a record in the store.

``record`` runs on the event loop, as a finished output is observed: it wraps the trace in a
TrafficRecord (sharing its tensors, no copy) and appends it to the store, which never waits on the
database (the store's writer thread does the I/O; see ``specserve.traffic.store``). Nothing here runs
on the engine thread. Whether a request is logged at all (logging on, its key not opted out) is
the caller's decision.

If the store cannot be opened (an unwritable data directory or file), the server serves without
a log: the failure is a warning and one write error, and every record counts as dropped, so that
``specserve_traffic_records_dropped_total`` shows what is being lost.
"""

from __future__ import annotations

import logging
import os
import sqlite3

from specserve.engine.trace import RequestTrace
from specserve.traffic import open_store
from specserve.traffic.record import TrafficRecord
from specserve.traffic.store import TrafficStore
from specserve.traffic.url import describe

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "SPECSERVE_DATA"


def default_data_dir() -> str:
    """$SPECSERVE_DATA, else ~/.local/share/specserve: where the server keeps its traffic log."""
    return os.environ.get(DATA_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".local", "share", "specserve")


def default_store_url(data_dir: str) -> str:
    return f"sqlite://{os.path.join(os.path.abspath(data_dir), 'traffic.db')}"


class TrafficLog:
    def __init__(self, url: str, store: TrafficStore | None, open_error: str | None = None) -> None:
        self.name = describe(url)
        self.store = store
        self.open_error = open_error
        """Why the store could not be opened (None: it was)."""
        self._dropped = 0  # records of a log without a store, and records that could not be built
        self._errors = 0 if store is not None else 1

    @classmethod
    def open(cls, url: str, **options) -> TrafficLog:
        """The log over ``open_store(url, **options)``; a store that cannot be opened leaves a log that drops.

        Configuration errors (a bad URL or option, a store from a newer specserve) raise ValueError:
        those are the operator's to fix before serving, not failures to ride out.
        """
        try:
            return cls(url, open_store(url, **options))
        except (OSError, sqlite3.Error) as e:  # an unwritable directory or file, a full disk
            logger.warning(
                "traffic log: cannot open the store %s (%s); serving without a traffic log, records are dropped "
                "and counted in specserve_traffic_records_dropped_total",
                describe(url),
                e,
            )
            return cls(url, None, str(e))

    def record(self, trace: RequestTrace, key_id: str) -> None:
        """Event loop: log one finished request; never raises, never waits on the database."""
        if self.store is None:
            self._dropped += 1
            return
        try:
            self.store.append(TrafficRecord.from_trace(trace, key_id))
        except Exception:  # a malformed trace is a bug, but it must not fail the request it came with
            logger.exception("traffic log: could not log request %s", trace.request_id)
            self._dropped += 1
            self._errors += 1

    @property
    def written_records(self) -> int:
        return self.store.stats.written_records if self.store is not None else 0

    @property
    def dropped_records(self) -> int:
        return self._dropped + (self.store.stats.dropped_records if self.store is not None else 0)

    @property
    def write_errors(self) -> int:
        return self._errors + (self.store.stats.write_errors if self.store is not None else 0)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is buffered (for at most ``timeout`` s) and close the store."""
        if self.store is not None:
            self.store.close(timeout)
