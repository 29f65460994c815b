"""ExtractionMonitor: per-key signals of distillation-style extraction, for an operator to look at.

Whoever distils the served model into their own sends many prompts, systematically: one prompt
template filled with many values, the same templates from several accounts, paced by a timer.
The monitor keeps each key's recent prompts (as MinHash signatures and hashes, never the text)
and request times, and computes per key:

- ``requests``: requests in the window (volume); ``prompts`` counts each prompt of a batch.
- ``templates``: clusters of near-duplicate prompts. A prompt is *normalised* (lower case; numbers,
  quoted spans, code blocks and URLs masked) and shingled into its word 1- and 2-grams; two prompts
  share a template when the Jaccard similarity of their shingle sets, estimated by MinHash, is at
  least ``similarity``.
- ``templated_fraction``: the share of the key's prompts that fall in a template filled with at
  least ``min_template_fills`` *different* prompts (so that a person retrying one question does
  not count).
- ``shared_fraction``: the share of the key's prompts in a template that another key uses too.
- ``timing_cv``: the coefficient of variation (std / mean) of the gaps between the key's requests;
  a timer gives ~0, people ~1 or more. None below ``min_gaps`` gaps.

A key is **flagged** when it sent at least ``min_requests`` requests in the window and shows at
least ``min_signals`` of the three behavioural signals: *templated* (``templated_fraction >=
templated_fraction``), *shared_templates* (``shared_fraction >= shared_fraction``), *regular_timing*
(``timing_cv <= regular_timing_cv``). The thresholds are the fields of ExtractionConfig. Detection
only: nothing is blocked. Thread-safe (one lock). Knows nothing about HTTP or key secrets.
"""

from __future__ import annotations

import hashlib
import re
import threading
import zlib
from collections import Counter, deque
from dataclasses import asdict, dataclass, field

import numpy as np

_PRIME = (1 << 61) - 1
_MASKS = [  # (pattern, placeholder), applied in order to the lower-cased prompt
    (re.compile(r"```.*?```", re.S), " <code> "),
    (re.compile(r"https?://\S+"), " <url> "),
    (re.compile(r'"[^"\n]{0,400}"|“[^”\n]{0,400}”|«[^»\n]{0,400}»|`[^`\n]{0,400}`'), " <q> "),
    (re.compile(r"(?<!\w)'[^'\n]{0,400}'(?!\w)"), " <q> "),
    (re.compile(r"\d+(?:[.,:/]\d+)*"), " <n> "),
]
_WORDS = re.compile(r"<\w+>|\w+|[^\w\s]")
MAX_PROMPT_CHARS = 4000
"""Only the first characters of a normalised prompt are shingled (cost bound)."""


def normalise(prompt: str) -> str:
    """The prompt's template: lower case, numbers / quoted spans / code / URLs masked, spaces collapsed."""
    text = prompt.lower()
    for pattern, placeholder in _MASKS:
        text = pattern.sub(placeholder, text)
    return " ".join(text.split())


