"""Traffic records as the online trainer's examples: the held-out split, the rows a draft learns from, batches.

A record's output position j is predicted by the draft at the position of the token before it, so an example is the
token sequence prompt + output without its last token, left-truncated to `max_seq_tokens`, and the rows (one per kept
output position) with the verifier's logged top-m and a loss weight: `w_rejected` where the draft was rejected, 1
elsewhere. `collate` pads examples into one batch for a standalone draft (an HF causal LM); the EAGLE path packs them
itself (eagle_student). Knows nothing about optimizers, evaluation or the registry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from specserve.distill.losses import TopM

if TYPE_CHECKING:
    from specserve.traffic.record import TrafficRecord


@dataclass
class Example:
    """One record made ready for the student: its token sequence and the rows where the loss is taken."""

    record_id: int
    input_ids: torch.Tensor  # [seq] int64: prompt + output without its last token, left-truncated
    first_row: int  # index in input_ids of the position predicting the first kept output token
    topm_ids: torch.Tensor  # [rows, m] int64: the verifier's top-m at each kept output position
    topm_logprobs: torch.Tensor  # [rows, m] float32
    weights: torch.Tensor  # [rows] float32: w_rejected where the draft was rejected, else 1
    num_output_tokens: int

    @property
    def rows(self) -> int:
        return self.topm_ids.shape[0]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq]
    attention_mask: torch.Tensor  # [batch, seq]
    rows: torch.Tensor  # [batch, seq] bool: positions predicting a kept output token
    teacher: TopM  # [rows, m] fields, rows in the order of `rows` (row-major)
    weights: torch.Tensor  # [rows]


def is_heldout(record_id: int, fraction: float) -> bool:
    """Whether a record belongs to the held-out share: a hash of its id, so the same on every run."""
    h = int.from_bytes(hashlib.sha256(f"heldout:{record_id}".encode()).digest()[:8], "big")
    return h < fraction * 2.0**64


def rejected_positions(steps: list[tuple[str, int, int]], num_output_tokens: int) -> list[int]:
    """Output positions where a draft-model proposal was rejected.

    A step emits its accepted tokens and one more (recovered or bonus); one that proposed k draft tokens and
    accepted a < k was rejected at its (a + 1)-th emitted token. N-gram proposals are not the draft's: not counted.
    """
    out, position = [], 0
    for source, k, accepted in steps:
        if source == "draft" and accepted < k and position + accepted < num_output_tokens:
            out.append(position + accepted)
        position += accepted + 1
    return out


def prepare(record: TrafficRecord, max_seq_tokens: int, w_rejected: float) -> Example | None:
    """The record as a training/evaluation example; None when no output position remains to learn from."""
    prompt, output = record.prompt_token_ids, record.output_token_ids
    n = len(output)
    tokens = (prompt + output)[:-1]  # the last output token predicts nothing
    cut = max(0, len(tokens) - max_seq_tokens)
    first_row = len(prompt) - 1 - cut  # row j (output token j) sits at first_row + j
    skip = max(0, -first_row)  # output tokens whose predicting position was cut (or had no prompt before it)
    if skip >= n:
        return None
    weights = torch.ones(n)
    weights[rejected_positions(record.steps, n)] = w_rejected
    return Example(
        record_id=record.record_id,
        input_ids=torch.tensor(tokens[cut:], dtype=torch.int64),
        first_row=first_row + skip,
        topm_ids=record.topm_ids[skip:].long(),
        topm_logprobs=record.topm_logprobs[skip:].float(),
        weights=weights[skip:],
        num_output_tokens=n,
    )


def collate(examples: list[Example], device: torch.device) -> Batch:
    """Right-padded sequences; every example's top-m cut to the batch's smallest m (they are sorted, best first)."""
    m = min(e.topm_ids.shape[1] for e in examples)
    width = max(e.input_ids.numel() for e in examples)
    input_ids = torch.zeros(len(examples), width, dtype=torch.int64)
    attention_mask = torch.zeros(len(examples), width, dtype=torch.int64)
    rows = torch.zeros(len(examples), width, dtype=torch.bool)
    for i, e in enumerate(examples):
        input_ids[i, : e.input_ids.numel()] = e.input_ids
        attention_mask[i, : e.input_ids.numel()] = 1
        rows[i, e.first_row : e.first_row + e.rows] = True
    teacher = TopM(
        torch.cat([e.topm_ids[:, :m] for e in examples]), torch.cat([e.topm_logprobs[:, :m] for e in examples])
    )
    return Batch(
        input_ids.to(device),
        attention_mask.to(device),
        rows.to(device),
        TopM(teacher.ids.to(device), teacher.logprobs.to(device)),
        torch.cat([e.weights for e in examples]).to(device),
    )


def chunks(examples: list[Example], max_rows: int) -> list[list[Example]]:
    """Consecutive groups of examples with at most `max_rows` rows each (an example alone may reach it)."""
    out: list[list[Example]] = []
    rows = 0
    for e in examples:
        if not out or rows + e.rows > max_rows:
            out.append([])
            rows = 0
        out[-1].append(e)
        rows += e.rows
    return out
