"""Held-out evaluation of a draft on logged traffic: its expected acceptance and greedy agreement.

Expected acceptance at one position is sum_{x in S} min(p(x), q(x)): S the logged top-m, p the verifier's logged
probabilities *not* renormalised, q the draft's full softmax (temperature 1). Speculative sampling accepts a draft
token with probability sum_x min(p(x), q(x)) over the whole vocabulary; restricted to S the sum is a lower bound,
short by at most the unlogged mass 1 - p(S) whichever draft is measured. Renormalising p over S would
give it mass the verifier does not have, so a draft that matched the renormalised p could be credited with
acceptance it never gets. A slice's value is the mean over all its positions. Greedy agreement is the share of
positions where the draft's argmax is the verifier's logged top-1.

`evaluate` measures a standalone draft (an HF causal LM); an EAGLE head is measured the same way by
`eagle_student.EagleStudent.evaluate`. Knows nothing about training or publishing.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from specserve.distill.losses import TopM
from specserve.distill.trainer import RowLogits
from specserve.online.examples import Example, chunks, collate


def expected_acceptance(
    draft_logits: torch.Tensor,  # [rows, vocab]
    teacher: TopM,  # [rows, m]: the verifier's logged top-m
) -> torch.Tensor:  # [rows]
    """sum over the logged top-m of min(p, q): p the logged probabilities (not renormalised), q = softmax(logits)."""
    q = torch.softmax(draft_logits.float(), dim=-1).gather(-1, teacher.ids)  # [rows, m]
    return torch.minimum(teacher.logprobs.float().exp(), q).sum(-1)


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, examples: list[Example], max_rows: int, device: torch.device) -> dict:
    """Mean expected acceptance and greedy agreement (argmax q == the verifier's top-1) over all positions."""
    was_training = model.training
    model.eval()
    acceptance = agree = positions = 0.0
    for group in chunks(examples, max_rows):
        b = collate(group, device)
        logits = RowLogits(model)(b.input_ids, b.attention_mask, b.rows)  # [rows, vocab]
        acceptance += float(expected_acceptance(logits, b.teacher).sum())
        agree += float((logits.argmax(-1) == b.teacher.ids[:, 0]).sum())
        positions += logits.shape[0]
    model.train(was_training)
    return {
        "acceptance": acceptance / max(positions, 1),
        "greedy_agreement": agree / max(positions, 1),
        "positions": int(positions),
    }
