"""Distillation data: prompts read from files, and the verifier's own responses to them.

Prompt files: JSONL (one record per line, the prompt in `turns[0]`, `question`, `prompt`, or the first
user turn of `conversations` / `messages`), ShareGPT JSON (a list of `{"conversations": [{"from", "value"}]}`;
decoded one element at a time so a file cut off mid-way still yields every whole conversation), or
plain text (split into chunks at blank lines). Every prompt is one user message; the verifier's chat
template turns it into token ids. Spec-Bench is for evaluation only and is refused.

`generate_targets` runs the verifier through our engine (greedy by default) and returns
(prompt ids, response ids) pairs: sequence-level distillation trains the draft on the teacher's outputs.
`traffic_examples` reads them from a server's traffic log instead, each with the verifier's logged top-m
distribution at every response position, so that no teacher forward is needed.
Knows nothing about students, losses or training.
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

if TYPE_CHECKING:
    import torch

EVAL_ONLY_SUFFIX = "spec_bench_question.jsonl"
USER_ROLES = ("human", "user")


@dataclass(frozen=True)
class Example:
    """One distillation sequence: the chat-templated prompt and the verifier's response to it."""

    prompt_ids: list[int]
    response_ids: list[int]
    teacher_ids: torch.Tensor | None = field(default=None, compare=False)
    """[response, m] int32: the verifier's m most likely tokens at the position predicting each response token,
    sorted most likely first, as the traffic log keeps them; None: the trainer runs the teacher."""
    teacher_logprobs: torch.Tensor | None = field(default=None, compare=False)
    """[response, m] their log-probabilities (temperature 1)."""


def check_not_eval_only(path: str) -> None:
    for p in (path, os.path.realpath(path)):
        if p.endswith(EVAL_ONLY_SUFFIX):
            raise ValueError(
                f"refusing to train on {path!r}: Spec-Bench ({EVAL_ONLY_SUFFIX}) is for evaluation only, or the "
                "acceptance it measures means nothing. Use e.g. gsm8k_train.jsonl, tinyshakespeare.txt or ShareGPT."
            )


def _first_user_turn(messages: list) -> str | None:
    for m in messages:
        if isinstance(m, dict):
            role = m.get("from", m.get("role"))
            text = m.get("value", m.get("content"))
            if role in USER_ROLES and isinstance(text, str):
                return text
    return None


def prompt_of(record: dict) -> str | None:
    """The user prompt a record holds, or None if it holds none."""
    turns = record.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    if isinstance(turns, str):
        return turns
    for key in ("question", "prompt", "instruction"):
        if isinstance(record.get(key), str):
            return record[key]
    for key in ("conversations", "messages"):
        if isinstance(record.get(key), list):
            return _first_user_turn(record[key])
    return None


def _keep(text: str | None) -> bool:
    return text is not None and bool(text.strip())


def read_jsonl(path: str, limit: int | None = None) -> list[str]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(prompts) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({e})") from e
            text = prompt_of(record) if isinstance(record, dict) else None
            if _keep(text):
                prompts.append(text)
    return prompts


def read_sharegpt(path: str, limit: int | None = None) -> list[str]:
    """First user turns of a JSON array of conversations, element by element; stops quietly at a truncated tail."""
    with open(path, encoding="utf-8") as f:
        s = f.read()
    i = s.find("[")
    if i < 0:
        raise ValueError(f"{path}: expected a JSON array of conversations (ShareGPT), found no '['")
    decoder = json.JSONDecoder()
    prompts: list[str] = []
    i += 1
    while limit is None or len(prompts) < limit:
        while i < len(s) and s[i] in " \t\r\n,":
            i += 1
        if i >= len(s) or s[i] == "]":
            break
        try:
            record, i = decoder.raw_decode(s, i)
        except json.JSONDecodeError:
            break  # the file is cut off inside this element: keep what came before
        text = prompt_of(record) if isinstance(record, dict) else None
        if _keep(text):
            prompts.append(text)
    return prompts


