"""DraftWatcher: adopts the drafts an online trainer publishes, and rolls back those that serve worse.

One thread per server (``specserve-draft-watcher``). Every ``poll_seconds`` it reads the registry's
CURRENT version. A version it has not tried yet is checked and loaded here, off the engine thread, and
then handed to the engine thread, which swaps it in between two steps (``AsyncEngine.swap_draft``).
Requests in flight go on with the new draft and their outputs cannot change: the verifier decides
every token. Only acceptance moves. A version is a standalone draft or an EAGLE head (its manifest's
``draft_type``); either may replace either, within the KV the startup draft reserved.

A version is refused (a warning, and ``reason`` in ``specserve_draft_rejected_total``) and the current
draft stays when any check fails, in this order:

- ``registry``: ``registry.verify`` failed: a file missing or unlisted, a sha256 that differs from the
  manifest's, a malformed manifest;
- ``verifier``: the manifest names another verifier (its fingerprint differs from ours);
- ``vocabulary``: the config's vocabulary size, or the tokenizer it ships (standalone drafts), differs from
  the verifier's;
- ``load``: the weights do not load into our model (missing tensors, wrong shapes, unknown architecture; an
  EAGLE head: ``load_eagle`` against the engine's verifier refuses it, e.g. a head of another verifier), or
  the checkpoint is not of the manifest's ``draft_type``;
- ``nonfinite``: a weight is NaN or infinite;
- ``kv_budget``: it needs more KV per block than the engine reserved for the draft at startup;
- ``context``: it is positioned for a shorter context than the engine serves;
- ``smoke_forward``: a forward over a few tokens raises, or gives logits of the wrong shape or non-finite
  (an EAGLE head reads the verifier's true features of those tokens, computed here on a runner of its own);
- ``engine``: ``LLMEngine.swap_draft`` refused it.

Rollback: after a swap the replaced draft stays in memory. Once the new version has proposed
``rollback_min_tokens`` draft tokens live, its live acceptance rate is compared, once, with the
replaced draft's (over that draft's whole time in service): lower by more than ``rollback_margin``
swaps the replaced draft back (a warning, and ``specserve_draft_rollbacks_total``); otherwise the
replaced draft is released. A version that was refused or rolled back is never tried again, even while
CURRENT still names it. When the replaced draft proposed fewer than ``rollback_min_tokens`` tokens
itself there is no live baseline, and the new version is kept without a comparison.

Several replicas may watch one registry (a shared volume): each checks and swaps on its own and writes
nothing there. A CURRENT naming a version directory this replica cannot see yet (a shared filesystem
that lags) is waited for, not refused.

Knows nothing about HTTP, training, or how versions are written (``specserve.online.registry`` does).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field

from specserve.engine.drafts import DraftRejected, load_draft, vet_draft
from specserve.model.eagle import EagleHead, is_eagle_checkpoint
from specserve.model.llama import LlamaModel
from specserve.online import registry
from specserve.server.async_engine import AsyncEngine, ShuttingDownError

logger = logging.getLogger(__name__)

REJECT_REASONS = (
    "registry",
    "verifier",
    "vocabulary",
    "load",
    "nonfinite",
    "kv_budget",
    "context",
    "smoke_forward",
    "engine",
)


@dataclass(frozen=True)
class DraftWatchConfig:
    registry: str
    """The publish directory the trainer writes (DIR/CURRENT, DIR/versions/<version>/)."""
    poll_seconds: float = 5.0
    """Seconds between two reads of DIR/CURRENT."""
    rollback_min_tokens: int = 2000
    """Draft tokens a new version proposes live before its acceptance is compared with the replaced draft's."""
    rollback_margin: float = 0.05
    """Roll back when the new version's live acceptance rate is below the replaced draft's by more than this."""

    def __post_init__(self) -> None:
        if not self.registry:
            raise ValueError("registry must name the draft publish directory, got an empty path")
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")
        if self.rollback_min_tokens < 1:
            raise ValueError(f"rollback_min_tokens must be >= 1, got {self.rollback_min_tokens}")
        if not 0.0 <= self.rollback_margin <= 1.0:
            raise ValueError(f"rollback_margin must be in [0, 1], got {self.rollback_margin}")


