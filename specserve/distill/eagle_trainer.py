"""Training an EAGLE draft head (`specserve distill --draft-type eagle`).

1. Sequences: chat prompts with the dataset's own responses (`responses="dataset"`) or the verifier's
   answers (`"verifier"`, sequence-level distillation); then one teacher pass of the verifier
   (eagle_data.teacher_pass) keeps its features and top-m next-token log-probs at every position.
2. The draft vocabulary: the N tokens the verifier most often predicts or emits in the training data.
3. The head is trained as EAGLE-3 tests it ("training-time test", eagle_unroll.py): unrolled for
   `unroll_steps` steps over every position in parallel; step 1 reads token x_i and the true feature
   f_{i-1} (with a little noise), step s the head's own step-(s-1) prediction at i - 1, attending over
   exactly the KV it would see while drafting. Each step predicts f_i and is scored by
       feature_weight * smooth_l1(norm(f^_i), norm(f_i))          (in the space the output layer reads)
     + forward KL(verifier top-m at i restricted to the draft vocabulary || head's distribution),
   the steps weighted unroll_decay^(s-1). unroll_steps=1 is EAGLE's plain teacher forcing.
   AdamW, warmup + cosine decay, gradient clipping. Under torchrun (gloo on CPU, nccl on GPU) every rank
   scores its share of sequences and trains on its share with DistributedDataParallel.
   A head may start from a trained one (`init_head`, its draft vocabulary kept).
4. Every `eval_every` steps (rank 0): on held-out sequences, the head's top-1 agreement with the
   verifier and its expected acceptance sum_x min(p(x), q(x)) (p: the verifier's top-m), one step
   ahead from true features, and the chained acceptance at each draft position 1..eval_depth. The best
   head so far (by expected accepted tokens of a chain) is written as a checkpoint, with `distill.json`
   and a PNG of the curves beside it, and the training state (eagle_state.py) so `resume` continues the
   run; Ctrl-C stops training and keeps the best. The teacher pass's output is kept in the output
   directory too (`teacher_data*.pt`), so a rerun or a resumed run with the same data settings skips it.

Knows nothing about the engine's scheduling or the command line.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from specserve.distill.eagle_data import TeacherSequence, draft_vocabulary, teacher_data
from specserve.distill.eagle_state import load_state, restore_rng, save_state
from specserve.distill.eagle_unroll import UnrolledHead, evaluate_chained, masked_row_losses, noisy, unrolled_losses
from specserve.distill.optimizer import OptimizerConfig
from specserve.distill.student import copy_tokenizer_files
from specserve.distill.trainer import setup_distributed
from specserve.model.attention import AttentionMetadata
from specserve.model.eagle import EagleHead, load_eagle
from specserve.model.loader import load_model


@dataclass(frozen=True)
class EagleConfig:
    data: tuple[str, ...]
    """Files of prompts (and responses): JSONL, ShareGPT JSON, plain text. Never Spec-Bench."""
    out: str
    """Directory the head checkpoint, distill.json and the training plot are written to."""
    verifier: str | None = None
    """HF checkpoint directory of the verifier; None: the default SmolLM2 verifier."""
    responses: str = "dataset"
    """'dataset': the files' own responses; 'verifier': the verifier's greedy answers (slower)."""
    max_sequences: int = 2000
    """Most sequences read over all files (interleaved file by file)."""
    max_tokens: int = 384
    """Most tokens per sequence (prompt + response)."""
    max_new_tokens: int = 128
    """With responses='verifier': most tokens the verifier answers with."""
    draft_vocab_size: int = 8192
    """Tokens the head can propose (the most frequent in the data); 0: the whole vocabulary."""
    teacher_top_m: int = 32
    """The verifier's m most likely tokens kept per position as the distillation target."""
    teacher_dtype: str = "float32"
    """dtype of the verifier during the teacher pass (and generation)."""
    feature_weight: float = 1.0
    """Weight of the feature regression next to the distribution loss."""
    feature_noise: float = 0.1
    """Uniform noise added to the input features, relative to their RMS."""
    steps: int = 2000
    """Optimizer steps (training stops earlier at max_minutes)."""
    max_minutes: float | None = None
    """Wall-clock budget of the training loop; None: no limit."""
    batch_size: int = 8
    """Sequences per step and rank."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    warmup_fraction: float = 0.03
    """Share of steps warming the learning rate up (then cosine decay)."""
    eval_every: int = 200
    """Steps between held-out evaluations (and checkpoints of the best head)."""
    eval_fraction: float = 0.05
    """Share of sequences held out."""
    seed: int = 0
    """Seed of the head's initialisation, the split and the data order."""
    device: str | None = None
    """torch device; None: cuda if available, else cpu."""
    progress: bool = True
    """Show progress bars (rank 0)."""
    unroll_steps: int = 3
    """Steps the head is unrolled on its own predicted features in training (1: teacher forcing only)."""
    unroll_decay: float = 0.8
    """Loss weight of unrolled step s is unroll_decay^(s-1) (normalised to sum to 1)."""
    eval_depth: int = 5
    """Draft positions the held-out evaluation chains (acceptance at each of 1..eval_depth)."""
    init_head: str | None = None
    """An EAGLE head checkpoint of this verifier to start from (its draft vocabulary is kept)."""
    feature_layers: tuple[int, ...] = ()
    """Verifier layers whose input the head reads besides the last layer's output (EAGLE-3's fused low and
    middle features); () reads the last layer's alone. From a plain `init_head` the new fusing layer starts as
    a pass-through of the last layer's output."""
    resume: bool = False
    """Continue the run saved in `out` (its training state: head, optimizer, step, RNG, data position)."""

    def __post_init__(self) -> None:
        from specserve.distill.data import check_not_eval_only

        if not self.data:
            raise ValueError("EAGLE training needs at least one --data file")
        for p in self.data:
            check_not_eval_only(p)
        if self.responses not in ("dataset", "verifier"):
            raise ValueError(f"responses must be 'dataset' or 'verifier', got {self.responses!r}")
        names = ("max_sequences", "max_tokens", "teacher_top_m", "steps", "batch_size", "eval_every", "unroll_steps")
        for name in (*names, "eval_depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 16:
            raise ValueError(f"max_tokens must be >= 16, got {self.max_tokens}")
        if self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size must be >= 0 (0: whole vocabulary), got {self.draft_vocab_size}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if self.feature_weight < 0 or self.feature_noise < 0 or not self.lr > 0:
            raise ValueError("feature_weight and feature_noise must be >= 0 and lr > 0")
        if not 0.0 < self.unroll_decay <= 1.0:
            raise ValueError(f"unroll_decay must be in (0, 1], got {self.unroll_decay}")

    @property
    def optimizer_config(self) -> OptimizerConfig:
        """No weight decay, gradient norms clipped at 1."""
        return OptimizerConfig(self.lr, 0.0, self.warmup_fraction, 1.0)


# ---- one batch ------------------------------------------------------------------------------------


@dataclass
class HeadBatch:
    input_ids: torch.Tensor  # [tokens] x_i
    positions: torch.Tensor  # [tokens]
    in_features: torch.Tensor  # [tokens, width] f_{i-1} (zeros at i = 0): EagleHead.feature_width wide
    target_features: torch.Tensor  # [tokens, hidden] f_i: the last layer's output
    topm_ids: torch.Tensor  # [tokens, m] int64, in draft-vocabulary indices (-1: outside it)
    topm_probs: torch.Tensor  # [tokens, m] the verifier's probabilities, renormalised on the draft vocabulary
    topm_p: torch.Tensor  # [tokens, m] the verifier's probabilities as they are (0 outside the draft vocabulary)
    loss_mask: torch.Tensor  # [tokens] bool: positions with a next token (not a sequence's last)
    meta: AttentionMetadata
    num_tokens: int
    seq_lens: list[int] = field(default_factory=list)  # tokens of each packed sequence, in order
    chain_start: torch.Tensor | None = None  # [tokens] bool: where evaluated draft chains start (responses)
    next_is_top1: torch.Tensor | None = None  # [tokens] bool: the next token is the verifier's top-1 choice


def make_batch(seqs: list[TeacherSequence], to_draft: torch.Tensor, device, hidden: int | None = None) -> HeadBatch:
    """Sequences packed end to end, each attending causally to itself (a prefill of several requests)."""
    masks, starts, greedy = [], [], []
    for s in seqs:
        n = s.token_ids.numel()
        m = torch.ones(n, dtype=torch.bool)
        m[-1] = False
        masks.append(m)
        # the token before the first response token is where drafting starts
        starts.append(m & (torch.arange(n) >= s.num_prompt_tokens - 1))
        greedy.append(torch.cat([s.topm_ids[:-1, 0].long() == s.token_ids[1:], torch.zeros(1, dtype=torch.bool)]))
    batch = pack_batch(
        [s.token_ids for s in seqs],
        [s.features for s in seqs],
        [to_draft[s.topm_ids.long()] for s in seqs],
        [s.topm_logprobs for s in seqs],
        masks,
        device,
        hidden,
    )
    batch.chain_start = torch.cat(starts).to(device)
    batch.next_is_top1 = torch.cat(greedy).to(device)
    return batch


def pack_batch(
    token_ids: list[torch.Tensor],  # per sequence [T] int64
    features: list[torch.Tensor],  # per sequence [T, hidden]: f_i at each of its positions
    topm_ids: list[torch.Tensor],  # per sequence [T, m] int64, in draft-vocabulary indices (-1: outside it)
    topm_logprobs: list[torch.Tensor],  # per sequence [T, m]
    loss_masks: list[torch.Tensor],  # per sequence [T] bool: positions scored
    device,
    hidden: int | None = None,  # the last layer's width, where features hold more layers' (EAGLE-3): the target
) -> HeadBatch:
    """Sequences packed end to end, each attending causally to itself; the head reads f_{i-1} (zeros at i = 0)
    and is scored against f_i (its last `hidden` numbers)."""
    ids, pos, fin, fout = [], [], [], []
    for t, feats in zip(token_ids, features):
        n = t.numel()
        f = feats.float()
        ids.append(t)
        pos.append(torch.arange(n))
        fin.append(torch.cat([torch.zeros(1, f.shape[1]), f[:-1]]))
        fout.append(f if hidden is None else f[:, -hidden:])
    lens = [t.numel() for t in token_ids]
    total = sum(lens)
    starts = torch.tensor([0] + lens[:-1]).cumsum(0)
    longest = max(lens)
    ctx = torch.arange(longest)
    context_slots = (starts[:, None] + ctx[None, :]).clamp(max=total - 1)  # [batch, longest]
    meta = AttentionMetadata.build(lens, lens, torch.arange(total).to(device), context_slots.to(device))
    ids_draft = torch.cat(topm_ids)
    p = torch.cat([lp.float() for lp in topm_logprobs]).exp() * (ids_draft >= 0)
    probs = p / p.sum(-1, keepdim=True).clamp_min(1e-9)
    return HeadBatch(
        torch.cat(ids).to(device),
        torch.cat(pos).to(device),
        torch.cat(fin).to(device),
        torch.cat(fout).to(device),
        ids_draft.to(device),
        probs.to(device),
        p.to(device),
        torch.cat(loss_masks).to(device),
        meta,
        total,
        lens,
    )


def head_forward(model: torch.nn.Module, head: EagleHead, batch: HeadBatch, noise: float) -> torch.Tensor:
    """[tokens, hidden] predicted features (model: the head, or its DDP wrapper); fresh KV scratch per batch."""
    a = head.arch
    kv = torch.zeros(1, 2, batch.num_tokens, a.num_kv_heads, a.head_dim, device=batch.input_ids.device)
    if torch.is_grad_enabled():  # a non-leaf, so attention may write keys/values into it in place under autograd
        kv = kv.requires_grad_().clone()
    return model(batch.input_ids, batch.positions, kv, batch.meta, noisy(batch.in_features, noise))


def losses(head: EagleHead, batch: HeadBatch, predicted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature loss, distribution loss) averaged over positions with a next token."""
    feat, kl = row_losses(head, batch, predicted)
    return feat.mean(), kl.mean()


def row_losses(
    head: EagleHead,
    batch: HeadBatch,
    predicted: torch.Tensor,  # [tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:  # [rows], [rows]: rows = the positions in batch.loss_mask
    """Per scored position: smooth-L1 of the normed features (mean over hidden) and the cross-entropy against the
    verifier's top-m renormalised on the draft vocabulary (its forward KL up to the teacher's entropy)."""
    return masked_row_losses(head, batch, predicted, batch.loss_mask)


@torch.no_grad()
def evaluate(head: EagleHead, batches: list[HeadBatch]) -> dict:
    """One step ahead from true features: top-1 agreement, and expected acceptance sum_x min(p(x), q(x))
    over the verifier's top-m tokens (a lower bound: the mass outside its top m is left out)."""
    agree = accept = rows = 0.0
    for b in batches:
        pred = head_forward(head, head, b, 0.0)
        m = b.loss_mask
        q = torch.softmax(head.draft_logits(pred[m]), dim=-1)  # [rows, draft_vocab]
        ids = b.topm_ids[m]
        top1 = ids[:, 0]
        agree += ((q.argmax(-1) == top1) & (top1 >= 0)).sum().item()
        q_at = q.gather(1, ids.clamp_min(0)) * (ids >= 0)
        accept += torch.minimum(b.topm_p[m], q_at).sum().item()
        rows += m.sum().item()
    return {"agreement": agree / max(rows, 1), "expected_acceptance": accept / max(rows, 1)}


