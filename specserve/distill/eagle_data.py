"""EAGLE training data: chat sequences and what the verifier computes over them, teacher-forced.

A sequence is a chat-templated user prompt followed by a response: either the dataset's own
(ShareGPT's first assistant turn, GSM8K's answer, a plain-text chunk's second half) or the verifier's
answer generated through our engine. One teacher pass of the verifier (our model code, batched)
gives, at every position i, its feature f_i (last layer output, before the final norm: what the
engine hands an EAGLE head) and its top-m log-probabilities for token i + 1. Both are kept in memory
compactly (bf16 features, int32 ids, fp16 log-probs), so training epochs never rerun the verifier.
`verifier_batches` is that pass without the top-m (the online trainer recomputes features with it).
`teacher_data` makes an EAGLE run's data (generating the verifier's answers through specserve.LLM when asked)
and keeps it on disk (`save_teacher_data` / `load_teacher_data`) for reruns and resumed runs.
Knows nothing about the head or the optimiser.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from specserve.distill.data import check_not_eval_only, prompt_of, read_text
from specserve.engine.model_runner import ModelRunner, TokenRun
from specserve.model.eagle import verifier_fingerprint
from specserve.model.llama import LlamaModel

ASSISTANT_ROLES = ("gpt", "assistant", "bard", "chatgpt")


@dataclass
class TeacherSequence:
    token_ids: torch.Tensor  # [T] int64
    features: torch.Tensor  # [T, width] bf16: f_i, the verifier's last-layer output at position i (after the
    # inputs of its feature_layers, where the run reads those: EAGLE-3's fused features)
    topm_ids: torch.Tensor  # [T, m] int32: the verifier's m most likely next tokens after position i
    topm_logprobs: torch.Tensor  # [T, m] fp16: their log-probabilities (temperature 1)
    num_prompt_tokens: int


def _first_reply(messages: list) -> tuple[str, str] | None:
    user = None
    for m in messages:
        if not isinstance(m, dict):
            continue
        role, text = m.get("from", m.get("role")), m.get("value", m.get("content"))
        if not isinstance(text, str) or not text.strip():
            continue
        if user is None and role in ("human", "user"):
            user = text
        elif user is not None and role in ASSISTANT_ROLES:
            return user, text
    return None


def _pair_of(record: dict) -> tuple[str, str] | None:
    for key in ("conversations", "messages"):
        if isinstance(record.get(key), list):
            return _first_reply(record[key])
    prompt = prompt_of(record)
    for key in ("answer", "response", "output", "completion"):
        if prompt and isinstance(record.get(key), str) and record[key].strip():
            return prompt, record[key]
    return None


def read_pairs(path: str, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs a file holds: JSONL records, a ShareGPT JSON array, or plain-text chunks."""
    check_not_eval_only(path)
    pairs: list[tuple[str, str]] = []
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if limit is not None and len(pairs) >= limit:
                    break
                if line.strip():
                    pair = _pair_of(json.loads(line))
                    if pair:
                        pairs.append(pair)
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            s = f.read()
        decoder, i = json.JSONDecoder(), s.find("[") + 1
        while i > 0 and (limit is None or len(pairs) < limit):
            while i < len(s) and s[i] in " \t\r\n,":
                i += 1
            if i >= len(s) or s[i] == "]":
                break
            try:
                record, i = decoder.raw_decode(s, i)
            except json.JSONDecodeError:
                break  # a truncated tail: keep the whole conversations before it
            pair = _pair_of(record) if isinstance(record, dict) else None
            if pair:
                pairs.append(pair)
    else:
        for chunk in read_text(path, limit):
            cut = len(chunk) // 3
            pairs.append((f"Continue this text:\n\n{chunk[:cut]}", chunk[cut:]))
    if not pairs:
        raise ValueError(f"{path}: found no (prompt, response) pairs")
    return pairs


