"""Drafts: load a draft, vet it against the verifier it will serve, arm its kernels, build its proposer.

One module for every way a draft comes in: the engine's startup and hot swap, the draft watcher (a
version the online trainer published) and bench (the draft's parameter share). A failed check raises
DraftRejected, a ValueError whose `reason` names the check. A draft is a standalone LlamaModel or an
EAGLE head; either may replace either, within the KV the engine reserved for a draft at startup.
Knows nothing about registries, manifests or threads (the watcher checks and owns those), nor requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer

from specserve.engine.eagle_proposer import EagleProposer
from specserve.engine.model_runner import ModelRunner, TokenRun, kv_bytes_per_block
from specserve.engine.proposer import DraftProposer
from specserve.model.batch_invariant import enable_batch_invariant
from specserve.model.eagle import EagleHead, is_eagle_checkpoint, load_eagle
from specserve.model.llama import LlamaModel
from specserve.model.loader import load_model
from specserve.model.upcast import Linear, enable_upcast, runs_cpu_kernel

VOCAB_PROBE = "Hello, world! The quick brown fox: 1234 + 5678 = ?"
SMOKE_TOKENS = 8
"""Tokens of the smoke forward a new draft must pass."""

Draft = LlamaModel | EagleHead


class DraftRejected(ValueError):
    """A draft failed a check; `reason` names it ('vocabulary', 'nonfinite', 'kv_budget', 'context',
    'smoke_forward', or the caller's own: the draft watcher adds 'registry', 'verifier', 'load', 'engine')."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DraftSlot:
    """What a draft must fit: the engine's verifier, and what the engine reserved for a draft at startup."""

    verifier: LlamaModel
    verifier_dir: str
    """The verifier's checkpoint directory (an EAGLE head is checked against its fingerprint)."""
    tokenizer: Any
    """The verifier's tokenizer."""
    dtype: torch.dtype
    device: str
    block_size: int
    block_bytes: int
    """KV bytes per block reserved for the draft (0: the engine runs without one)."""
    max_model_len: int
    """The longest context the engine serves: the draft must be positioned for it."""


def check_same_vocabulary(verifier: LlamaModel, draft: Draft, verifier_tok, draft_tok) -> None:
    """The draft's vocabulary is the verifier's: the same size, and (given its tokenizer) the same encoding."""
    v, d = verifier.arch.vocab_size, draft.arch.vocab_size
    if v != d:
        raise DraftRejected(
            "vocabulary", f"draft vocabulary size {d} differs from the verifier's {v}; the draft must share it"
        )
    if draft_tok is not None:
        a, b = verifier_tok.encode(VOCAB_PROBE), draft_tok.encode(VOCAB_PROBE)
        if a != b:
            raise DraftRejected(
                "vocabulary",
                f"draft tokenizer encodes {VOCAB_PROBE!r} as {b}, verifier as {a}: not the same vocabulary",
            )


def num_params(model: torch.nn.Module) -> int:
    """Parameters a forward multiplies by (an EAGLE head: its own, plus the output rows it uses)."""
    if isinstance(model, EagleHead):
        return sum(p.numel() for p in model.parameters()) + model.draft_vocab_size * model.arch.hidden_size
    return sum(p.numel() for p in model.parameters())


def load_draft(path: str, verifier: LlamaModel, verifier_dir: str, tokenizer, dtype: torch.dtype, device: str) -> Draft:
    """The draft at `path` for this verifier: an EAGLE head (load_eagle checks it was trained for this verifier,
    and puts it on the verifier's dtype and device) or a standalone draft on `dtype` and `device`, whose
    tokenizer, if it ships one, must encode as the verifier's `tokenizer` does."""
    if is_eagle_checkpoint(path):
        return load_eagle(path, verifier, verifier_dir)
    model = load_model(path, dtype, device)
    try:
        draft_tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        draft_tok = None  # a bare checkpoint (e.g. a distilled draft) reuses the verifier's tokenizer
    check_same_vocabulary(verifier, model, tokenizer, draft_tok)
    return model


def check_kv_budget(model: Draft, slot: DraftSlot, version: str) -> None:
    need = kv_bytes_per_block(model, slot.block_size, next(model.parameters()).dtype)
    if need > slot.block_bytes:
        raise DraftRejected(
            "kv_budget",
            f"draft {version!r} needs {need} KV bytes per block, more than the {slot.block_bytes} "
            "reserved for the draft at startup; restart the server to serve a larger draft",
        )


def check_fits(model: Draft, slot: DraftSlot, version: str) -> None:
    """The checks a swap cannot do without: the verifier's vocabulary, and KV within the reserved budget."""
    check_same_vocabulary(slot.verifier, model, slot.tokenizer, None)
    check_kv_budget(model, slot, version)


def vet_draft(model: Draft, slot: DraftSlot, version: str) -> None:
    """Every check, in order: vocabulary, finite weights, KV budget, context length, a smoke forward."""
    check_same_vocabulary(slot.verifier, model, slot.tokenizer, None)
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DraftRejected("nonfinite", f"draft {version!r} has NaN or infinite weights in {bad[:3]}")
    check_kv_budget(model, slot, version)
    if model.arch.max_position_embeddings < slot.max_model_len:
        raise DraftRejected(
            "context",
            f"draft {version!r} handles {model.arch.max_position_embeddings} positions, "
            f"the engine serves contexts of {slot.max_model_len}",
        )
    smoke_forward(model, slot, version)


def smoke_forward(model: Draft, slot: DraftSlot, version: str) -> None:
    """A forward over a few tokens on runners of its own (the engine's KV pools are not touched) must give
    logits of the verifier's vocabulary, never NaN or +inf."""
    tokens = slot.tokenizer.encode(VOCAB_PROBE)[:SMOKE_TOKENS]
    n, block_size = len(tokens), slot.block_size
    blocks = list(range(-(-n // block_size)))
    features = None  # [n, hidden]: f_{i-1} at each position i, as the engine hands an EAGLE head
    if isinstance(model, EagleHead):  # the verifier runs read-only, on a KV pool of its own
        verifier = ModelRunner(slot.verifier, len(blocks), block_size)
        f = verifier.run([TokenRun(tokens, 0, blocks, 0)], keep_features=True).features  # [n, hidden]: f_i
        features = torch.cat([f.new_zeros(1, f.shape[1]), f[:-1]])
    runner = ModelRunner(model, len(blocks), block_size)
    try:
        logits = runner.forward([TokenRun(tokens, 0, blocks, n)], features)  # [n, vocab]
    except Exception as e:
        raise DraftRejected("smoke_forward", f"draft {version!r}: a forward over {n} tokens failed: {e!r}") from e
    want = (n, slot.verifier.arch.vocab_size)
    if tuple(logits.shape) != want:
        raise DraftRejected("smoke_forward", f"draft {version!r}: logits of shape {tuple(logits.shape)}, want {want}")
    # an EAGLE head with a trimmed vocabulary gives -inf outside it, by design; NaN and +inf never
    if torch.isnan(logits).any() or torch.isposinf(logits).any() or not torch.isfinite(logits).any(-1).all():
        raise DraftRejected("smoke_forward", f"draft {version!r}: the smoke forward gave NaN or infinite logits")


def arm(model: Draft, upcast: bool, batch_invariant: bool, bf16_numbers: bool = False) -> None:
    """Switch the draft to the kernels the verifier runs (upcast matmuls or batch-invariant ones), in place.
    bf16_numbers (the verifier's weights are bf16 numbers run in fp32, as the default one's): the draft's fp32
    weights are rounded to bf16 numbers first (`round_to_bf16`)."""
    if upcast:
        if bf16_numbers:
            round_to_bf16(model)
        enable_upcast(model)
    if batch_invariant:
        enable_batch_invariant(model)


def holds_bf16_numbers(model: torch.nn.Module) -> bool:
    """Whether an armed model's linear layers stream bf16 copies (fp32 weights that are all bf16 numbers)."""
    return any(isinstance(m, Linear) and m.upcast is not None and m.upcast.compact is not None for m in model.modules())


def round_to_bf16(model: Draft) -> bool:
    """Round a draft's fp32 weights to bf16 numbers, in place, where its linear layers run on our CPU C kernel:
    the kernel then streams a bf16 copy, half the bytes (the EAGLE head's step on the 2-core Xeon: 1.8 -> 1.6 ms
    after a verifier step). Done for a verifier whose own weights are bf16 numbers (the default one). A draft
    only proposes: the verifier decides every token, so outputs stay exact whatever the draft's rounding, and
    the shipped head's Spec-Bench acceptance was the same to two decimals in every category. Trainers keep their
    own fp32 copies (the online trainer publishes checkpoints; this is the serving copy). Returns whether
    anything was rounded."""
    params = [p for p in model.parameters() if p.dtype == torch.float32 and p.device.type == "cpu"]
    if not params or not any(runs_cpu_kernel(m.weight) for m in model.modules() if isinstance(m, Linear)):
        return False
    changed = False
    with torch.no_grad():
        for p in params:
            rounded = p.to(torch.bfloat16).float()
            if not torch.equal(rounded, p):
                p.copy_(rounded)
                changed = True
    return changed


def make_proposer(model: Draft, num_blocks: int, block_size: int) -> DraftProposer:
    """The draft's proposer, on a KV pool of its own with the engine's block ids."""
    runner = ModelRunner(model, num_blocks, block_size)
    return EagleProposer(runner) if isinstance(model, EagleHead) else DraftProposer(runner)