@dataclass(frozen=True)
class ExtractionConfig:
    """The window the signals look at and the thresholds of the flag (see the module docstring)."""

    window_seconds: float = 3600.0
    """Signals cover each key's requests of the last window_seconds..."""
    max_window_prompts: int = 1000
    """...and at most its latest max_window_prompts prompts (bounds memory per key)."""
    min_requests: int = 50
    """Volume: a key with fewer requests in the window is never flagged."""
    similarity: float = 0.6
    """Estimated Jaccard similarity of shingle sets at or above which two prompts share a template."""
    min_template_fills: int = 5
    """Different prompts a template needs before its prompts count as templated."""
    templated_fraction: float = 0.5
    """Signal 'templated': at least this share of the key's prompts are templated."""
    shared_fraction: float = 0.3
    """Signal 'shared_templates': at least this share of the key's prompts use a template another key uses."""
    regular_timing_cv: float = 0.5
    """Signal 'regular_timing': the gaps between requests vary by at most this coefficient of variation."""
    min_gaps: int = 10
    """Gaps needed before timing_cv is computed."""
    min_signals: int = 2
    """Signals (of the three) a key with enough volume needs to be flagged."""
    num_hashes: int = 64
    """MinHash signature length (the similarity estimate's standard error is ~0.5 / sqrt(num_hashes))."""
    band_rows: int = 4
    """Rows per LSH band when looking for the same template under other keys (num_hashes must divide)."""

    def __post_init__(self) -> None:
        if self.window_seconds <= 0:
            raise ValueError(f"window_seconds must be > 0, got {self.window_seconds}")
        for name in ("max_window_prompts", "min_requests", "min_template_fills", "min_gaps", "num_hashes", "band_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("similarity", "templated_fraction", "shared_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.regular_timing_cv < 0:
            raise ValueError(f"regular_timing_cv must be >= 0, got {self.regular_timing_cv}")
        if not 1 <= self.min_signals <= 3:
            raise ValueError(f"min_signals must be 1, 2 or 3, got {self.min_signals}")
        if self.num_hashes % self.band_rows:
            raise ValueError(f"band_rows {self.band_rows} must divide num_hashes {self.num_hashes}")


@dataclass(frozen=True)
class KeySignals:
    """One key's signals over its window, and whether they add up to a flag."""

    key_id: str
    requests: int
    prompts: int
    templates: int
    distinct_prompts: int
    templated_fraction: float
    shared_fraction: float
    timing_cv: float | None
    signals: tuple[str, ...]
    flagged: bool

    def to_dict(self) -> dict:
        return {**asdict(self), "signals": list(self.signals)}


@dataclass
class _Template:
    signature: np.ndarray  # [num_hashes] uint64: the MinHash of the template's first prompt
    fills: Counter = field(default_factory=Counter)  # prompt hash -> prompts in the window

    @property
    def size(self) -> int:
        return sum(self.fills.values())


@dataclass
class _Window:
    prompts: deque = field(default_factory=deque)  # (time, template id, prompt hash), oldest first
    arrivals: deque = field(default_factory=deque)  # request times, oldest first
    templates: dict[int, _Template] = field(default_factory=dict)


class ExtractionMonitor:
    def __init__(self, config: ExtractionConfig | None = None) -> None:
        self.config = config = config or ExtractionConfig()
        rng = np.random.default_rng(0x5EC5E17E)  # fixed: signatures are comparable across runs
        self._a = rng.integers(1, 1 << 31, size=config.num_hashes, dtype=np.uint64)  # [num_hashes]
        self._b = rng.integers(0, 1 << 31, size=config.num_hashes, dtype=np.uint64)  # [num_hashes]
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._bands: dict[tuple[int, bytes], set[tuple[str, int]]] = {}  # LSH band -> (key id, template id)
        self._next_id = 0

    # ---- observing --------------------------------------------------------------------------------

    def signature(self, prompt: str) -> np.ndarray:  # [num_hashes] uint64
        """MinHash of the normalised prompt's word 1- and 2-gram set."""
        words = _WORDS.findall(normalise(prompt)[:MAX_PROMPT_CHARS])
        shingles = set(words) | {f"{u} {v}" for u, v in zip(words, words[1:])}
        if not shingles:
            return np.full(self.config.num_hashes, _PRIME, dtype=np.uint64)
        x = np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64, count=len(shingles))
        # a < 2^31 and x < 2^32, so a * x + b < 2^64 never overflows
        return ((x[:, None] * self._a[None, :] + self._b[None, :]) % _PRIME).min(axis=0)  # [num_hashes]

    def observe(self, key_id: str, prompts: list[str], now: float) -> None:
        """One request of ``key_id`` at ``now`` (seconds, any monotonic origin) with these prompts."""
        signatures = [
            (self.signature(p), int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little"))
            for p in prompts
        ]
        with self._lock:
            window = self._windows.setdefault(key_id, _Window())
            self._expire(key_id, window, now)
            window.arrivals.append(now)
            for sig, prompt_hash in signatures:
                template_id = self._match(window, sig)
                if template_id is None:
                    template_id = self._add_template(key_id, window, sig)
                window.templates[template_id].fills[prompt_hash] += 1
                window.prompts.append((now, template_id, prompt_hash))
            while len(window.prompts) > self.config.max_window_prompts:
                self._drop_oldest(key_id, window)
            while len(window.arrivals) > self.config.max_window_prompts:
                window.arrivals.popleft()

    def _match(self, window: _Window, sig: np.ndarray) -> int | None:
        if not window.templates:
            return None
        ids = list(window.templates)
        reps = np.stack([window.templates[i].signature for i in ids])  # [templates, num_hashes]
        similarity = (reps == sig[None, :]).mean(axis=1)  # [templates]
        best = int(similarity.argmax())
        return ids[best] if similarity[best] >= self.config.similarity else None

    def _bands_of(self, sig: np.ndarray) -> list[tuple[int, bytes]]:
        rows = self.config.band_rows
        return [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(len(sig) // rows)]

    def _add_template(self, key_id: str, window: _Window, sig: np.ndarray) -> int:
        template_id, self._next_id = self._next_id, self._next_id + 1
        window.templates[template_id] = _Template(sig)
        for band in self._bands_of(sig):
            self._bands.setdefault(band, set()).add((key_id, template_id))
        return template_id

    def _drop_oldest(self, key_id: str, window: _Window) -> None:
        _, template_id, prompt_hash = window.prompts.popleft()
        template = window.templates[template_id]
        template.fills[prompt_hash] -= 1
        if template.fills[prompt_hash] == 0:
            del template.fills[prompt_hash]
        if not template.fills:
            del window.templates[template_id]
            for band in self._bands_of(template.signature):
                holders = self._bands[band]
                holders.discard((key_id, template_id))
                if not holders:
                    del self._bands[band]

    def _expire(self, key_id: str, window: _Window, now: float) -> None:
        start = now - self.config.window_seconds
        while window.prompts and window.prompts[0][0] < start:
            self._drop_oldest(key_id, window)
        while window.arrivals and window.arrivals[0] < start:
            window.arrivals.popleft()

    # ---- reporting --------------------------------------------------------------------------------

    def _shared(self, key_id: str, template: _Template) -> bool:
        """Whether another key holds a template similar to this one (LSH candidates, then checked)."""
        seen = set()
        for band in self._bands_of(template.signature):
            for other_key, other_id in self._bands.get(band, ()):
                if other_key == key_id or (other_key, other_id) in seen:
                    continue
                seen.add((other_key, other_id))
                other = self._windows[other_key].templates[other_id]
                if (other.signature == template.signature).mean() >= self.config.similarity:
                    return True
        return False

    def _signals(self, key_id: str, window: _Window) -> KeySignals:
        c = self.config
        prompts = len(window.prompts)
        templated = sum(t.size for t in window.templates.values() if len(t.fills) >= c.min_template_fills)
        shared = sum(t.size for t in window.templates.values() if self._shared(key_id, t))
        gaps = np.diff(np.array(window.arrivals, dtype=np.float64))  # [requests - 1]
        cv = None
        if len(gaps) >= c.min_gaps and gaps.mean() > 0:
            cv = float(gaps.std() / gaps.mean())
        templated_fraction = templated / prompts if prompts else 0.0
        shared_fraction = shared / prompts if prompts else 0.0
        signals = tuple(
            name
            for name, on in (
                ("templated", templated_fraction >= c.templated_fraction),
                ("shared_templates", shared_fraction >= c.shared_fraction),
                ("regular_timing", cv is not None and cv <= c.regular_timing_cv),
            )
            if on
        )
        requests = len(window.arrivals)
        return KeySignals(
            key_id=key_id,
            requests=requests,
            prompts=prompts,
            templates=len(window.templates),
            distinct_prompts=len({h for _, _, h in window.prompts}),
            templated_fraction=templated_fraction,
            shared_fraction=shared_fraction,
            timing_cv=cv,
            signals=signals,
            flagged=requests >= c.min_requests and len(signals) >= c.min_signals,
        )

    def report(self, now: float) -> list[KeySignals]:
        """Every key's signals over the window ending at ``now``, keys in order of first appearance."""
        with self._lock:
            for key_id, window in list(self._windows.items()):
                self._expire(key_id, window, now)
                if not window.arrivals and not window.prompts:  # a key silent for a whole window
                    del self._windows[key_id]
            return [self._signals(key_id, window) for key_id, window in self._windows.items()]
