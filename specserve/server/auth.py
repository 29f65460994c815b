"""API keys: who may call the server, with which limits, and whether their traffic may be logged.

Keys come from a JSON file (``--api-keys-file``) or the same JSON in ``$SPECSERVE_API_KEYS``: a
list of objects, one per client::

    [{"name": "alice", "key": "sk-alice-...", "requests_per_minute": 60, "tokens_per_minute": 40000},
     {"name": "batch-job", "key": "sk-batch-...", "log_traffic": false}]

``name`` and ``key`` are required; the limits default to the server's (``--requests-per-minute``,
``--tokens-per-minute``); ``log_traffic`` (default true) set to false opts the key out of the
traffic log. Unknown fields are refused, so that a misspelt opt-out cannot pass silently.

A key is kept only as its SHA-256 digest; the secret itself is never stored, printed or logged.
Logs, metrics and the admin endpoint name a key by its *key id*, ``key-`` plus the first 12 hex
digits of the digest. Knows nothing about HTTP.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field

KEY_FIELDS = {"name", "key", "requests_per_minute", "tokens_per_minute", "log_traffic"}


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class APIKey:
    """One client's key and settings. What the handlers find on ``request.state.api_key``."""

    name: str
    """The operator's label for the client (not secret)."""
    digest: bytes = field(repr=False)
    """SHA-256 of the key; empty for the anonymous caller of a server without keys."""
    requests_per_minute: int | None = None
    """This key's own limit; None: the server's default (--requests-per-minute)."""
    tokens_per_minute: int | None = None
    """This key's own limit; None: the server's default (--tokens-per-minute)."""
    log_traffic: bool = True
    """False: the client opted out; its requests must not enter the traffic log."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an API key needs a non-empty name")
        for limit in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, limit)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"API key {self.name!r}: {limit} must be an integer >= 1, got {value!r}")
        if not isinstance(self.log_traffic, bool):
            raise ValueError(f"API key {self.name!r}: log_traffic must be true or false, got {self.log_traffic!r}")

    @classmethod
    def from_secret(cls, name: str, secret: str, **settings) -> APIKey:
        if not isinstance(secret, str) or not secret.strip():
            raise ValueError(f"API key {name!r} has an empty key")
        return cls(name, digest(secret.strip()), **settings)

    @property
    def key_id(self) -> str:
        """The name logs and metrics use: a prefix of the digest, which says nothing about the key."""
        return f"key-{self.digest.hex()[:12]}" if self.digest else "anonymous"


ANONYMOUS = APIKey("anonymous", b"")
"""The caller of a server that requires no key: every request is it, and shares its limits."""


def parse_keys(text: str, source: str) -> tuple[APIKey, ...]:
    """The keys of a JSON list as documented above; ``source`` names the file or variable in errors."""
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f'{source} is not valid JSON ({e}); expected a list of {{"name": ..., "key": ...}} objects'
        ) from e
    if not isinstance(entries, list):
        raise ValueError(f"{source} must hold a JSON list of key objects, got {type(entries).__name__}")
    keys = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "key" not in entry:
            raise ValueError(f"{source}: entry {i} must be an object with 'name' and 'key'")
        unknown = sorted(set(entry) - KEY_FIELDS)
        if unknown:
            raise ValueError(
                f"{source}: entry {i} ({entry['name']!r}) has unknown fields {unknown}; known: {sorted(KEY_FIELDS)}"
            )
        settings = {k: v for k, v in entry.items() if k not in ("name", "key")}
        keys.append(APIKey.from_secret(str(entry["name"]), entry["key"], **settings))
    return tuple(keys)


def load_keys(path: str) -> tuple[APIKey, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"cannot read the API keys file {path!r}: {e.strerror}") from e
    return parse_keys(text, f"API keys file {path!r}")


@dataclass(frozen=True)
class AccessConfig:
    """Who may call the server: client keys for /v1, an admin key for /admin."""

    keys: tuple[APIKey, ...] = ()
    """Client keys; empty: /v1 is open and every caller is ANONYMOUS."""
    admin: APIKey | None = None
    """The key of /admin routes; None: they are refused (403)."""

    def __post_init__(self) -> None:
        names = [k.name for k in self.keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"API key names must be unique; repeated: {dupes}")
        digests = [k.digest for k in self.keys]
        if len(set(digests)) != len(digests):
            clash = [k.name for k in self.keys if digests.count(k.digest) > 1]
            raise ValueError(f"API keys {clash} have the same key; give each client its own")
        if self.admin is not None and self.admin.digest in digests:
            raise ValueError("the admin key must differ from every client API key")

    @classmethod
    def build(
        cls, keys: tuple[APIKey, ...] = (), api_key: str | None = None, admin_key: str | None = None
    ) -> AccessConfig:
        """Keys plus the single ``--api-key`` (named 'default') and the admin key, from their secrets."""
        if api_key:
            keys = (*keys, APIKey.from_secret("default", api_key))
        return cls(keys, APIKey.from_secret("admin", admin_key) if admin_key else None)

    @property
    def open(self) -> bool:
        return not self.keys

    def authenticate(self, token: str) -> APIKey | None:
        """The client key ``token`` is, or None. Compares digests in constant time, every key each call."""
        presented = digest(token)
        found = None
        for key in self.keys:
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found

    def is_admin(self, token: str) -> bool:
        return self.admin is not None and hmac.compare_digest(digest(token), self.admin.digest)

    def name_of(self, key_id: str) -> str | None:
        return next((k.name for k in (*self.keys, ANONYMOUS) if k.key_id == key_id), None)
