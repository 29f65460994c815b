"""The state of an EAGLE head's training run, saved beside the head so `--resume` continues it.

`training_state.pt` holds what the next optimizer step depends on: the current head (not the best
one, which is the checkpoint beside it), the optimizer's moments, the step counter, the Python and
torch random states (data order, feature noise), the data position (what is left of this epoch's
order), and the history and best result so far. It is written at clean step boundaries only (every
evaluation, and when the budget or the step count ends the run), so a run resumed from it takes the
same steps as one never stopped. Knows nothing about the data or the losses.
"""

from __future__ import annotations

import os
import random

import torch

STATE_FILE = "training_state.pt"

# settings a resumed run must share with the run it continues (the rest, e.g. steps or max_minutes, may change)
SAME_ON_RESUME = (
    "data",
    "responses",
    "max_sequences",
    "max_tokens",
    "max_new_tokens",
    "draft_vocab_size",
    "teacher_top_m",
    "eval_fraction",
    "seed",
    "batch_size",
    "unroll_steps",
    "init_head",
    "feature_layers",
)
# settings newer than some saved states: a state without one was made with its default
ADDED_LATER = {"feature_layers": ()}


def save_state(
    out: str,
    *,
    head: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    rng: random.Random,
    order: list[int],
    history: list[dict],
    best: dict,
    config: dict,
) -> None:
    state = {
        "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "python_rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "order": list(order),
        "history": history,
        "best": best,
        "config": config,
    }
    path = os.path.join(out, STATE_FILE)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_state(out: str, config: dict) -> dict:
    """The saved state of the run in `out`; refuses one made with other data or another batch shape."""
    path = os.path.join(out, STATE_FILE)
    if not os.path.exists(path):
        raise ValueError(f"--resume: no {STATE_FILE} in {out!r}; train into it without --resume first")
    state = torch.load(path, weights_only=False)  # our own file: Python's RNG state is a tuple
    saved = state["config"]
    changed = [k for k in SAME_ON_RESUME if saved.get(k, ADDED_LATER.get(k)) != config.get(k, ADDED_LATER.get(k))]
    if changed:
        pairs = ", ".join(f"{k}: {saved.get(k, ADDED_LATER.get(k))!r} -> {config.get(k)!r}" for k in changed)
        raise ValueError(f"--resume: {out!r} was trained with other settings ({pairs}); use the same ones")
    return state


def restore_rng(state: dict, rng: random.Random) -> None:
    rng.setstate(state["python_rng"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
