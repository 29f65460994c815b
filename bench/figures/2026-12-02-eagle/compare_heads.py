"""Held-out acceptance per draft position of EAGLE heads, on the held-out split of one training run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/figures/2026-12-02-eagle/compare_heads.py /tmp/eagle-run \
        shipped=specserve/drafts/smollm2-135m-eagle new=/tmp/eagle-run

Reads the run's cached teacher pass (teacher_data.pt) and its distill.json (seed, eval_fraction), rebuilds
the same held-out split the trainer used, and scores every head with the trainer's own evaluation
(eagle_unroll.evaluate_chained): one step ahead, and chained over draft positions 1..5. Writes
compare.json, compare.md and compare.png beside this script.
"""

from __future__ import annotations

import json
import os
import random
import sys

import torch

from specserve.distill.eagle_data import TeacherSequence
from specserve.distill.eagle_trainer import make_batch
from specserve.distill.eagle_unroll import evaluate_chained
from specserve.model.eagle import load_eagle
from specserve.model.loader import load_model

HERE = os.path.dirname(os.path.abspath(__file__))
DEPTH = 5


def main(run: str, heads: dict[str, str]) -> dict:
    torch.set_num_threads(1)
    report = json.load(open(os.path.join(run, "distill.json")))
    cfg = report["config"]
    saved = torch.load(os.path.join(run, "teacher_data.pt"), weights_only=True)
    data = [TeacherSequence(**s) for s in saved["sequences"]]
    random.Random(cfg["seed"]).shuffle(data)  # the trainer's split
    held_out = data[: max(1, round(cfg["eval_fraction"] * len(data)))]
    verifier = load_model(report["verifier"], torch.float32, "cpu")
    vocab = verifier.arch.vocab_size
    out = {
        "run": run,
        "held_out_sequences": len(held_out),
        "held_out_tokens": sum(s.token_ids.numel() for s in held_out),
    }
    for name, path in heads.items():
        head = load_eagle(path, verifier, report["verifier"])
        to_draft = torch.full((vocab,), -1, dtype=torch.int64)
        to_draft[head.draft_vocab] = torch.arange(head.draft_vocab_size)
        batches = [make_batch(held_out[i : i + 8], to_draft, "cpu") for i in range(0, len(held_out), 8)]
        out[name] = {"path": path, **evaluate_chained(head, batches, DEPTH)}
        print(name, json.dumps({k: out[name][k] for k in ("acceptance_at", "agreement_at", "accepted_tokens")}))
    with open(os.path.join(HERE, "compare.json"), "w") as f:
        json.dump(out, f, indent=2)
    lines = [
        f"Held-out: {out['held_out_sequences']} sequences ({out['held_out_tokens']} tokens) of `{run}`, chains start in"
        " the verifier's responses.",
        "",
        "| head | one-step agreement | one-step expected acceptance | expected P(accept 1..s), s = 1..5 | "
        "greedy P(accept 1..s) | expected accepted / chain of 5 | greedy accepted / chain of 5 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in heads:
        r = out[name]
        lines.append(
            f"| {name} | {r['agreement']:.3f} | {r['expected_acceptance']:.3f} | "
            + " ".join(f"{x:.3f}" for x in r["acceptance_at"])
            + " | "
            + " ".join(f"{x:.3f}" for x in r["agreement_at"])
            + f" | {r['accepted_tokens']:.3f} | {r['greedy_accepted_tokens']:.3f} |"
        )
    with open(os.path.join(HERE, "compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    x = torch.arange(1, DEPTH + 1).numpy()
    width = 0.8 / len(heads)
    for k, name in enumerate(heads):
        ax[0].bar(x + k * width, out[name]["acceptance_at"], width, label=name)
        ax[1].bar(x + k * width, out[name]["agreement_at"], width, label=name)
    ax[0].set(xlabel="draft position s", ylabel="P(drafts 1..s accepted)", title="expected (sum min(p, q), chained)")
    ax[1].set(xlabel="draft position s", title="greedy (top-1 agreement, chained)")
    for a in ax:
        a.legend()
        a.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "compare.png"), dpi=120)
    return out


if __name__ == "__main__":
    main(sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:]))