# ---- the run ---------------------------------------------------------------------------------------


def _plot(path: str, history: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    evals = [h for h in history if "agreement" in h]
    steps = [h["step"] for h in evals]
    tokens = [h.get("tokens_seen", 0) / 1e3 for h in evals]  # thousands of training tokens read
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot([h["step"] for h in history if "loss" in h], [h["loss"] for h in history if "loss" in h])
    ax[0].set(xlabel="step", ylabel="training loss", title="EAGLE head: loss (steps weighted)")
    ax[1].plot(tokens, [h["agreement"] for h in evals], marker="o", label="top-1 agreement")
    ax[1].plot(tokens, [h["expected_acceptance"] for h in evals], marker="s", label="expected acceptance")
    ax[1].set(xlabel="training tokens read (thousands)", ylabel="held out", ylim=(0, 1),
              title="one step ahead, held-out sequences")  # fmt: skip
    ax[1].legend()
    depth = len(evals[-1].get("acceptance_at", [])) if evals else 0
    for s in range(depth):
        line = ax[2].plot(steps, [h["acceptance_at"][s] for h in evals], marker="o", label=f"position {s + 1}")
        ax[2].plot(steps, [h["agreement_at"][s] for h in evals], ls="--", color=line[0].get_color())
    ax[2].set(xlabel="step", ylabel="P(drafts 1..s all accepted)", ylim=(0, 1),
              title="chained, held-out responses (solid: expected, dashed: greedy)")  # fmt: skip
    if depth:
        ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(path, "distill.png"), dpi=120)
    plt.close(fig)


