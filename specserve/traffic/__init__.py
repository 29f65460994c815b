"""The traffic log's storage: records of served requests, kept off the serving path in SQLite or PostgreSQL.

``record`` is one served request and its byte encoding; ``store`` the writer thread, bounds and SQL every
backend shares; ``sqlite_store`` and ``postgres_store`` the backends; ``url`` which backend a URL names.
``open_store(url)`` opens one. The server writes here, the trainers and ``specserve traffic`` read; this
package imports nothing from them.
"""

from __future__ import annotations

from specserve.traffic.sqlite_store import SQLiteTrafficStore
from specserve.traffic.store import StoreConfig, TrafficStore
from specserve.traffic.url import sqlite_path


def open_store(url: str, **options) -> TrafficStore:
    """The store ``url`` names (see ``url``); ``options`` are StoreConfig's fields.

    SQLite creates the file (and its directory) and raises if it cannot; PostgreSQL only checks the
    URL here and keeps trying to connect in the background while it buffers.
    """
    config = StoreConfig(**options)
    path = sqlite_path(url)
    if path is not None:
        return SQLiteTrafficStore(path, config)
    from specserve.traffic.postgres_store import PostgresTrafficStore

    return PostgresTrafficStore(url, config)
