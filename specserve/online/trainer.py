"""The online trainer: distils the draft on logged traffic and publishes a new version when it beats the current one.

`OnlineTrainer(config).run()`, one process (`specserve distill --online`, or spawned by `specserve serve
--online-distill` through `trainer_command`). It trains whichever type the current draft is (the registry's CURRENT
version, else `draft`): a standalone draft (`standalone_student`) or an EAGLE head (`eagle_student`).

1. polls the traffic store for records after the last one read and makes them examples (`examples.prepare`; for an
   EAGLE head with the verifier's features recomputed, see below). A stable hash of the record id sends about
   `heldout_fraction` of them to the held-out slice (its most recent `heldout_records` such records); the others go
   to a replay buffer of the most recent `buffer_records`, each adding `epochs_per_record / batch_size` steps to the
   step budget (with no budget left the trainer waits for traffic instead of overfitting the buffer);
2. trains the student (fp32, AdamW at a constant rate) on records drawn from the buffer, at every output position
   against the verifier's logged top-m: a standalone draft with `distill_loss` (a `TopM` teacher, renormalised over
   its m tokens), an EAGLE head with eagle_trainer's feature regression + forward KL on its draft vocabulary. The
   positions where the draft was rejected weigh `w_rejected` (as OSD does): a step that proposed k draft tokens and
   accepted a < k was rejected at its (a + 1)-th emitted token;
3. every `eval_every` steps, and before going idle, measures the expected acceptance (`evaluation`: a lower bound on
   the logged top-m) of the candidate and of the current draft on the held-out slice, and publishes the candidate
   (`registry.publish`, with its draft_type) when it is better by at least `margin`. If CURRENT was moved by someone
   else meanwhile (an operator rolling back with `registry.set_current`; the server's own rollbacks leave the
   registry alone), that version first becomes both the current draft and the student (of its own type).

Log or recompute: records carry no verifier features (bf16 hidden states would make a record ~9x larger, on every
request), so for an EAGLE head the trainer recomputes them, one batched teacher-forced verifier forward per page of
records read; the logged top-m stays the target. The reasoning and the costs are in `eagle_student`.

Crash safety: the server needs nothing from this process. It only reads the store; versions appear atomically
(registry); after every poll that read records it replaces DIR/trainer_state.json atomically (the last record id
read, where the replay window starts, counters). Killed at any point, a restarted trainer loads the registry's
current version, re-reads the window (buffer and held-out slice come back) and continues after the last record id;
the optimizer state and unpublished training are lost. An exclusive lock on DIR/trainer.lock keeps one trainer per
directory. Resource isolation (torch threads, os.nice, a CUDA memory fraction) is set once, at construction.
Knows nothing about serving or hot-swapping.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from specserve.model.eagle import is_eagle_checkpoint
from specserve.online import registry
from specserve.online.eagle_student import EagleStudent
from specserve.online.examples import Example, is_heldout
from specserve.online.standalone_student import StandaloneStudent
from specserve.online.trainer_config import OnlineTrainerConfig
from specserve.online.trainer_state import STATE_FILE, TrainerState

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from specserve.traffic.record import TrafficRecord

LOCK_FILE = "trainer.lock"


@dataclass
class OnlineTrainerResult:
    steps: int
    """Optimizer steps of this run."""
    published: list[str] = field(default_factory=list)
    """Versions published by this run, in order."""
    evaluations: list[dict] = field(default_factory=list)
    """One entry per evaluation: step, candidate, current (expected acceptance), positions, published (or None)."""


def isolate(config: OnlineTrainerConfig, device: torch.device) -> None:
    """Cap what the trainer takes from a server on the same machine: CPU threads, scheduling priority, GPU memory."""
    torch.set_num_threads(config.threads)
    if config.nice:
        os.nice(config.nice)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(config.gpu_memory_fraction, device)


def log(message: str) -> None:
    tqdm.write(f"[online-distill] {message}", file=sys.stderr)


class OnlineTrainer:
    """Loads the current draft and the trainer state at construction; `run()` trains until a stop condition."""

    def __init__(self, config: OnlineTrainerConfig) -> None:
        from specserve.traffic import open_store

        self.config = config
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        os.makedirs(config.publish, exist_ok=True)
        self._lock = open(os.path.join(config.publish, LOCK_FILE), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._lock.close()
            raise ValueError(f"another online trainer is publishing into {config.publish!r}") from e
        try:
            isolate(config, self.device)
            registry.remove_partial(config.publish)
            self.fingerprint = registry.verifier_fingerprint(config.verifier)
            with open(os.path.join(config.verifier, "config.json")) as f:
                self.vocab_size = json.load(f)["vocab_size"]
            # the current draft's version; None while it is the initial --draft (not in the registry)
            self.version = registry.current(config.publish)
            if self.version is not None:
                manifest = registry.verify(config.publish, self.version)
                if manifest["verifier"] != self.fingerprint:
                    raise ValueError(
                        f"{config.publish!r}: current version {self.version} was trained for another verifier "
                        f"(fingerprint {manifest['verifier'][:12]}..., {config.verifier!r}: {self.fingerprint[:12]}...)"
                    )
                source = registry.version_dir(config.publish, self.version)
            elif config.draft is not None:
                manifest, source = None, config.draft
            else:
                raise ValueError(f"{config.publish!r} has no current version yet: give an initial draft (--draft)")
            self.kind: StandaloneStudent | EagleStudent | None = None  # what training means for this draft type
            self._adopt(source)
            self.state_path = os.path.join(config.publish, STATE_FILE)
            state = TrainerState.load(self.state_path)
            if state is None:
                state = TrainerState()
                if manifest is not None:
                    state.records_seen, state.tokens_seen = manifest["records_seen"], manifest["tokens_seen"]
            self.state = state
            self.buffer: deque[Example] = deque(maxlen=config.buffer_records)
            self.heldout: deque[Example] = deque(maxlen=config.heldout_records)
            self.budget = 0.0  # optimizer steps the records read so far still pay for
            self.records_read = 0  # records read by this run (training and held-out), for records/s
            self._store_down = False
            self.store = open_store(config.traffic)
            self._restore_window()
        except BaseException:
            self.close()
            raise

    def _adopt(self, source: str) -> bool:
        """Make the draft at `source` both the current draft (frozen) and the student, with a fresh optimizer.

        Returns whether its draft type differs from the previous student's (examples then need remaking).
        """
        draft_type = "eagle" if is_eagle_checkpoint(source) else "standalone"
        retyped = self.kind is None or self.kind.draft_type != draft_type
        if retyped:
            if draft_type == "eagle":
                self.kind = EagleStudent(self.config, self.device)
            else:
                self.kind = StandaloneStudent(self.config, self.vocab_size, self.device)
        draft = self.kind.load(source)
        self.student = draft.train()
        self.current = self.kind.frozen_copy(draft)
        self.optimizer = self.config.optimizer_config.adamw(draft.parameters())
        return retyped

    def follow_registry(self) -> None:
        """If CURRENT names a version other than ours (someone rolled back), continue from that version."""
        c = self.config
        version = registry.current(c.publish)
        if version is None or version == self.version:
            return
        try:
            registry.verify(c.publish, version)
        except registry.RegistryError as e:
            log(f"CURRENT names {version}, which fails verification ({e}); still comparing against {self.version}")
            return
        log(f"CURRENT moved from {self.version} to {version} (a rollback?): training on from {version}")
        if self._adopt(registry.version_dir(c.publish, version)):
            log(f"{version} is a {self.kind.draft_type} draft: remaking the window's examples for it")
            self.buffer.clear()
            self.heldout.clear()
            self._restore_window()
        self.version = version

    def close(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.close()
            self.store = None
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()

    # ---- reading traffic ----------------------------------------------------------------------------

    def _add(self, records: list[TrafficRecord], new: bool) -> None:
        c = self.config
        usable = [r for r in records if self._usable(r)]
        for record, example in zip(usable, self.kind.examples(usable)):
            if example is None:
                continue
            if is_heldout(record.record_id, c.heldout_fraction):
                self.heldout.append(example)
                continue
            self.buffer.append(example)
            self.budget += c.epochs_per_record / c.batch_size
            if new:
                self.state.records_seen += 1
                self.state.tokens_seen += example.num_output_tokens

    def _usable(self, record: TrafficRecord) -> bool:
        if record.topm_ids.numel() and int(record.topm_ids.max()) >= self.vocab_size:
            log(
                f"record {record.record_id}: top-m ids beyond the vocabulary ({self.vocab_size}); skipped "
                "(logged for another verifier?)"
            )
            return False
        return True

    def _restore_window(self) -> None:
        """Re-read the records a previous run held in memory (buffer and held-out slice); they are not new."""
        after, last = self.state.window_after_id, self.state.last_record_id
        while after < last:
            page = self.store.read(after, self.config.read_limit)
            if not page:
                break
            self._add([r for r in page if r.record_id <= last], new=False)
            after = page[-1].record_id

    def poll(self) -> int:
        """Read the next page of records; returns how many came (a full page: there may be more)."""
        try:
            page = self.store.read(self.state.last_record_id, self.config.read_limit)
        except Exception as e:  # the store is unreachable (PostgreSQL restarting): train on, read again later
            if not self._store_down:
                logger.warning("traffic store unreadable, retrying on the next poll: %r", e)
            self._store_down = True
            return 0
        if self._store_down:
            logger.warning("traffic store readable again")
            self._store_down = False
        if not page:
            return 0
        self._add(page, new=True)
        self.records_read += len(page)
        self.state.last_record_id = page[-1].record_id
        held = [d[0].record_id for d in (self.buffer, self.heldout) if d]
        self.state.window_after_id = min(held) - 1 if held else self.state.last_record_id
        self.state.save(self.state_path)
        return len(page)

    # ---- training and evaluation --------------------------------------------------------------------

    def train_step(self, generator: torch.Generator) -> float:
        c = self.config
        order = torch.randperm(len(self.buffer), generator=generator).tolist()
        picked, rows = [], 0
        for i in order[: c.batch_size]:
            e = self.buffer[i]
            if picked and rows + e.rows > c.max_batch_rows:
                break
            picked.append(e)
            rows += e.rows
        loss = self.kind.loss(self.student, picked)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        c.optimizer_config.clip(self.student.parameters())
        self.optimizer.step()
        self.state.steps += 1
        self.budget -= 1.0
        return loss.item()

    def evaluate_and_publish(self, step: int) -> dict | None:
        """Compare candidate and current draft on the held-out slice; publish the candidate if it wins by the margin.

        Returns the evaluation (None while the slice is smaller than min_heldout_records).
        """
        c = self.config
        if len(self.heldout) < c.min_heldout_records:
            log(f"step {step}: {len(self.heldout)} held-out records, evaluating from {c.min_heldout_records}")
            return None
        self.follow_registry()
        heldout = list(self.heldout)
        cand = self.kind.evaluate(self.student, heldout)
        cur = self.kind.evaluate(self.current, heldout)
        entry = {
            "step": step,
            "candidate": cand["acceptance"],
            "current": cur["acceptance"],
            "positions": cand["positions"],
            "published": None,
        }
        gain = cand["acceptance"] - cur["acceptance"]
        if gain < c.margin:
            log(
                f"step {step}: candidate {cand['acceptance']:.4f} vs current {cur['acceptance']:.4f} "
                f"({self.version or 'initial draft'}) on {cand['positions']} held-out positions: "
                f"{gain:+.4f} < margin {c.margin}, not published"
            )
            return entry
        with tempfile.TemporaryDirectory(prefix=registry.TMP_PREFIX + "ckpt-", dir=self._versions_root()) as tmp:
            checkpoint = self.kind.save(self.student, os.path.join(tmp, "draft"))
            version = registry.publish(
                c.publish,
                checkpoint,
                parent=self.version,
                heldout_acceptance=cand["acceptance"],
                parent_heldout_acceptance=cur["acceptance"],
                records_seen=self.state.records_seen,
                tokens_seen=self.state.tokens_seen,
                verifier=self.fingerprint,
                draft_type=self.kind.draft_type,
                heldout_greedy_agreement=cand["greedy_agreement"],
                parent_heldout_greedy_agreement=cur["greedy_agreement"],
                heldout_positions=cand["positions"],
                last_record_id=self.state.last_record_id,
                trainer_steps=self.state.steps,
                **self.kind.manifest_fields(self.student),
            )
        log(
            f"step {step}: published {self.kind.draft_type} {version} (parent {self.version or 'initial draft'}): "
            f"held-out expected acceptance {cur['acceptance']:.4f} -> {cand['acceptance']:.4f}, greedy agreement "
            f"{cur['greedy_agreement']:.4f} -> {cand['greedy_agreement']:.4f}, {self.state.records_seen} records seen"
        )
        self.current.load_state_dict(self.student.state_dict())
        self.version = version
        entry["published"] = version
        return entry

    def _versions_root(self) -> str:
        root = os.path.join(self.config.publish, registry.VERSIONS)
        os.makedirs(root, exist_ok=True)
        return root

    # ---- the loop -------------------------------------------------------------------------------------

    def run(self) -> OnlineTrainerResult:
        """Poll, train and evaluate until max_steps or max_minutes (or forever); then evaluate once more and close."""
        c = self.config
        result = OnlineTrainerResult(steps=0)
        start = time.monotonic()
        deadline = start + 60.0 * c.max_minutes if c.max_minutes is not None else math.inf
        generator = torch.Generator().manual_seed(c.seed + self.state.steps)
        bar = tqdm(total=c.max_steps, desc="online distill", unit="step", disable=None if c.progress else True)
        last_poll, last_eval = -math.inf, 0
        try:
            while (c.max_steps is None or result.steps < c.max_steps) and time.monotonic() < deadline:
                if time.monotonic() - last_poll >= c.poll_seconds or self.budget < 1.0:
                    got = self.poll()
                    last_poll = time.monotonic()
                    if got == c.read_limit:
                        last_poll = -math.inf  # a full page: read on before the next step
                    if (self.budget < 1.0 or not self.buffer) and got == 0:
                        if result.steps > last_eval:  # going idle: let what was trained since be published now
                            last_eval = result.steps
                            self._record(result, self.evaluate_and_publish(result.steps))
                        bar.set_postfix_str(f"waiting for traffic after record {self.state.last_record_id}")
                        time.sleep(max(0.0, min(c.poll_seconds, deadline - time.monotonic())))
                        continue
                if self.budget < 1.0 or not self.buffer:
                    continue
                loss = self.train_step(generator)
                result.steps += 1
                elapsed = max(time.monotonic() - start, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.4f}", rec_s=f"{self.records_read / elapsed:.2f}", version=self.version or "-"
                )
                if result.steps % c.eval_every == 0:
                    last_eval = result.steps
                    self._record(result, self.evaluate_and_publish(result.steps))
            if result.steps > last_eval:
                self._record(result, self.evaluate_and_publish(result.steps))
            self.state.save(self.state_path)
        finally:
            bar.close()
            self.close()
        return result

    @staticmethod
    def _record(result: OnlineTrainerResult, entry: dict | None) -> None:
        if entry is not None:
            result.evaluations.append(entry)
            if entry["published"]:
                result.published.append(entry["published"])


def trainer_command(
    traffic_url: str,
    publish_dir: str,
    draft: str | None,
    threads: int = 1,
    *,
    verifier: str | None = None,
    device: str | None = None,
    lr: float | None = None,
    eval_every: int | None = None,
    margin: float | None = None,
    poll_seconds: float | None = None,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    nice: int | None = None,
    gpu_memory_fraction: float | None = None,
) -> list[str]:
    """The argv of a standalone trainer process (`specserve distill --online ...`) for `subprocess.Popen`.

    Options left None take the command line's defaults. The process runs until killed unless max_steps or
    max_minutes is given; killing it (any signal) is safe.
    """
    cmd = [sys.executable, "-m", "specserve.cli", "distill", "--online", "--traffic", traffic_url,
           "--publish", publish_dir, "--threads", str(threads)]  # fmt: skip
    options = {
        "--draft": draft,
        "--verifier": verifier,
        "--device": device,
        "--lr": lr,
        "--eval-every": eval_every,
        "--margin": margin,
        "--poll-seconds": poll_seconds,
        "--max-steps": max_steps,
        "--max-minutes": max_minutes,
        "--nice": nice,
        "--gpu-memory-fraction": gpu_memory_fraction,
    }
    for flag, value in options.items():
        if value is not None:
            cmd += [flag, str(value)]
    return cmd