def _initial_head(config: EagleConfig, verifier, verifier_dir: str, train, tokenizer, d) -> EagleHead:
    vocab = verifier.arch.vocab_size
    torch.manual_seed(config.seed)
    layers = tuple(config.feature_layers)
    if config.init_head is not None:
        head = load_eagle(config.init_head, verifier, verifier_dir)  # fp32, like the verifier now
        if head.feature_layers != layers:
            if head.feature_layers:
                raise ValueError(
                    f"--init-head {config.init_head} reads layers {list(head.feature_layers)}, this run "
                    f"{list(layers)}: a fused head starts only from a plain one or one of the same layers"
                )
            plain = head  # its weights, and a fusing layer that passes the last layer's output through
            head = EagleHead(verifier, plain.draft_vocab if plain.trimmed else None, layers)
            missing, unexpected = head.load_state_dict(plain.state_dict(), strict=False)
            if unexpected or set(missing) != {"fuse.weight"}:
                raise ValueError(f"--init-head {config.init_head}: unexpected weights {unexpected or missing}")
        return head.to(d.device).train().requires_grad_(True)
    always = {t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None}
    draft_vocab = None
    if config.draft_vocab_size and config.draft_vocab_size < vocab:
        draft_vocab = draft_vocabulary(train, config.draft_vocab_size, always, vocab)
        if d.world > 1:  # every rank saw other data: use rank 0's choice
            dist.broadcast(draft_vocab, 0)
    return EagleHead(verifier, draft_vocab, layers).to(d.device)


