"""Request limits: the body-size guard, the size limits of one request, and per-key rate limits.

Rate limits are token buckets, one for requests and one for tokens per key: a bucket holds up to
its per-minute limit and refills continuously at limit / 60 per second, so a key may burst up to
its limit and then goes at the steady rate. A generation request reserves prompt tokens plus
``max_tokens`` (times ``n``) up front and settles to the tokens it actually used when it ends, so
a request cut short by a stop string or a vanished client gives the rest back.

Threads: ``RateLimiter.reserve`` and ``Reservation`` run on the event loop; ``rejections()`` may
be called from any thread. Knows nothing about routes, OpenAI shapes or key secrets (a key is its
id here); BodyTooLarge is a plain Starlette 413 that ``errors.py`` reshapes.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


@dataclass(frozen=True)
class LimitsConfig:
    """What one request may ask for, and the default rate limits of a key."""

    max_body_bytes: int = 1 << 20
    """Largest request body in bytes; a larger one gets 413 before it is parsed."""
    max_prompt_tokens: int | None = None
    """Most tokens in one prompt (each prompt of a batch, or a rendered chat); None: only the context bounds it."""
    max_output_tokens: int | None = None
    """Largest max_tokens / max_completion_tokens a request may give (400 above it); a request that gives none
    gets at most this many. None: only the room the prompt leaves in the context bounds it."""
    requests_per_minute: int | None = None
    """Generation requests per minute and key, for keys that set no limit of their own; None: unlimited."""
    tokens_per_minute: int | None = None
    """Prompt + max_tokens reserved per minute and key (settled to the tokens used), for keys that set no limit
    of their own; None: unlimited."""

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        for name in ("max_prompt_tokens", "max_output_tokens", "requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (no limit), got {value}")


class RateLimitExceeded(Exception):
    """A key ran out of requests or tokens for now (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after: float, limit: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds until the request would pass, were nothing else sent meanwhile."""
        self.limit = limit
        """'requests' or 'tokens': the bucket that was short."""


class TokenBucket:
    """Holds up to ``per_minute`` units, refilled at ``per_minute / 60`` per second; starts full."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.level = self.capacity
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(0.0, now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def wait(self, amount: float) -> float:
        """Seconds until ``amount`` units are there (after ``refill``); 0 if they are now."""
        return max(0.0, amount - self.level) / self.rate

    def take(self, amount: float) -> None:
        self.level -= amount

    def give_back(self, amount: float) -> None:
        self.level = min(self.capacity, self.level + amount)


class Reservation:
    """What one admitted request took from its key's buckets; settle or cancel it exactly once."""

    def __init__(self, requests: TokenBucket | None, tokens: TokenBucket | None, reserved_tokens: int) -> None:
        self._requests = requests
        self._tokens = tokens
        self.reserved_tokens = reserved_tokens
        self._open = True

    def settle(self, used_tokens: int) -> None:
        """The request ended having used ``used_tokens`` (prompt + generated): give back the rest."""
        if self._open and self._tokens is not None:
            self._tokens.give_back(max(0, self.reserved_tokens - used_tokens))
        self._open = False

    def cancel(self) -> None:
        """The request never ran (refused after the reservation): give back everything."""
        if self._open and self._requests is not None:
            self._requests.give_back(1)
        self.settle(0)


class RateLimiter:
    """Per-key token buckets for requests and tokens per minute; ``clock`` is injectable for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._lock = threading.Lock()
        self._rejections: dict[tuple[str, str], int] = {}

    def rejections(self) -> dict[tuple[str, str], int]:
        """(key id, 'requests' | 'tokens') -> requests refused so far; thread-safe."""
        with self._lock:
            return dict(self._rejections)

    def _bucket(self, key_id: str, kind: str, per_minute: int | None, now: float) -> TokenBucket | None:
        if per_minute is None:
            return None
        bucket = self._buckets.get((key_id, kind))
        if bucket is None:
            bucket = self._buckets[key_id, kind] = TokenBucket(per_minute, now)
        bucket.refill(now)
        return bucket

    def reserve(
        self, key_id: str, requests_per_minute: int | None, tokens_per_minute: int | None, tokens: int
    ) -> Reservation:
        """Take one request and ``tokens`` tokens from the key's buckets, or neither.

        Raises RateLimitExceeded (with the seconds to wait) when a bucket is short, and ValueError
        when ``tokens`` exceeds the key's whole per-minute token limit (waiting would never help).
        """
        if tokens_per_minute is not None and tokens > tokens_per_minute:
            raise ValueError(
                f"max_tokens: this request needs up to {tokens} tokens (prompt + max_tokens x n), more "
                f"than the {tokens_per_minute} tokens per minute its API key may use; lower max_tokens "
                "or n, or shorten the prompt"
            )
        now = self.clock()
        requests = self._bucket(key_id, "requests", requests_per_minute, now)
        token_bucket = self._bucket(key_id, "tokens", tokens_per_minute, now)
        for kind, bucket, amount, limit in (
            ("requests", requests, 1, requests_per_minute),
            ("tokens", token_bucket, tokens, tokens_per_minute),
        ):
            if bucket is None:
                continue
            wait = bucket.wait(amount)
            if wait > 0:
                with self._lock:
                    self._rejections[key_id, kind] = self._rejections.get((key_id, kind), 0) + 1
                used = math.ceil(bucket.capacity - bucket.level)
                raise RateLimitExceeded(
                    f"rate limit reached for API key {key_id} on {kind} per minute: limit {limit}, used {used}, "
                    f"requested {amount}; try again in {math.ceil(wait)}s",
                    retry_after=wait,
                    limit=kind,
                )
        if requests is not None:
            requests.take(1)
        if token_bucket is not None:
            token_bucket.take(tokens)
        return Reservation(requests, token_bucket, tokens)


class BodyTooLarge(HTTPException):
    def __init__(self, size: int | str, limit: int) -> None:
        super().__init__(
            413, f"the request body is {size} bytes; this server accepts at most {limit} bytes (--max-body-bytes)"
        )


class BodySizeLimit:
    """ASGI middleware: a body over ``max_bytes`` (declared in Content-Length or as received) raises
    BodyTooLarge (HTTP 413) where the app reads it, before any JSON parsing."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        received = 0

        async def limited() -> Message:
            nonlocal received
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise BodyTooLarge(int(declared), self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(f"more than {self.max_bytes}", self.max_bytes)
            return message

        await self.app(scope, limited, send)