@dataclass(frozen=True)
class DraftWatchStats:
    """What the watcher did so far (a copy; /metrics reads it)."""

    rejected: dict[str, int] = field(default_factory=dict)
    """Refused versions by reason (every reason present, zeros included)."""
    swaps: int = 0
    """Versions swapped in (rollbacks not counted)."""
    rollbacks: int = 0
    rolled_back: tuple[str, ...] = ()


Rejected = DraftRejected
"""A version failed a check; ``reason`` is one of REJECT_REASONS."""


@dataclass
class _Trial:
    """A version on probation and the draft it replaced, kept in memory to swap back."""

    version: str
    parent_model: LlamaModel | EagleHead
    parent_version: str


class DraftWatcher:
    """Polls a draft registry and hot-swaps new versions into one AsyncEngine.

    ``start``/``stop``/``stats`` are called from any thread; ``poll`` runs on the watcher's own thread
    (and once on the caller's, inside ``start``, so that a server serves CURRENT from its first request).
    It reads only the engine's immutable parts (config, verifier, tokenizer, KV budget) and its published
    stats; every change to the engine goes through the engine thread.
    """

    def __init__(self, async_engine: AsyncEngine, config: DraftWatchConfig) -> None:
        self.async_engine = async_engine
        self.config = config
        engine = async_engine.engine
        self.fingerprint = registry.verifier_fingerprint(engine.config.verifier)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the polling thread only:
        self._tried: set[str] = set()  # adopted, refused or rolled back: never loaded again
        self._trial: _Trial | None = None
        self._warned: set[str] = set()
        # guarded by _lock:
        self._lock = threading.Lock()
        self._stats = DraftWatchStats(rejected=dict.fromkeys(REJECT_REASONS, 0))

    # ---- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Adopt the registry's CURRENT version now (if any passes the checks), then watch in the background."""
        if self._thread is not None:
            raise RuntimeError("this DraftWatcher was already started")
        self._poll_logged()
        self._thread = threading.Thread(target=self._run, name="specserve-draft-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop polling; a check or swap under way finishes first."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> DraftWatchStats:
        with self._lock:
            return DraftWatchStats(
                dict(self._stats.rejected), self._stats.swaps, self._stats.rollbacks, self._stats.rolled_back
            )

    # ---- the polling thread -------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_seconds):
            if not self._poll_logged():
                return

    def _poll_logged(self) -> bool:
        """One poll; False once the engine has stopped. A bug here must not stop serving: it is logged."""
        try:
            self.poll()
        except ShuttingDownError:
            return False
        except Exception:
            logger.exception(
                "draft watcher: polling %s failed; serving goes on with the current draft", self.config.registry
            )
        return True

    def poll(self) -> None:
        """Judge the version on probation, then adopt CURRENT if it is new and passes the checks."""
        if self._trial is not None:
            self._judge(self._trial)
        try:
            version = registry.current(self.config.registry)
        except registry.RegistryError as e:
            self._warn_once(str(e), "draft watcher: %s; keeping the current draft", e)
            return
        if version is None or version in self._tried:
            return
        if not os.path.isdir(registry.version_dir(self.config.registry, version)):
            self._warn_once(
                version,
                "draft watcher: CURRENT names %s, which is not in %s (yet); waiting for it",
                version,
                self.config.registry,
            )
            return
        self._tried.add(version)
        try:
            model = self.load(version)
        except Rejected as e:
            self._reject(version, e.reason, str(e))
            return
        try:
            previous_model, previous_version = self.async_engine.swap_draft(model, version).result()
        except ValueError as e:
            self._reject(version, "engine", str(e))
            return
        with self._lock:
            self._stats = DraftWatchStats(
                self._stats.rejected, self._stats.swaps + 1, self._stats.rollbacks, self._stats.rolled_back
            )
        # a version swapped in before its predecessor was judged replaces it as the one to compare with
        self._trial = _Trial(version, previous_model, previous_version)
        logger.info("draft watcher: now serving draft %s (replacing %s)", version, previous_version)

    def load(self, version: str) -> LlamaModel | EagleHead:
        """The version's draft on the engine's dtype and device, after every check; Rejected names the failed one."""
        engine = self.async_engine.engine
        path = registry.version_dir(self.config.registry, version)
        try:
            manifest = registry.verify(self.config.registry, version)
        except registry.RegistryError as e:
            raise Rejected("registry", str(e)) from e
        if manifest["verifier"] != self.fingerprint:
            raise Rejected(
                "verifier",
                f"version {version} was trained for verifier {manifest['verifier']!r}, "
                f"this server's is {self.fingerprint!r}",
            )
        vocab = engine.verifier.arch.vocab_size
        try:
            with open(os.path.join(path, "config.json")) as f:
                draft_vocab = json.load(f).get("vocab_size")
        except (OSError, ValueError, AttributeError) as e:  # absent (a manifest need not list it), not a JSON object
            raise Rejected("load", f"version {version} has no readable config.json: {e!r}") from e
        if draft_vocab != vocab:
            raise Rejected("vocabulary", f"version {version} has vocab_size {draft_vocab}, the verifier {vocab}")
        eagle = is_eagle_checkpoint(path)
        if manifest["draft_type"] != ("eagle" if eagle else "standalone"):
            raise Rejected(
                "load",
                f"version {version}'s manifest says draft_type {manifest['draft_type']!r}, its checkpoint is "
                f"{'an EAGLE head' if eagle else 'a standalone draft'}",
            )
        try:  # load_draft checks a standalone draft's tokenizer ('vocabulary')
            model = load_draft(
                path, engine.verifier, engine.config.verifier, engine.tokenizer, engine.dtype, engine.config.device
            )
        except DraftRejected:
            raise
        except Exception as e:  # safetensors, shape and architecture errors alike: the weights do not fit
            raise Rejected("load", f"version {version} does not load: {e}") from e
        vet_draft(model, engine.draft_slot, version)  # vocabulary, nonfinite, kv_budget, context, smoke_forward
        return model

    def _judge(self, trial: _Trial) -> None:
        per_version = self.async_engine.stats().metrics.speculation
        new, old = per_version.get(trial.version), per_version.get(trial.parent_version)
        n = self.config.rollback_min_tokens
        if new is None or new.drafted_tokens < n:
            return
        self._trial = None  # judged once: from here on the replaced draft is released, or back in service
        if old is None or old.drafted_tokens < n:
            logger.info(
                "draft watcher: keeping draft %s without a comparison: %s proposed only %d tokens live (< %d)",
                trial.version,
                trial.parent_version,
                old.drafted_tokens if old else 0,
                n,
            )
            return
        margin = self.config.rollback_margin
        if new.acceptance_rate >= old.acceptance_rate - margin:
            logger.info(
                "draft watcher: keeping draft %s: live acceptance %.3f over %d tokens vs %.3f of %s",
                trial.version,
                new.acceptance_rate,
                new.drafted_tokens,
                old.acceptance_rate,
                trial.parent_version,
            )
            return
        self.async_engine.swap_draft(trial.parent_model, trial.parent_version).result()
        with self._lock:
            s = self._stats
            self._stats = DraftWatchStats(s.rejected, s.swaps, s.rollbacks + 1, (*s.rolled_back, trial.version))
        logger.warning(
            "draft watcher: ROLLED BACK draft %s to %s: its live acceptance rate %.3f over %d draft "
            "tokens is below %s's %.3f (over %d) by more than the margin %.3f; %s will not be adopted "
            "again",
            trial.version,
            trial.parent_version,
            new.acceptance_rate,
            new.drafted_tokens,
            trial.parent_version,
            old.acceptance_rate,
            old.drafted_tokens,
            margin,
            trial.version,
        )

    def _reject(self, version: str, reason: str, message: str) -> None:
        with self._lock:
            s = self._stats
            self._stats = DraftWatchStats(
                {**s.rejected, reason: s.rejected[reason] + 1}, s.swaps, s.rollbacks, s.rolled_back
            )
        logger.warning(
            "draft watcher: REJECTED draft %s (%s): %s; still serving %s",
            version,
            reason,
            message,
            self.async_engine.stats().draft_version,
        )

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)
