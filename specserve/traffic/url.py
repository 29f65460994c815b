"""Traffic store URLs: which backend a URL names, and how to show one without its password.

``sqlite:///abs/path.db`` (the path after ``sqlite://``), a plain file path (SQLite), or
``postgresql://user:password@host/db`` (PostgreSQL, needs ``specserve[postgres]``).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def describe(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe to log and print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def sqlite_path(url: str) -> str | None:
    """The SQLite file ``url`` names; None for a PostgreSQL URL; ValueError for anything else."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if scheme == "sqlite":
        if not rest:
            raise ValueError(f"traffic store URL {url!r} names no file; write sqlite:///absolute/path.db")
        return "/" + rest.lstrip("/") if rest.startswith("/") else rest
    if scheme in ("postgresql", "postgres"):
        return None
    raise ValueError(
        f"traffic store URL {describe(url)!r} has scheme {scheme!r}; use sqlite:///path.db, a file path or "
        "postgresql://user:password@host/db"
    )
