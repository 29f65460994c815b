"""Spec-Bench prompts for the benchmarks and held-out evaluation: first turns, chat-templated, N per category,
chosen deterministically.

Knows the file's layout and the category grouping (MT-Bench's eight sub-categories count as one,
"mt_bench"). Knows nothing about models beyond the tokenizer that applies the chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from specserve.data import SPEC_BENCH_QUESTIONS

DEFAULT_PROMPTS_FILE = str(SPEC_BENCH_QUESTIONS)  # shipped in the package (specserve/data)
MT_BENCH_SUBCATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")


@dataclass(frozen=True)
class BenchPrompt:
    question_id: int
    category: str
    """One of CATEGORIES."""
    subcategory: str
    """The file's own category (an MT-Bench sub-category, or the same as `category`)."""
    text: str
    """The first turn with the verifier's chat template applied (generation prompt included)."""
    token_ids: list[int]


def category_of(subcategory: str) -> str:
    if subcategory in MT_BENCH_SUBCATEGORIES:
        return "mt_bench"
    if subcategory in CATEGORIES:
        return subcategory
    raise ValueError(
        f"unknown Spec-Bench category {subcategory!r}; expected one of {CATEGORIES} or an MT-Bench "
        f"sub-category {MT_BENCH_SUBCATEGORIES}"
    )


def load_questions(path: str = DEFAULT_PROMPTS_FILE) -> list[dict]:
    """The file's records in file order: question_id, category, turns[, reference]."""
    if not Path(path).exists():
        raise ValueError(f"Spec-Bench prompts file {path!r} does not exist; pass --prompts-file")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def select(
    questions: list[dict], per_category: int, categories: list[str] | tuple[str, ...] = CATEGORIES
) -> list[dict]:
    """`per_category` questions per category, evenly spaced through it (so MT-Bench's sub-categories are
    spread), then interleaved round-robin across categories so drift during a run hits every category alike."""
    by_category: dict[str, list[dict]] = {c: [] for c in categories}
    for q in questions:
        c = category_of(q["category"])
        if c in by_category:
            by_category[c].append(q)
    picked = []
    for c, qs in by_category.items():
        if len(qs) < per_category:
            raise ValueError(f"category {c!r} has {len(qs)} questions, fewer than the {per_category} asked for")
        picked.append([qs[i * len(qs) // per_category] for i in range(per_category)])
    return [qs[i] for i in range(per_category) for qs in picked]


def load_prompts(
    tokenizer,
    per_category: int,
    categories: list[str] | tuple[str, ...] = CATEGORIES,
    path: str = DEFAULT_PROMPTS_FILE,
) -> list[BenchPrompt]:
    """The selected questions' first turns as chat prompts, tokenized once (the template adds the special tokens)."""
    prompts = []
    for q in select(load_questions(path), per_category, categories):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q["turns"][0]}], tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(BenchPrompt(q["question_id"], category_of(q["category"]), q["category"], text, ids))
    return prompts
