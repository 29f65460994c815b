"""Held-out evaluation of a draft (`specserve distill --eval-only --draft DIR`): acceptance on Spec-Bench.

Our engine runs the verifier with the draft at a fixed k (default 5, draft model only: no prompt
lookup, so the figures are the draft's own) over Spec-Bench first turns, a few per category, greedy
and sampled (T = 0.7 by default). Per category and overall it reports the mean acceptance length
(tokens per verification step), per-position acceptance (accepted / drafted at draft position j)
and alpha (accepted / checked: a draft after a rejection is never checked), and writes JSON and a PNG of per-position
acceptance. Spec-Bench is never training data, so these are held-out figures. Timings are not
measured here (`specserve bench latency` does that). Knows nothing about training.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from tqdm.auto import tqdm

from specserve.evaluation.acceptance import acceptance_summary, spec_counts
from specserve.evaluation.prompts import CATEGORIES, load_prompts
from specserve.evaluation.systems import OursSystem


@dataclass(frozen=True)
class EvalConfig:
    draft: str
    """The draft checkpoint (standalone or EAGLE head)."""
    verifier: str | None = None
    """The verifier; None: the default SmolLM2 verifier."""
    k: int = 5
    """Draft tokens per verification step (fixed)."""
    per_category: int = 2
    """Spec-Bench prompts per category."""
    max_tokens: int = 64
    """Tokens generated per prompt."""
    temperatures: tuple[float, ...] = (0.0, 0.7)
    """Decoding temperatures; 0 is greedy."""
    dtype: str = "auto"
    """dtype of both models ('auto': the serving default, see EngineConfig.dtype)."""
    device: str = "cpu"
    """torch device."""
    out: str | None = None
    """JSON path (a PNG is written beside it); None: print only."""
    seed: int = 0
    """Seed of the sampled runs."""

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 32:
            raise ValueError(f"k must be in [1, 32], got {self.k}")
        if self.per_category < 1 or self.max_tokens < 1:
            raise ValueError("per_category and max_tokens must be >= 1")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be >= 0, got {self.temperatures}")


def evaluate_draft(config: EvalConfig) -> dict:
    from specserve.model.default_models import default_verifier

    verifier = config.verifier or default_verifier()
    prompts = None
    system = None
    results: dict = {"config": {**config.__dict__, "verifier": verifier}, "temperatures": {}}
    for temperature in config.temperatures:
        if system is None:
            from transformers import AutoTokenizer

            prompts = load_prompts(AutoTokenizer.from_pretrained(verifier), config.per_category)
            longest = max(len(p.token_ids) for p in prompts) + config.max_tokens + config.k + 1
            system = OursSystem(
                "eval", verifier, config.draft, config.k, config.dtype, config.device, longest, method="draft"
            )
            fits = [
                p for p in prompts if len(p.token_ids) + config.max_tokens + config.k + 1 <= system.engine.max_model_len
            ]
            results["skipped_too_long"] = len(prompts) - len(fits)
            prompts = fits
        records = []
        for i, p in enumerate(tqdm(prompts, desc=f"T={temperature}")):
            run = system.run(p.token_ids, temperature, config.max_tokens, config.seed + i)
            records.append(
                {"category": p.category, "spec": spec_counts(run.steps), "output_tokens": len(run.token_ids)}
            )
        by_category = {
            c: acceptance_summary([r for r in records if r["category"] == c], None)
            for c in CATEGORIES
            if any(r["category"] == c for r in records)
        }
        results["temperatures"][str(temperature)] = {
            "overall": acceptance_summary(records, None),
            "by_category": by_category,
        }
    if config.out:
        os.makedirs(os.path.dirname(os.path.abspath(config.out)), exist_ok=True)
        with open(config.out, "w") as f:
            json.dump(results, f, indent=2)
        _plot(os.path.splitext(config.out)[0] + ".png", results, config.k)
    return results


def print_results(results: dict, file=None) -> None:
    file = sys.stdout if file is None else file  # read at the call: a default bound at import outlives redirections
    for temperature, r in results["temperatures"].items():
        print(f"\nT = {temperature}", file=file)
        print("| category | mean acceptance length | alpha | per-position acceptance |", file=file)
        print("| :-- | --: | --: | :-- |", file=file)
        rows = [*r["by_category"].items(), ("overall", r["overall"])]
        for name, s in rows:
            pos = " ".join(f"{x or 0:.2f}" for x in s.get("per_position_acceptance", []))
            mal, alpha = s["mean_acceptance_length"] or 0.0, s["alpha"] or 0.0
            print(f"| {name} | {mal:.2f} | {alpha:.3f} | {pos} |", file=file)


def _plot(path: str, results: dict, k: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    temps = list(results["temperatures"])
    fig, axes = plt.subplots(1, len(temps), figsize=(6 * len(temps), 4), squeeze=False)
    for ax, t in zip(axes[0], temps):
        r = results["temperatures"][t]
        for name, s in [*r["by_category"].items(), ("overall", r["overall"])]:
            pos = [x or 0.0 for x in s.get("per_position_acceptance", [])]
            ax.plot(range(1, len(pos) + 1), pos, marker="o", label=name, linewidth=3 if name == "overall" else 1)
        ax.set(xlabel="draft position", ylabel="accepted / checked", title=f"T = {t}, k = {k}", ylim=(0, 1))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