def load_pairs(paths: list[str], limit: int | None = None) -> list[tuple[str, str]]:
    """Pairs of all files, interleaved file by file, at most `limit`."""
    per_file = [read_pairs(p, limit) for p in paths]
    mixed = [f[i] for i in range(max(map(len, per_file), default=0)) for f in per_file if i < len(f)]
    return mixed[:limit] if limit is not None else mixed


def template_pairs(
    tokenizer, pairs: list[tuple[str, str]], max_tokens: int, min_response: int = 4
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids with the generation prompt, response ids ending in EOS), cut to max_tokens in all."""
    out = []
    for prompt, response in pairs:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        p = tokenizer(text, add_special_tokens=False)["input_ids"][-(max_tokens // 2) :]
        r = tokenizer(response, add_special_tokens=False)["input_ids"] if response else []
        if r and tokenizer.eos_token_id is not None:
            r = r + [tokenizer.eos_token_id]
        r = r[: max_tokens - len(p)]
        if len(r) >= min_response:
            out.append((p, r))
    return out


@torch.inference_mode()
def verifier_batches(
    verifier: LlamaModel,
    sequences: list[list[int]],
    max_batch_tokens: int = 2048,
    logits: bool = True,
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """The verifier teacher-forced over every sequence, batched up to max_batch_tokens (a longer one alone).

    Yields per batch (indices of its sequences, their features [tokens, hidden] concatenated in that order, their
    logits [tokens, vocab] fp32 or None). Each feature f_i is the last layer's output at position i, before the
    final norm; with logits=False the output layer is not run at all (a caller with its own targets).
    """
    block = 16
    longest = max(map(len, sequences))
    num_blocks = -(-max(longest, max_batch_tokens) // block) + len(sequences[:64]) + 1
    runner = ModelRunner(verifier, num_blocks, block)
    i = 0
    while i < len(sequences):
        batch, tokens, next_block = [], 0, 0
        while i < len(sequences) and (not batch or tokens + len(sequences[i]) <= max_batch_tokens):
            n = len(sequences[i])
            nb = -(-n // block)
            batch.append((i, TokenRun(sequences[i], 0, list(range(next_block, next_block + nb)), n if logits else 0)))
            next_block += nb
            tokens += n
            i += 1
        if next_block > num_blocks:  # one long batch: grow the pool
            runner = ModelRunner(verifier, next_block, block)
        out = runner.run([run for _, run in batch], keep_features=True)  # logits: [tokens, vocab], or [0, vocab]
        yield [idx for idx, _ in batch], out.features, out.logits if logits else None


@torch.inference_mode()
def teacher_pass(
    verifier: LlamaModel,
    sequences: list[list[int]],
    prompt_lens: list[int],
    top_m: int,
    max_batch_tokens: int = 2048,
    progress: bool = True,
) -> list[TeacherSequence]:
    """The verifier over every sequence (batched up to max_batch_tokens): features and top-m per position."""
    out: list[TeacherSequence] = []
    bar = tqdm(total=sum(map(len, sequences)), desc="teacher pass", unit="tok", disable=not progress)
    for indices, features, logits in verifier_batches(verifier, sequences, max_batch_tokens):
        feats = features.to(torch.bfloat16).cpu()
        top = torch.topk(torch.log_softmax(logits.float(), dim=-1), top_m, dim=-1)
        row = 0
        for idx in indices:
            n = len(sequences[idx])
            out.append(
                TeacherSequence(
                    token_ids=torch.tensor(sequences[idx]),
                    features=feats[row : row + n].clone(),
                    topm_ids=top.indices[row : row + n].to(torch.int32).cpu(),
                    topm_logprobs=top.values[row : row + n].to(torch.float16).cpu(),
                    num_prompt_tokens=prompt_lens[idx],
                )
            )
            row += n
        bar.update(row)
    bar.close()
    return out


def draft_vocabulary(data: list[TeacherSequence], size: int, always: set[int], vocab: int) -> torch.Tensor:
    """The `size` tokens the verifier most often predicts or emits in `data` (plus `always`), sorted."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for s in data:
        counts += torch.bincount(s.topm_ids[:, 0].long(), minlength=vocab).double()
        counts += torch.bincount(s.token_ids, minlength=vocab).double()
    for t in always:
        counts[t] = float("inf")
    return torch.topk(counts, min(size, vocab)).indices.sort().values


