"""The distillation run: teacher responses, then the student trained to match the teacher's next-token distributions.

`distill(config)`:
1. reads the prompts and has the verifier answer them through our engine (`LLM`, greedy): every rank
   answers its share, then all ranks gather all answers; a seeded split keeps `eval_fraction` held out;
2. trains the student (an HF `LlamaForCausalLM`, fp32) against the frozen teacher (the verifier as an HF
   model, eval mode, no grad) on prompt + response, the loss taken only at the positions that predict
   response tokens; AdamW, linear warmup then cosine decay, gradient-norm clipping;
3. every `eval_every` steps (and before the first and after the last) measures greedy agreement on the
   held-out split (student argmax == teacher argmax at response positions) and writes the checkpoint
   (atomically) with `distill.json` beside it.

With `traffic` (a server's traffic log) instead of `data`, step 1 reads the logged requests and the teacher
is the verifier's logged top-m at every response position (a sparse `TopM` teacher, renormalised over its
m tokens): the verifier is never run, only its config and tokenizer are read.

The cost ratio c (one single-token forward of the student / of the verifier, through our engine's model
code: `load_model` + `ModelRunner`, after a 128-token prefill, median of 20; bfloat16 (the engine's default
dtype) on CUDA, float32 on the CPU, where bfloat16 matmuls are emulated slowly and would distort the ratio)
is measured once before training: it depends on the architecture, not the weights.

Under torchrun (WORLD_SIZE > 1) the run initialises torch.distributed (nccl on CUDA, gloo on CPU), wraps
the student in DDP and shards the training data with DistributedSampler; only rank 0 evaluates, prints
and writes. Knows nothing about the engine's scheduling or the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from specserve.distill.data import (
    Example,
    apply_chat_template,
    check_not_eval_only,
    check_vocabulary,
    generate_targets,
    load_prompts,
    traffic_examples,
)
from specserve.distill.losses import LOSSES, TopM, distill_loss
from specserve.distill.optimizer import OptimizerConfig
from specserve.distill.student import StudentSpec, build_student, save_student
from specserve.traffic.url import describe

COST_CONTEXT, COST_WARMUP, COST_REPS = 128, 3, 20


@dataclass(frozen=True)
class DistillConfig:
    data: tuple[str, ...]
    """Prompt files (JSONL, ShareGPT JSON, plain text). Never Spec-Bench."""
    out: str
    """Directory the student checkpoint (and distill.json) is written to."""
    verifier: str | None = None
    """HF checkpoint directory of the verifier (the teacher); None: the default SmolLM2 verifier."""
    traffic: str | None = None
    """Traffic store URL: train on the requests a server logged (their logged top-m is the teacher) instead of
    having the verifier answer `data`'s prompts; `data` must then be empty."""
    loss: str = "fkl"
    """Divergence: fkl (forward KL), rkl (reverse KL), jsd (generalised JSD), tv (total variation)."""
    jsd_beta: float = 0.5
    """beta of JSD(beta), in (0, 1)."""
    temperature: float = 1.0
    """Temperature of both distributions inside the divergence."""
    hard_label_weight: float = 0.0
    """Weight w in (1 - w) divergence + w cross-entropy on the teacher's response tokens; in [0, 1]."""
    teacher_top_m: int = 0
    """Keep only the teacher's m most likely tokens per position (renormalised); 0: the full distribution."""
    teacher_dtype: str = "float32"
    """dtype of the teacher, both when generating responses and when computing its logits."""
    student: StudentSpec = field(default_factory=StudentSpec)
    """Shape of the student, or the verifier layers it starts from."""
    max_prompts: int | None = 1000
    """Most prompts read over all files (interleaved file by file), or the newest records of `traffic`; None: all."""
    max_prompt_tokens: int = 1024
    """Longer templated prompts keep their last tokens."""
    max_new_tokens: int = 128
    """Most tokens the verifier generates per prompt."""
    generate_batch_size: int = 32
    """Prompts per engine call while generating responses."""
    batch_size: int = 8
    """Sequences per training step and rank."""
    lr: float = 5e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_fraction: float = 0.05
    """Share of the steps spent warming the learning rate up linearly (then cosine decay to 0)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping threshold."""
    steps: int = 1000
    """Optimizer steps."""
    eval_every: int = 100
    """Steps between evaluations and checkpoints (0: only before and after training)."""
    eval_fraction: float = 0.1
    """Share of the examples held out for the agreement evaluation (at least one)."""
    seed: int = 0
    """Seed of the student's initialisation, the split and the data order."""
    device: str | None = None
    """torch device; None: cuda if available, else cpu. Under torchrun each rank takes cuda:LOCAL_RANK."""
    progress: bool = True
    """Show tqdm bars (rank 0 only)."""

    def __post_init__(self) -> None:
        if not self.data and not self.traffic:
            raise ValueError("distillation needs at least one --data file, or a --traffic store")
        if self.data and self.traffic:
            raise ValueError("give --data (the verifier answers its prompts) or --traffic (logged requests), not both")
        for path in self.data:  # fail before any model loads
            check_not_eval_only(path)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {self.jsd_beta}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.hard_label_weight <= 1.0:
            raise ValueError(f"hard_label_weight must be in [0, 1], got {self.hard_label_weight}")
        if self.teacher_top_m < 0:
            raise ValueError(f"teacher_top_m must be >= 0 (0 = full distribution), got {self.teacher_top_m}")
        for name in ("max_prompt_tokens", "max_new_tokens", "generate_batch_size", "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 2:
            raise ValueError(f"max_prompts must be >= 2 (one to train on, one held out), got {self.max_prompts}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @property
    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(self.lr, self.weight_decay, self.warmup_fraction, self.max_grad_norm)


@dataclass
class DistillResult:
    out: str
    initial_agreement: float | None
    """Held-out greedy agreement of the untrained student (rank 0; None elsewhere)."""
    final_agreement: float | None
    cost_ratio: dict | None
    history: list[dict]
    weights_sha256: str = ""
    """sha256 of this rank's final student weights: DDP keeps it the same on every rank."""


def weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---- batches ------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    rows: torch.Tensor  # [batch, seq] bool: positions whose next token is a response token
    labels: torch.Tensor  # [rows] the response tokens those positions predict
    teacher: TopM | None = None  # [rows, m] the logged teacher (traffic examples); None: run the teacher

    def to(self, device) -> Batch:
        tensors = (t.to(device) for t in (self.input_ids, self.attention_mask, self.rows, self.labels))
        teacher = None if self.teacher is None else TopM(self.teacher.ids.to(device), self.teacher.logprobs.to(device))
        return Batch(*tensors, teacher)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded prompt + response sequences; the loss rows are the positions predicting response tokens.

    Examples with a logged teacher give the batch a TopM teacher, their rows in the loss rows' order
    (example by example), cut to the smallest m among them (each row is sorted most likely first).
    """
    seqs = [e.prompt_ids + e.response_ids for e in examples]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    rows = torch.zeros((len(seqs), width), dtype=torch.bool)
    labels = []
    for i, (e, s) in enumerate(zip(examples, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        rows[i, len(e.prompt_ids) - 1 : len(s) - 1] = True
        labels.extend(e.response_ids)
    teacher = None
    logged = [e.teacher_ids is not None for e in examples]
    if any(logged):
        if not all(logged):
            raise ValueError("a batch mixes examples with a logged teacher and examples without one")
        m = min(e.teacher_ids.shape[1] for e in examples)
        teacher = TopM(
            torch.cat([e.teacher_ids[:, :m] for e in examples]).long(),  # [rows, m]
            torch.cat([e.teacher_logprobs[:, :m] for e in examples]).float(),  # [rows, m]
        )
    return Batch(input_ids, attention_mask, rows, torch.tensor(labels, dtype=torch.int64), teacher)


class RowLogits(nn.Module):
    """A causal LM evaluated only where needed: logits at the selected rows, never the full [batch, seq, vocab]."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,  # [batch, seq]
        attention_mask: torch.Tensor,  # [batch, seq]
        rows: torch.Tensor,  # [batch, seq] bool
    ) -> torch.Tensor:  # [rows, vocab] fp32
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.lm.lm_head(hidden[rows]).float()


# ---- evaluation -----------------------------------------------------------------------------------


@torch.no_grad()
def greedy_agreement(student: RowLogits, batches: list[Batch], teacher_argmax: list[torch.Tensor]) -> float:
    """Share of held-out response positions where the student's argmax equals the teacher's."""
    was_training = student.training
    student.eval()
    same = total = 0
    for b, t in zip(batches, teacher_argmax):
        s = student(b.input_ids, b.attention_mask, b.rows).argmax(-1)
        same += int((s == t).sum())
        total += t.numel()
    student.train(was_training)
    return same / max(total, 1)


def measure_cost_ratio(verifier: str, student_dir: str, device: str) -> dict:
    """c = single-token forward time of the student / of the verifier, in our engine's model code.

    Both load through `load_model` (bfloat16 on CUDA, float32 on the CPU) onto `device`, each on a private
    ModelRunner; after a COST_CONTEXT-token prefill, single-token forwards at the next position alternate
    between the two (so drift hits both), COST_WARMUP discarded, medians of COST_REPS.
    """
    from specserve.engine.model_runner import ModelRunner, TokenRun
    from specserve.model.loader import load_model

    dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    block_size = 16
    blocks = list(range(COST_CONTEXT // block_size + 2))
    runners = {
        "draft": ModelRunner(load_model(student_dir, dtype, device), len(blocks), block_size),
        "verifier": ModelRunner(load_model(verifier, dtype, device), len(blocks), block_size),
    }
    vocab = runners["verifier"].vocab_size
    context = [(7 * i + 3) % vocab for i in range(COST_CONTEXT)]  # any tokens: the cost does not depend on which
    for r in runners.values():
        r.forward([TokenRun(context, 0, blocks, 1)])
    times: dict[str, list[float]] = {name: [] for name in runners}
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    for i in range(COST_WARMUP + COST_REPS):
        for name in ("draft", "verifier") if i % 2 == 0 else ("verifier", "draft"):
            sync()
            t0 = time.perf_counter()
            runners[name].forward([TokenRun(context[:1], COST_CONTEXT, blocks, 1)])
            sync()
            if i >= COST_WARMUP:
                times[name].append(time.perf_counter() - t0)
    draft_ms = 1e3 * statistics.median(times["draft"])
    verifier_ms = 1e3 * statistics.median(times["verifier"])
    params = {n: sum(p.numel() for p in r.model.parameters()) for n, r in runners.items()}
    return {
        "c": draft_ms / verifier_ms,
        "draft_forward_ms": draft_ms,
        "verifier_forward_ms": verifier_ms,
        "param_ratio": params["draft"] / params["verifier"],
        "how": f"our engine's LlamaModel via ModelRunner, {dtype}, on {device}, one token after a "
        f"{COST_CONTEXT}-token prefill, median of {COST_REPS} after {COST_WARMUP} warm-up",
    }


# ---- distributed setup ------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str | None) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if world <= 1:
        return Dist(0, 1, torch.device(device or ("cuda" if cuda else "cpu")), False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu"), owns)


# ---- the run --------------------------------------------------------------------------------------


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if len(examples) < 2:
        raise ValueError(f"got {len(examples)} teacher responses; need at least 2 (train and held out)")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _teacher_examples(config: DistillConfig, verifier: str, tokenizer, d: Dist) -> list[Example]:
    """Every rank answers prompts[rank::world] with our engine; all ranks get all answers, in prompt order."""
    from specserve import LLM
    from specserve.config import CacheConfig, SchedulerConfig

    prompts = apply_chat_template(tokenizer, load_prompts(list(config.data), config.max_prompts))
    mine = prompts[d.rank :: d.world]
    longest = min(config.max_prompt_tokens, max(map(len, mine), default=1)) + config.max_new_tokens
    block_size = 16
    per_seq = -(-longest // block_size) + 1
    llm = LLM(
        verifier,
        dtype=config.teacher_dtype,
        device=str(d.device),
        cache=CacheConfig(block_size=block_size, num_blocks=per_seq * config.generate_batch_size),
        scheduler=SchedulerConfig(max_num_seqs=config.generate_batch_size, max_num_batched_tokens=2048),
    )
    examples = generate_targets(
        llm,
        mine,
        config.max_new_tokens,
        config.generate_batch_size,
        seed=config.seed,
        max_prompt_tokens=config.max_prompt_tokens,
        progress=config.progress and d.main,
    )
    del llm
    if d.world == 1:
        return examples
    gathered: list = [None] * d.world
    dist.all_gather_object(gathered, examples)
    # rank r answered prompts r, r + world, ...: interleave back into prompt order
    return [g[i] for i in range(max(map(len, gathered))) for g in gathered if i < len(g)]


def _record(config: DistillConfig, verifier: str, extra: dict) -> str:
    c = asdict(config)
    c["data"] = [os.path.abspath(p) for p in config.data]
    c["traffic"] = describe(config.traffic) if config.traffic else None  # never a database password
    return json.dumps({"config": c, "verifier": os.path.abspath(verifier), **extra}, indent=2)


@dataclass
class _Run:
    """What one distillation run's evaluations and checkpoints read: fixed once training starts, but `history`
    and `losses` (the train losses since the last evaluation)."""

    config: DistillConfig
    verifier: str
    d: Dist
    examples: list[Example]
    train: list[Example]
    held_out: list[Example]
    student_lm: nn.Module
    student: RowLogits
    eval_batches: list[Batch]
    teacher_argmax: list[torch.Tensor]  # per eval batch: [rows]
    cost: dict | None
    t_start: float
    t_generated: float
    history: list[dict] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def _resolve_verifier(config: DistillConfig, d: Dist) -> str:
    if config.verifier is not None:
        return config.verifier
    from specserve.model.default_models import default_verifier

    if d.main:  # converts the GGUF once; the other ranks wait for it
        default_verifier()
    d.barrier()
    return default_verifier()


def _examples(config: DistillConfig, verifier: str, tokenizer, d: Dist) -> list[Example]:
    if config.traffic:  # every rank reads it all; the sampler shards it
        return traffic_examples(config.traffic, config.max_prompts, config.max_prompt_tokens, config.max_new_tokens)
    return _teacher_examples(config, verifier, tokenizer, d)


def _teacher(config: DistillConfig, verifier: str, d: Dist) -> RowLogits | None:
    """The frozen verifier as a RowLogits; None for traffic examples, which bring their teacher."""
    if config.traffic:
        return None
    from transformers import AutoModelForCausalLM

    from specserve.model.loader import resolve_dtype

    teacher = AutoModelForCausalLM.from_pretrained(verifier, dtype=resolve_dtype(config.teacher_dtype))
    return RowLogits(teacher.to(d.device).eval().requires_grad_(False))


def _eval_set(
    held_out: list[Example], teacher: RowLogits | None, batch_size: int, pad_id: int, device: torch.device
) -> tuple[list[Batch], list[torch.Tensor]]:
    """The held-out batches and, per batch, the teacher's argmax at its rows ([rows])."""
    eval_batches: list[Batch] = []
    teacher_argmax: list[torch.Tensor] = []
    for i in range(0, len(held_out), batch_size):
        b = collate(held_out[i : i + batch_size], pad_id).to(device)
        eval_batches.append(b)
        if b.teacher is not None:  # the logged top-m is sorted: its first id is the teacher's argmax
            teacher_argmax.append(b.teacher.ids[:, 0])
            continue
        with torch.no_grad():
            teacher_argmax.append(teacher(b.input_ids, b.attention_mask, b.rows).argmax(-1))
    return eval_batches, teacher_argmax


def _target(batch: Batch, teacher: RowLogits | None, top_m: int) -> torch.Tensor | TopM:
    """What the student matches at the batch's rows: the logged top-m, or the teacher's logits ([rows, vocab])."""
    if batch.teacher is not None:  # logged by the server, most likely first: keep the first m
        m = top_m or batch.teacher.ids.shape[1]
        return TopM(batch.teacher.ids[:, :m], batch.teacher.logprobs[:, :m])
    with torch.no_grad():
        t_logits = teacher(batch.input_ids, batch.attention_mask, batch.rows)  # [rows, vocab]
    return TopM.from_logits(t_logits, top_m) if top_m else t_logits


STUDENT_CONFIG_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)


def _progress_record(run: _Run, step: int, agreement: float, final: bool) -> str:
    """distill.json after `step` steps."""
    return _record(
        run.config,
        run.verifier,
        {
            "status": "finished" if final else "in progress",
            "steps_done": step,
            "world_size": run.d.world,
            "num_prompts_answered": len(run.examples),
            "num_train_examples": len(run.train),
            "num_held_out_examples": len(run.held_out),
            "num_train_response_tokens": sum(len(e.response_ids) for e in run.train),
            "num_held_out_response_tokens": sum(len(e.response_ids) for e in run.held_out),
            "student_config": {k: getattr(run.student_lm.config, k) for k in STUDENT_CONFIG_KEYS},
            "student_parameters": sum(p.numel() for p in run.student_lm.parameters()),
            "initial_agreement": run.history[0]["held_out_agreement"],
            "final_agreement": agreement if final else None,
            "agreement": "held-out share of response positions where student argmax == teacher argmax",
            "cost_ratio": run.cost,
            "history": run.history,
            "teacher_generation_s": run.t_generated - run.t_start,
        },
    )


def _evaluate_and_save(run: _Run, step: int, final: bool) -> None:
    """Rank 0: held-out agreement into the history, printed, and the checkpoint with distill.json written."""
    if not run.d.main:
        return
    agreement = greedy_agreement(run.student, run.eval_batches, run.teacher_argmax)
    entry = {
        "step": step,
        "held_out_agreement": agreement,
        "train_loss": sum(run.losses) / len(run.losses) if run.losses else None,
        "elapsed_s": time.perf_counter() - run.t_start,
    }
    run.losses = []
    run.history.append(entry)
    loss_text = f"{entry['train_loss']:.4f}" if entry["train_loss"] is not None else "-"
    tqdm.write(
        f"[distill] step {step}: held-out greedy agreement {agreement:.4f}, train loss {loss_text}, "
        f"c = {run.cost['c']:.3f}"
    )
    record = _progress_record(run, step, agreement, final)
    save_student(run.student_lm, run.verifier, run.config.out, {"distill.json": record})


def _train(run: _Run, model: nn.Module, teacher: RowLogits | None, pad_id: int) -> int:
    """The optimizer steps, evaluating every `eval_every`; returns the steps taken."""
    from transformers import get_cosine_schedule_with_warmup

    config, d = run.config, run.d
    sampler = DistributedSampler(run.train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=config.seed)
    loader = DataLoader(
        run.train, batch_size=config.batch_size, sampler=sampler, collate_fn=lambda xs: collate(xs, pad_id)
    )
    opt_config = config.optimizer_config
    optimizer = opt_config.adamw(run.student.parameters())
    schedule = get_cosine_schedule_with_warmup(optimizer, opt_config.warmup_steps(config.steps), config.steps)

    _evaluate_and_save(run, 0, final=False)
    bar = tqdm(total=config.steps, desc="distill", disable=not (config.progress and d.main))
    step, epoch = 0, 0
    while step < config.steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            batch = batch.to(d.device)
            target = _target(batch, teacher, config.teacher_top_m)
            s_logits = model(batch.input_ids, batch.attention_mask, batch.rows)  # [rows, vocab]
            loss = distill_loss(
                s_logits,
                target,
                config.loss,
                config.temperature,
                config.jsd_beta,
                batch.labels,
                config.hard_label_weight,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            opt_config.clip(run.student.parameters())
            optimizer.step()
            schedule.step()
            step += 1
            run.losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
            if step == config.steps:
                break
            if config.eval_every and step % config.eval_every == 0:
                _evaluate_and_save(run, step, final=False)
        epoch += 1
    bar.close()
    return step


def distill(config: DistillConfig) -> DistillResult:
    from transformers import AutoTokenizer

    d = setup_distributed(config.device)
    try:
        verifier = _resolve_verifier(config, d)
        t_start = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(verifier)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        examples = _examples(config, verifier, tokenizer, d)
        train, held_out = _split(examples, config.eval_fraction, config.seed)
        t_generated = time.perf_counter()

        teacher = _teacher(config, verifier, d)
        student_lm = build_student(verifier, config.student, config.seed).to(d.device)
        if config.traffic:
            check_vocabulary(examples, student_lm.config.vocab_size, f"traffic store {describe(config.traffic)}")
        student = RowLogits(student_lm).train()
        model = student
        if d.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(student, device_ids=[d.device.index] if d.device.type == "cuda" else None)

        cost, eval_batches, teacher_argmax = None, [], []
        if d.main:
            with tempfile.TemporaryDirectory() as tmp:
                save_student(student_lm, verifier, os.path.join(tmp, "student"))
                cost = measure_cost_ratio(verifier, os.path.join(tmp, "student"), str(d.device))
            eval_batches, teacher_argmax = _eval_set(held_out, teacher, config.batch_size, pad_id, d.device)

        run = _Run(
            config, verifier, d, examples, train, held_out, student_lm, student, eval_batches, teacher_argmax, cost,
            t_start, t_generated,
        )  # fmt: skip
        step = _train(run, model, teacher, pad_id)
        _evaluate_and_save(run, step, final=True)
        d.barrier()  # the other ranks leave only once rank 0 has written the checkpoint
        digest = weights_digest(student)
        if not d.main:
            return DistillResult(config.out, None, None, None, [], digest)
        history = run.history
        return DistillResult(
            config.out, history[0]["held_out_agreement"], history[-1]["held_out_agreement"], cost, history, digest
        )
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()