@dataclass
class _EagleRun:
    """One EAGLE training run: what the steps change (head, optimizer, data order, history) and what a
    checkpoint writes beside them."""

    config: EagleConfig
    config_record: dict
    verifier_dir: str
    head: EagleHead
    opt: torch.optim.Optimizer
    rng: random.Random
    """Shuffles the data order; saved with the training state."""
    train: list[TeacherSequence]
    held_out: list[TeacherSequence]
    eval_batches: list[HeadBatch]
    coverage: float
    """Share of held-out positions whose verifier top-1 is in the draft vocabulary."""
    teacher_seconds: float
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"accepted_tokens": -1.0})
    order: list[int] = field(default_factory=list)
    """Indices into `train` still to be drawn this epoch (popped from the end)."""
    step: int = 0
    prior_seconds: float = 0.0
    """Training seconds of the runs this one resumes."""
    tokens_seen: int = 0
    """Training tokens read so far, over all ranks."""
    train_started: float = 0.0


def _split_data(data: list[TeacherSequence], eval_fraction: float, rng: random.Random):
    """(held_out, train): `data` shuffled by `rng`, the first share held out."""
    rng.shuffle(data)
    n_eval = max(1, round(eval_fraction * len(data)))
    held_out, train = data[:n_eval], data[n_eval:]
    if not train:
        raise ValueError(f"only {len(data)} sequences: too few to train and hold some out")
    return held_out, train


