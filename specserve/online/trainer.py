"""The online trainer: distils the draft on logged traffic and publishes a new version when it beats the current one.

`OnlineTrainer(config).run()`, one process (`specserve distill --online`, or spawned by `specserve serve
--online-distill` through `trainer_command`):

1. polls the traffic store for records after the last one read. A stable hash of the record id sends about
   `heldout_fraction` of them to the held-out slice (its most recent `heldout_records` such records); the others go
   to a replay buffer of the most recent `buffer_records`, each adding `epochs_per_record / batch_size` steps to the
   step budget (with no budget left the trainer waits for traffic instead of overfitting the buffer);
2. trains the student (the draft as an fp32 HF `LlamaForCausalLM`, AdamW at a constant rate) on records drawn from
   the buffer: at every output position `distill_loss` against the verifier's logged top-m (a `TopM` teacher,
   renormalised over its m tokens), the positions where the draft was rejected weighted `w_rejected` (as OSD does):
   a step that proposed k draft tokens and accepted a < k was rejected at its (a + 1)-th emitted token;
3. every `eval_every` steps, and before going idle, measures the expected acceptance of the candidate and of the
   current draft on the held-out slice, and publishes the candidate (`registry.publish`) when it is better by at
   least `margin`. If CURRENT was moved by someone else meanwhile (an operator rolling back with
   `registry.set_current`; the server's own rollbacks leave the registry alone), that version first becomes both
   the current draft and the student.

Expected acceptance at one position is sum_{x in S} min(p(x), q(x)): S the logged top-m, p the verifier's logged
probabilities *not* renormalised, q the draft's full softmax (temperature 1). Speculative sampling accepts a draft
token with probability sum_x min(p(x), q(x)) over the whole vocabulary; restricted to S the sum is a lower bound,
short by at most the unlogged mass 1 - p(S) whichever draft is measured. Renormalising p over S would
give it mass the verifier does not have, so a draft that matched the renormalised p could be credited with
acceptance it never gets. The slice's value is the mean over all its positions.

Crash safety: the server needs nothing from this process. It only reads the store; versions appear atomically
(registry); after every poll that read records it replaces DIR/trainer_state.json atomically (the last record id
read, where the replay window starts, counters). Killed at any point, a restarted trainer loads the registry's
current version, re-reads the window (buffer and held-out slice come back) and continues after the last record id;
the optimizer state and unpublished training are lost. An exclusive lock on DIR/trainer.lock keeps one trainer per
directory. Resource isolation (torch threads, os.nice, a CUDA memory fraction) is set once, at construction.
Knows nothing about serving or hot-swapping.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, LlamaForCausalLM

from specserve.distill.losses import LOSSES, TopM, distill_loss
from specserve.distill.student import save_student
from specserve.distill.trainer import RowLogits
from specserve.online import registry

if TYPE_CHECKING:
    from specserve.online.traffic_record import TrafficRecord

STATE_FILE = "trainer_state.json"
LOCK_FILE = "trainer.lock"


@dataclass(frozen=True)
class OnlineTrainerConfig:
    traffic: str
    """Traffic store URL (`open_store`): 'sqlite:///abs/path.db', a plain file path, or 'postgresql://...'."""
    publish: str
    """Publish directory (the draft registry) versions are written to, and trainer_state.json beside them."""
    verifier: str
    """HF checkpoint directory of the verifier whose traffic is logged (its fingerprint and tokenizer files)."""
    draft: str | None = None
    """Draft checkpoint to start from while the publish directory has no current version (then it is ignored)."""
    loss: str = "fkl"
    """Divergence from the logged top-m: fkl, rkl, jsd, tv (as `specserve distill --loss`)."""
    jsd_beta: float = 0.5
    """beta of JSD(beta), in (0, 1)."""
    temperature: float = 1.0
    """Temperature of both distributions inside the divergence (the evaluation is always at temperature 1)."""
    w_rejected: float = 2.0
    """Loss weight of the positions where the draft was rejected; every other position weighs 1."""
    lr: float = 5e-4
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    batch_size: int = 8
    """Most records per optimizer step."""
    max_batch_rows: int = 512
    """Most output positions per step (and per evaluation forward): bounds the [rows, vocab] logits in memory."""
    max_seq_tokens: int = 512
    """Longer prompt + output sequences keep their last tokens."""
    eval_every: int = 100
    """Optimizer steps between held-out evaluations (and possible publishes)."""
    margin: float = 0.01
    """Publish only when the candidate's held-out expected acceptance beats the current draft's by this much."""
    heldout_fraction: float = 0.1
    """Share of records (by a hash of record_id: stable across restarts) kept for evaluation, never trained on."""
    heldout_records: int = 64
    """The held-out slice: the most recent held-out records, at most this many."""
    min_heldout_records: int = 4
    """Evaluate only once the slice holds this many records."""
    buffer_records: int = 1024
    """Training draws from the most recent training records, at most this many."""
    epochs_per_record: float = 4.0
    """Times each training record is trained on, on average, before the trainer idles waiting for traffic."""
    read_limit: int = 256
    """Most records read from the store per poll."""
    poll_seconds: float = 5.0
    """Seconds between polls of the store (polls happen sooner while a read returns a full page)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps of this run. None: no limit."""
    max_minutes: float | None = None
    """Stop after this many minutes of this run. None: no limit (run until killed)."""
    threads: int = 1
    """torch CPU threads (torch.set_num_threads): what the trainer may take from serving."""
    nice: int = 10
    """Added to the process's niceness (os.nice) at start, so the server's threads win the CPU; 0: unchanged."""
    gpu_memory_fraction: float = 0.25
    """On CUDA: the most of the device's memory this process may allocate (set_per_process_memory_fraction)."""
    device: str | None = None
    """torch device; None: cuda if available, else cpu."""
    seed: int = 0
    """Seed of the order records are drawn in."""
    progress: bool = True
    """Show a tqdm bar (loss, records/s, current version) when stderr is a terminal."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not self.w_rejected > 0:
            raise ValueError(f"w_rejected must be > 0, got {self.w_rejected}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("batch_size", "max_batch_rows", "eval_every", "heldout_records", "min_heldout_records",
                     "buffer_records", "read_limit", "threads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.max_seq_tokens <= self.max_batch_rows + 1:
            raise ValueError(
                f"max_seq_tokens must be in [2, max_batch_rows + 1 = {self.max_batch_rows + 1}] so one record fits "
                f"a step, got {self.max_seq_tokens}"
            )
        if self.min_heldout_records > self.heldout_records:
            raise ValueError(
                f"min_heldout_records ({self.min_heldout_records}) must not exceed heldout_records "
                f"({self.heldout_records})"
            )
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1] (an acceptance-rate difference), got {self.margin}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if not self.epochs_per_record > 0:
            raise ValueError(f"epochs_per_record must be > 0, got {self.epochs_per_record}")
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 or None, got {self.max_minutes}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in [0, 19], got {self.nice}")
        if not 0.0 < self.gpu_memory_fraction <= 1.0:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")


@dataclass
class TrainerState:
    """What a restarted trainer needs besides the registry; DIR/trainer_state.json, replaced atomically."""

    last_record_id: int = 0
    """The newest record read from the store."""
    window_after_id: int = 0
    """Every record in the buffer or the held-out slice has a larger id: a restart re-reads from here."""
    records_seen: int = 0
    """Training records read, over every run of this publish directory (held-out records not counted)."""
    tokens_seen: int = 0
    """Output tokens of those records."""
    steps: int = 0
    """Optimizer steps, over every run."""

    @staticmethod
    def load(path: str) -> TrainerState | None:
        try:
            with open(path) as f:
                data = json.load(f)
            return TrainerState(**{k: int(data[k]) for k in asdict(TrainerState())})
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path} is not a trainer state file ({e}); delete it to start from the first record"
            ) from e

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@dataclass
class Example:
    """One record made ready for the student: its token sequence and the rows where the loss is taken."""

    record_id: int
    input_ids: torch.Tensor  # [seq] int64: prompt + output without its last token, left-truncated
    first_row: int  # index in input_ids of the position predicting the first kept output token
    topm_ids: torch.Tensor  # [rows, m] int64: the verifier's top-m at each kept output position
    topm_logprobs: torch.Tensor  # [rows, m] float32
    weights: torch.Tensor  # [rows] float32: w_rejected where the draft was rejected, else 1
    num_output_tokens: int

    @property
    def rows(self) -> int:
        return self.topm_ids.shape[0]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    rows: torch.Tensor  # [batch, seq] bool: positions predicting a kept output token
    teacher: TopM  # [rows, m] fields, rows in the order of `rows` (row-major)
    weights: torch.Tensor  # [rows]


@dataclass
class OnlineTrainerResult:
    steps: int
    """Optimizer steps of this run."""
    published: list[str] = field(default_factory=list)
    """Versions published by this run, in order."""
    evaluations: list[dict] = field(default_factory=list)
    """One entry per evaluation: step, candidate, current (expected acceptance), positions, published (or None)."""


def is_heldout(record_id: int, fraction: float) -> bool:
    """Whether a record belongs to the held-out share: a hash of its id, so the same on every run."""
    h = int.from_bytes(hashlib.sha256(f"heldout:{record_id}".encode()).digest()[:8], "big")
    return h < fraction * 2.0**64


def rejected_positions(steps: list[tuple[str, int, int]], num_output_tokens: int) -> list[int]:
    """Output positions where a draft-model proposal was rejected.

    A step emits its accepted tokens and one more (recovered or bonus); one that proposed k draft tokens and
    accepted a < k was rejected at its (a + 1)-th emitted token. N-gram proposals are not the draft's: not counted.
    """
    out, position = [], 0
    for source, k, accepted in steps:
        if source == "draft" and accepted < k and position + accepted < num_output_tokens:
            out.append(position + accepted)
        position += accepted + 1
    return out


def prepare(record: TrafficRecord, max_seq_tokens: int, w_rejected: float) -> Example | None:
    """The record as a training/evaluation example; None when no output position remains to learn from."""
    prompt, output = record.prompt_token_ids, record.output_token_ids
    n = len(output)
    tokens = (prompt + output)[:-1]  # the last output token predicts nothing
    cut = max(0, len(tokens) - max_seq_tokens)
    first_row = len(prompt) - 1 - cut  # row j (output token j) sits at first_row + j
    skip = max(0, -first_row)  # output tokens whose predicting position was cut (or had no prompt before it)
    if skip >= n:
        return None
    weights = torch.ones(n)
    weights[rejected_positions(record.steps, n)] = w_rejected
    return Example(
        record_id=record.record_id,
        input_ids=torch.tensor(tokens[cut:], dtype=torch.int64),
        first_row=first_row + skip,
        topm_ids=record.topm_ids[skip:].long(),
        topm_logprobs=record.topm_logprobs[skip:].float(),
        weights=weights[skip:],
        num_output_tokens=n,
    )


def collate(examples: list[Example], device: torch.device) -> Batch:
    """Right-padded sequences; every example's top-m cut to the batch's smallest m (they are sorted, best first)."""
    m = min(e.topm_ids.shape[1] for e in examples)
    width = max(e.input_ids.numel() for e in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.int64)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.int64)
    rows = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        input_ids[i, : e.input_ids.numel()] = e.input_ids
        attention_mask[i, : e.input_ids.numel()] = 1
        rows[i, e.first_row : e.first_row + e.rows] = True
    teacher = TopM(
        torch.cat([e.topm_ids[:, :m] for e in examples]), torch.cat([e.topm_logprobs[:, :m] for e in examples])
    )
    return Batch(
        input_ids.to(device),
        attention_mask.to(device),
        rows.to(device),
        TopM(teacher.ids.to(device), teacher.logprobs.to(device)),
        torch.cat([e.weights for e in examples]).to(device),
    )


def chunks(examples: list[Example], max_rows: int) -> list[list[Example]]:
    """Consecutive groups of examples with at most `max_rows` rows each (an example alone may reach it)."""
    out: list[list[Example]] = []
    rows = 0
    for e in examples:
        if not out or rows + e.rows > max_rows:
            out.append([])
            rows = 0
        out[-1].append(e)
        rows += e.rows
    return out


def expected_acceptance(
    draft_logits: torch.Tensor,  # [rows, vocab]
    teacher: TopM,  # [rows, m]: the verifier's logged top-m
) -> torch.Tensor:  # [rows]
    """sum over the logged top-m of min(p, q): p the logged probabilities (not renormalised), q = softmax(logits)."""
    q = torch.softmax(draft_logits.float(), dim=-1).gather(-1, teacher.ids)  # [rows, m]
    return torch.minimum(teacher.logprobs.float().exp(), q).sum(-1)


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, examples: list[Example], max_rows: int, device: torch.device) -> dict:
    """Mean expected acceptance and greedy agreement (argmax q == the verifier's top-1) over all positions."""
    was_training = model.training
    model.eval()
    acceptance = agree = positions = 0.0
    for group in chunks(examples, max_rows):
        b = collate(group, device)
        logits = RowLogits(model)(b.input_ids, b.attention_mask, b.rows)  # [rows, vocab]
        acceptance += float(expected_acceptance(logits, b.teacher).sum())
        agree += float((logits.argmax(-1) == b.teacher.ids[:, 0]).sum())
        positions += logits.shape[0]
    model.train(was_training)
    return {
        "acceptance": acceptance / max(positions, 1),
        "greedy_agreement": agree / max(positions, 1),
        "positions": int(positions),
    }


def load_draft(path: str, vocab_size: int, device: torch.device) -> LlamaForCausalLM:
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "llama":
        raise ValueError(f"the online trainer trains Llama-architecture drafts; {path!r} is a {config.model_type!r}")
    if config.vocab_size != vocab_size:
        raise ValueError(f"draft {path!r} has vocab_size {config.vocab_size}, the verifier {vocab_size}")
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()


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
        from specserve.online.traffic_store import open_store

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
                vocab_size = json.load(f)["vocab_size"]
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
            self.vocab_size = vocab_size
            self._adopt(load_draft(source, vocab_size, self.device))
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
            self.store = open_store(config.traffic)
            self._restore_window()
        except BaseException:
            self.close()
            raise

    def _adopt(self, draft: LlamaForCausalLM) -> None:
        """Make `draft` both the current draft (frozen) and the student, with a fresh optimizer."""
        self.student = draft.train()
        self.current = copy.deepcopy(draft).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(draft.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

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
        self._adopt(load_draft(registry.version_dir(c.publish, version), self.vocab_size, self.device))
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

    def _add(self, record: TrafficRecord, new: bool) -> None:
        c = self.config
        example = prepare(record, c.max_seq_tokens, c.w_rejected)
        if example is None:
            return
        if is_heldout(record.record_id, c.heldout_fraction):
            self.heldout.append(example)
            return
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
            for r in page:
                if r.record_id <= last and self._usable(r):
                    self._add(r, new=False)
            after = page[-1].record_id

    def poll(self) -> int:
        """Read the next page of records; returns how many came (a full page: there may be more)."""
        page = self.store.read(self.state.last_record_id, self.config.read_limit)
        if not page:
            return 0
        for r in page:
            if self._usable(r):
                self._add(r, new=True)
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
        b = collate(picked, self.device)
        logits = RowLogits(self.student)(b.input_ids, b.attention_mask, b.rows)  # [rows, vocab]
        loss = distill_loss(logits, b.teacher, c.loss, c.temperature, c.jsd_beta, weights=b.weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), c.max_grad_norm)
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
        cand = evaluate(self.student, heldout, c.max_batch_rows, self.device)
        cur = evaluate(self.current, heldout, c.max_batch_rows, self.device)
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
            checkpoint = save_student(self.student, c.verifier, os.path.join(tmp, "draft"))
            version = registry.publish(
                c.publish,
                checkpoint,
                parent=self.version,
                heldout_acceptance=cand["acceptance"],
                parent_heldout_acceptance=cur["acceptance"],
                records_seen=self.state.records_seen,
                tokens_seen=self.state.tokens_seen,
                verifier=self.fingerprint,
                draft_type="standalone",
                heldout_greedy_agreement=cand["greedy_agreement"],
                parent_heldout_greedy_agreement=cur["greedy_agreement"],
                heldout_positions=cand["positions"],
                last_record_id=self.state.last_record_id,
                trainer_steps=self.state.steps,
                loss=c.loss,
            )
        log(
            f"step {step}: published {version} (parent {self.version or 'initial draft'}): held-out expected "
            f"acceptance {cur['acceptance']:.4f} -> {cand['acceptance']:.4f}, greedy agreement "
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
