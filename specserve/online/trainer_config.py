"""OnlineTrainerConfig: what the online trainer is told (the store, the registry, the loss, budgets, resources).

The command line (`specserve distill --online`) is built from these fields. Knows nothing about training itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from specserve.distill.losses import LOSSES
from specserve.distill.optimizer import OptimizerConfig


@dataclass(frozen=True)
class OnlineTrainerConfig:
    traffic: str
    """Traffic store URL (`open_store`): 'sqlite:///abs/path.db', a plain file path, or 'postgresql://...'."""
    publish: str
    """Publish directory (the draft registry) versions are written to, and trainer_state.json beside them."""
    verifier: str
    """HF checkpoint directory of the verifier whose traffic is logged (its fingerprint and tokenizer files)."""
    draft: str | None = None
    """Draft checkpoint to start from while the publish directory has no current version (then it is ignored): a
    standalone draft or an EAGLE head; the trainer trains whichever type the current draft is."""
    loss: str = "fkl"
    """Standalone drafts: divergence from the logged top-m, fkl, rkl, jsd, tv (as `specserve distill --loss`). An
    EAGLE head is always trained with the forward KL (as `specserve distill --draft-type eagle`)."""
    jsd_beta: float = 0.5
    """beta of JSD(beta), in (0, 1)."""
    temperature: float = 1.0
    """Standalone drafts: temperature of both distributions inside the divergence (evaluation is at temperature 1)."""
    feature_weight: float = 1.0
    """EAGLE heads: weight of the feature regression next to the distribution loss."""
    feature_noise: float = 0.1
    """EAGLE heads: uniform noise added to the input features while training, relative to their RMS."""
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
        if self.feature_weight < 0 or self.feature_noise < 0:
            raise ValueError(
                f"feature_weight and feature_noise must be >= 0, got {self.feature_weight} and {self.feature_noise}"
            )
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

    @property
    def optimizer_config(self) -> OptimizerConfig:
        """A constant learning rate: no warmup, no schedule."""
        return OptimizerConfig(self.lr, self.weight_decay, 0.0, self.max_grad_norm)
