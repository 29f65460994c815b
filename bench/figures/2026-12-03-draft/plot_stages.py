"""Spec-Bench mean acceptance length of the shipped head's stages against the self-distilled tokens trained on.

    .venv/bin/python bench/figures/2026-12-03-draft/plot_stages.py STAGE6.json [STAGE7.json ...] OUT.png

Stages 1-5 are the figures in the README's "The shipped draft" table (each measured with `specserve distill
--eval-only --eval-per-category 4 --eval-max-tokens 64 --eval-temperatures 0,0.7`, k = 5); stage 6's and later
ones are read from their eval JSONs. Tokens: the training tokens of each self-distillation stage's teacher pass
(stage 1 trained on 85k tokens of dataset responses, teacher-forced, drawn at 0).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

evals, out = sys.argv[1:-1], sys.argv[-1]


def mal(path: str, temperature: str) -> float:
    with open(path) as f:
        return json.load(f)["temperatures"][temperature]["overall"]["mean_acceptance_length"]


stages = [  # (name, self-distilled tokens so far, greedy MAL, T = 0.7 MAL)
    ("1: dataset answers", 0, 1.22, 1.26),
    ("3: own answers, 3-step unroll", 191_661, 1.35, 1.36),
    ("4: +1,000 prompts", 191_661 + 188_333, 1.39, 1.39),
    ("5: +2,000 prompts", 191_661 + 188_333 + 369_331, 1.42, 1.45),
]
later = [  # (name, this stage's teacher-pass tokens)
    ("6: +2,000 prompts (500 summaries)", 405_350),
    ("7: +2,000 prompts (200 summaries)", 390_758),
    ("8: +2,300 prompts, fused features", 434_607),
    ("9: +1,975 prompts", 376_929),
]
for path, (name, new_tokens) in zip(evals, later):
    stages.append((name, stages[-1][1] + new_tokens, mal(path, "0.0"), mal(path, "0.7")))
tokens = [s[1] / 1e3 for s in stages]
fig, ax = plt.subplots(figsize=(7, 4.2))
ax.plot(tokens, [s[2] for s in stages], "o-", label="greedy")
ax.plot(tokens, [s[3] for s in stages], "s--", label="T = 0.7")
for s, x in zip(stages, tokens, strict=True):  # the stage's number at its point, what it added in a box
    ax.annotate(s[0].split(":")[0], (x, s[2]), textcoords="offset points", xytext=(0, -13), fontsize=8, ha="center")
ax.text(0.02, 0.97, "\n".join(s[0] for s in stages), transform=ax.transAxes, va="top", fontsize=7,
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.8"})
ax.axhline(2.0, color="grey", lw=0.8, ls=":")
ax.text(tokens[-1], 2.0, "target 2.0 ", va="bottom", ha="right", fontsize=8, color="grey")
ax.set_xlabel("self-distilled training tokens (thousands)")
ax.set_ylabel("Spec-Bench mean acceptance length (k = 5)")
ax.set_title("Shipped EAGLE head by stage (SmolLM2-135M, 2-core CPU)")
ax.set_ylim(1.0, 2.1)
ax.legend(loc="lower right")
fig.tight_layout()
fig.savefig(out, dpi=120)
print(f"wrote {out}")