def _draft_index(head: EagleHead, vocab: int) -> torch.Tensor:  # [vocab] draft id of each token, -1 outside
    to_draft = torch.full((vocab,), -1, dtype=torch.int64)
    to_draft[head.draft_vocab.cpu()] = torch.arange(head.draft_vocab_size)
    return to_draft


def _lr_at(config: EagleConfig, step: int) -> float:
    """Linear warmup, then cosine decay to 0; set by hand each step, so a resumed run needs no scheduler state."""
    warmup = max(1, config.optimizer_config.warmup_steps(config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, config.steps - warmup))))


def _resume(run: _EagleRun, state: dict | None, main: bool) -> None:
    if state is not None:
        run.head.load_state_dict(state["head"])
        run.opt.load_state_dict(state["optimizer"])
        run.step, run.order, run.history, run.best = state["step"], state["order"], state["history"], state["best"]
        restore_rng(state, run.rng)
        if main:
            print(f"specserve: resuming {run.config.out} at step {run.step}", flush=True)
    run.prior_seconds = max((h.get("train_seconds", 0.0) for h in run.history), default=0.0)
    run.tokens_seen = max((h.get("tokens_seen", 0) for h in run.history), default=0)


def _report(run: _EagleRun) -> dict:
    """distill.json."""
    head, train, held_out = run.head, run.train, run.held_out
    return {
        "draft_type": "eagle",
        "config": run.config_record,
        "verifier": os.path.abspath(run.verifier_dir),
        "sequences": {"train": len(train), "held_out": len(held_out)},
        "train_tokens": int(sum(s.token_ids.numel() for s in train)),
        "held_out_tokens": int(sum(s.token_ids.numel() for s in held_out)),
        "draft_vocab_size": head.draft_vocab_size,
        "held_out_top1_in_draft_vocab": run.coverage,
        "head_parameters": sum(p.numel() for p in head.parameters()),
        "teacher_seconds": run.teacher_seconds,
        "train_seconds": run.prior_seconds + time.time() - run.train_started,
        "best": run.best,
        "history": run.history,
    }


def _checkpoint(run: _EagleRun, step: int, with_state: bool = True) -> None:
    """Evaluate on the held-out batches; write the head if it is the best so far, the training state
    (unless `with_state` is False), distill.json and its plot."""
    config, head = run.config, run.head
    head.eval()
    result = {"step": step, **evaluate_chained(head, run.eval_batches, config.eval_depth)}
    result["train_seconds"] = run.prior_seconds + time.time() - run.train_started
    result["tokens_seen"] = run.tokens_seen
    head.train()
    run.history.append(result)
    if result["accepted_tokens"] > run.best["accepted_tokens"]:
        run.best = result
        head.save(config.out, run.verifier_dir, {"trained_steps": step})
        copy_tokenizer_files(run.verifier_dir, config.out)
    if with_state:
        save_state(
            config.out, head=head, optimizer=run.opt, step=step, rng=run.rng, order=run.order, history=run.history,
            best=run.best, config=run.config_record,
        )  # fmt: skip
    with open(os.path.join(config.out, "distill.json"), "w") as f:
        json.dump(_report(run), f, indent=2)
    _plot(config.out, run.history)


def _train_step(run: _EagleRun, model: torch.nn.Module, params: list, to_draft: torch.Tensor, d) -> dict:
    """One optimizer step on the next `batch_size` training sequences; returns its losses."""
    config = run.config
    if len(run.order) < config.batch_size:
        run.order = list(range(len(run.train)))
        run.rng.shuffle(run.order)
    picked = [run.train[run.order.pop()] for _ in range(config.batch_size)]
    batch = make_batch(picked, to_draft, d.device, run.head.arch.hidden_size)
    run.tokens_seen += sum(s.token_ids.numel() for s in picked) * d.world
    predicted = model(
        batch.input_ids, batch.positions, noisy(batch.in_features, config.feature_noise), batch.seq_lens
    )  # [unroll_steps, tokens, hidden]
    feat, kl, kl_steps = unrolled_losses(run.head, batch, predicted, config.unroll_decay)
    loss = config.feature_weight * feat + kl
    for g in run.opt.param_groups:
        g["lr"] = _lr_at(config, run.step)
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.config.optimizer_config.clip(params)
    run.opt.step()
    run.step += 1
    return {"loss": loss, "feat": feat, "kl": kl, "kl_steps": kl_steps}