def save_teacher_data(path: str, data: list[TeacherSequence], key: dict) -> None:
    """The teacher pass's output, with the settings that made it (`key`), so a rerun or --resume skips it."""
    tmp = path + ".tmp"
    torch.save({"key": key, "sequences": [vars(s) for s in data]}, tmp)
    os.replace(tmp, path)


def load_teacher_data(path: str, key: dict) -> list[TeacherSequence] | None:
    """What save_teacher_data wrote, if it was made with the same settings; else None."""
    if not os.path.exists(path):
        return None
    saved = torch.load(path, weights_only=True)
    if saved.get("key") != key:
        return None
    return [TeacherSequence(**s) for s in saved["sequences"]]


def _sequences(config, verifier_dir: str, tokenizer, rank: int, world: int) -> tuple[list, list]:
    if config.responses == "dataset":
        pairs = load_pairs(list(config.data), config.max_sequences)
        templated = template_pairs(tokenizer, pairs, config.max_tokens)[rank::world]
    else:  # prompts only (any prompt file the standalone distiller reads); the verifier answers them
        from specserve import LLM
        from specserve.config import CacheConfig, SchedulerConfig
        from specserve.distill.data import generate_targets, load_prompts

        pairs = [(p, "") for p in load_prompts(list(config.data), config.max_sequences)]
        templated = [(p, []) for p, _ in template_pairs(tokenizer, pairs, config.max_tokens, min_response=0)]
        templated = templated[rank::world]

        running = 32
        llm = LLM(
            verifier_dir,
            dtype=config.teacher_dtype,
            device=str(config.device or "cpu"),
            cache=CacheConfig(block_size=16, num_blocks=2 * running * (config.max_tokens // 16 + 2)),
            scheduler=SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=2048),
        )
        prompts = [p for p, _ in templated]
        # many prompts per call: the engine's continuous batching refills a finished row at once
        examples = generate_targets(
            llm, prompts, config.max_new_tokens, 8 * running, progress=config.progress and rank == 0
        )
        templated = [(e.prompt_ids, e.response_ids) for e in examples if len(e.response_ids) >= 4]
        del llm
    return [p + r for p, r in templated], [len(p) for p, _ in templated]


def teacher_data(
    config, verifier: LlamaModel, verifier_dir: str, tokenizer, rank: int, world: int
) -> list[TeacherSequence]:
    """This rank's sequences (config: an EagleConfig) with the verifier's features and top-m: from the output
    directory when a run with the same data settings left them there, else made (and left there)."""
    keys = ("responses", "max_sequences", "max_tokens", "max_new_tokens", "teacher_top_m", "teacher_dtype")
    key = {
        "data": [os.path.abspath(p) for p in config.data],
        **{k: getattr(config, k) for k in keys},
        "verifier": verifier_fingerprint(verifier_dir),
        "rank": rank,
        "world": world,
        # only where set, so the data of runs before fused features still matches
        **({"feature_layers": list(verifier.feature_layers)} if verifier.feature_layers else {}),
    }
    path = os.path.join(config.out, "teacher_data.pt" if world == 1 else f"teacher_data.rank{rank}.pt")
    data = load_teacher_data(path, key)
    if data is not None:
        if rank == 0:
            print(f"specserve: teacher data of {len(data)} sequences from {path}", flush=True)
        return data
    seqs, prompt_lens = _sequences(config, verifier_dir, tokenizer, rank, world)
    data = teacher_pass(verifier, seqs, prompt_lens, config.teacher_top_m, progress=config.progress and rank == 0)
    os.makedirs(config.out, exist_ok=True)
    save_teacher_data(path, data, key)
    return data
