"""Data files the package's own commands read, shipped inside it so that they work from a fresh install.

- `SPEC_BENCH_QUESTIONS`: Spec-Bench (480 prompts; the benchmarks' and `distill --eval-only`'s prompts).
  Evaluation only: `specserve distill` refuses it as training data.
- `TINY_SHAKESPEARE`: Tiny Shakespeare, plain text (the online-distillation demo's traffic).

Origins and licences are in README.md beside these files. Knows nothing of what reads them.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SPEC_BENCH_QUESTIONS = DATA_DIR / "spec_bench_question.jsonl"
TINY_SHAKESPEARE = DATA_DIR / "tinyshakespeare.txt"