def _train_loop(run: _EagleRun, model: torch.nn.Module, params: list, to_draft: torch.Tensor, d, resumed: bool) -> bool:
    """Steps until `steps` or `max_minutes`, evaluating every `eval_every` (rank 0; also before the first step
    of a fresh run); False if Ctrl-C stopped it mid-step."""
    config = run.config
    bar = tqdm(total=config.steps, initial=run.step, desc="eagle head", disable=not (config.progress and d.main))
    run.head.train()
    clean = True  # the loop stopped at a step boundary (not by Ctrl-C mid-step)
    try:
        if d.main and not resumed:
            _checkpoint(run, 0)
        while run.step < config.steps:
            if config.max_minutes is not None and time.time() - run.train_started > 60 * config.max_minutes:
                break
            out = _train_step(run, model, params, to_draft, d)
            loss, kl = out["loss"], out["kl"]
            if d.main:
                run.history.append(
                    {
                        "step": run.step,
                        "loss": loss.item(),
                        "feature_loss": out["feat"].item(),
                        "kl": kl.item(),
                        "kl_at": out["kl_steps"],
                        "tokens_seen": run.tokens_seen,
                    }  # fmt: skip
                )
                bar.set_postfix(loss=f"{loss.item():.3f}", kl=f"{kl.item():.3f}")
                bar.update(1)
                if run.step % config.eval_every == 0:
                    _checkpoint(run, run.step)
    except KeyboardInterrupt:
        clean = False
        if d.main:
            print("interrupted: keeping the best head so far (and the training state of the last evaluation)")
    finally:
        bar.close()
    return clean


def train_eagle(config: EagleConfig) -> dict:
    from transformers import AutoTokenizer

    d = setup_distributed(config.device)
    verifier_dir = config.verifier
    if verifier_dir is None:
        from specserve.model.default_models import default_verifier

        verifier_dir = default_verifier()
    config_record = {**asdict(config), "data": [os.path.abspath(p) for p in config.data]}
    state = load_state(config.out, config_record) if config.resume else None
    tokenizer = AutoTokenizer.from_pretrained(verifier_dir)
    started = time.time()
    verifier = load_model(verifier_dir, config.teacher_dtype, str(d.device))
    verifier.feature_layers = tuple(config.feature_layers)  # the teacher pass keeps those layers' inputs too
    data = teacher_data(config, verifier, verifier_dir, tokenizer, d.rank, d.world)
    teacher_seconds = time.time() - started
    verifier = verifier.float()  # the head trains in fp32 on the verifier's frozen embedding / norm / output
    vocab = verifier.arch.vocab_size

    rng = random.Random(config.seed)
    held_out, train = _split_data(data, config.eval_fraction, rng)
    head = _initial_head(config, verifier, verifier_dir, train, tokenizer, d)
    to_draft = _draft_index(head, vocab)
    coverage = sum((to_draft[s.topm_ids[:, 0].long()] >= 0).float().mean().item() for s in held_out) / len(held_out)

    unrolled = UnrolledHead(head, config.unroll_steps)
    model = unrolled
    if d.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(unrolled)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = config.optimizer_config.adamw(params)
    hidden = head.arch.hidden_size
    eval_batches = [make_batch(held_out[i : i + 8], to_draft, d.device, hidden) for i in range(0, len(held_out), 8)]
    run = _EagleRun(
        config, config_record, verifier_dir, head, opt, rng, train, held_out, eval_batches, coverage, teacher_seconds
    )
    _resume(run, state, d.main)
    os.makedirs(config.out, exist_ok=True)

    run.train_started = time.time()  # max_minutes counts this run's training, resumed or not
    clean = _train_loop(run, model, params, to_draft, d, resumed=state is not None)
    history, step = run.history, run.step
    if d.main and (not history or history[-1].get("step") != step or "agreement" not in history[-1]):
        _checkpoint(run, step, with_state=clean)  # after Ctrl-C the state on disk stays the last evaluation's
    d.barrier()
    return {"out": config.out, "steps": step, "best": run.best, "head": head}