def read_text(path: str, limit: int | None = None, chunk_chars: int = 1000) -> list[str]:
    """Paragraphs (blank-line separated) packed greedily into chunks of up to `chunk_chars` characters."""
    with open(path, encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    chunks: list[str] = []
    current = ""
    for p in paragraphs:
        if limit is not None and len(chunks) >= limit:
            break
        if current and len(current) + 2 + len(p) > chunk_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{p}" if current else p[:chunk_chars]
    if current and (limit is None or len(chunks) < limit):
        chunks.append(current)
    return chunks


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """The prompts of one file (at most `limit`, from its start), by its format."""
    check_not_eval_only(path)
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    if path.endswith(".jsonl"):
        prompts = read_jsonl(path, limit)
    elif path.endswith(".json"):
        prompts = read_sharegpt(path, limit)
    else:
        prompts = read_text(path, limit)
    if not prompts:
        raise ValueError(
            f"{path}: no prompts found; JSONL records need 'turns', 'question', 'prompt' or 'conversations', "
            "JSON must be a ShareGPT list of conversations, other files are read as plain text"
        )
    return prompts


def load_prompts(paths: list[str], max_prompts: int | None = None) -> list[str]:
    """Prompts of all files, interleaved file by file (so a cap takes from each alike), at most `max_prompts`."""
    for p in paths:  # refuse before reading anything
        check_not_eval_only(p)
    per_file = [read_prompts(p, max_prompts) for p in paths]
    mixed = [f[i] for i in range(max(map(len, per_file), default=0)) for f in per_file if i < len(f)]
    return mixed[:max_prompts] if max_prompts is not None else mixed


def apply_chat_template(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Each prompt as one user message, templated with the generation prompt, as token ids."""
    out = []
    for p in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def generate_targets(
    llm,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    batch_size: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    max_prompt_tokens: int | None = None,
    progress: bool = True,
) -> list[Example]:
    """The verifier's responses (our engine, `llm` an `LLM`) to every prompt, `batch_size` prompts per call.

    Prompts longer than `max_prompt_tokens` keep their last tokens (the generation prompt is at the end).
    Responses include the EOS token when the verifier stopped on it, so the draft learns to end too.
    """
    from specserve.sampling_params import SamplingParams

    if max_prompt_tokens is not None:
        prompt_ids = [p[-max_prompt_tokens:] for p in prompt_ids]
    examples: list[Example] = []
    bar = tqdm(total=len(prompt_ids), desc="teacher responses", disable=not progress)
    for start in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[start : start + batch_size]
        params = [
            SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed + start + i)
            for i in range(len(batch))
        ]
        for p, c in zip(batch, llm.generate(batch, params)):
            if c.token_ids:
                examples.append(Example(list(p), list(c.token_ids)))
        bar.update(len(batch))
    bar.close()
    return examples


def traffic_examples(url: str, max_records: int | None, max_prompt_tokens: int, max_new_tokens: int) -> list[Example]:
    """The newest ``max_records`` records (None: all) of the traffic store ``url`` as examples with a logged teacher.

    Row i of a record's top-m arrays is the verifier's distribution where output token i was drawn,
    which is the loss row predicting response token i. Prompts keep their last ``max_prompt_tokens``
    tokens, responses (and their rows) their first ``max_new_tokens``; records without output are skipped.
    """
    from specserve.traffic import open_store
    from specserve.traffic.url import sqlite_path

    path = sqlite_path(url)
    if path is not None and not os.path.isfile(path):
        raise ValueError(f"no traffic store at {path}: pass the --traffic-store URL a server logs to")
    newest = deque(maxlen=max_records)
    with open_store(url) as store:
        after = 0
        while page := store.read(after, 1000):
            newest.extend(r for r in page if r.output_token_ids)
            after = page[-1].record_id
        name = store.name
    if not newest:
        raise ValueError(f"the traffic store {name} holds no records with generated tokens")
    return [
        Example(
            r.prompt_token_ids[-max_prompt_tokens:],
            r.output_token_ids[:max_new_tokens],
            r.topm_ids[:max_new_tokens],
            r.topm_logprobs[:max_new_tokens],
        )
        for r in newest
    ]


def check_vocabulary(examples: list[Example], vocab_size: int, source: str) -> None:
    """ValueError if any token id of ``examples`` is outside [0, vocab_size): they came from another model."""
    for i, e in enumerate(examples):
        ids = e.prompt_ids + e.response_ids
        lo, hi = min(ids), max(ids)
        if e.teacher_ids is not None and e.teacher_ids.numel():
            lo, hi = min(lo, int(e.teacher_ids.min())), max(hi, int(e.teacher_ids.max()))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"{source}: example {i} holds token id {lo if lo < 0 else hi}, outside the verifier's vocabulary of "
                f"{vocab_size}; was it logged by a server with another verifier?"
            )
