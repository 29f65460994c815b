"""Logit-level distillation losses: how far the student's next-token distribution is from the teacher's.

Every loss compares, row by row, the teacher distribution p and the student distribution q, both
taken at temperature T (p = softmax(teacher_logits / T), q = softmax(student_logits / T)). The
named divergences return one value per row; `distill_loss` averages them and mixes in cross-entropy.

The teacher comes either as full logits (`[..., vocab]`) or as a sparse top-m (`TopM`: ids and
log-probabilities of its m most likely tokens, as an offline teacher cache would store them).
A top-m teacher is renormalised over its m tokens: p_i = exp(l_i / T) / sum_{j in S} exp(l_j / T)
for i in the support S, p_i = 0 outside. The student stays a full-vocabulary distribution, so the
mass it puts outside S, q_rest = sum_{i not in S} q_i, is penalised exactly:

- forward KL: tokens outside S contribute 0 (p_i = 0), so the sum over S is exact;
- total variation: they contribute 1/2 q_rest;
- JSD(beta): they contribute (1 - beta) q_rest log(1 / (1 - beta));
- reverse KL is infinite as soon as q_rest > 0, so with a top-m teacher it becomes the reverse KL
  between the student renormalised over S and p, plus -log(1 - q_rest) (the forward KL of the two-way
  split "in S / not in S", which drives q_rest to 0). Both terms vanish only when q = p.

With m = vocab every formula is the full one. Knows nothing about models, batches or positions:
callers pick the rows (response positions) and pass them flat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("fkl", "rkl", "jsd", "tv")


@dataclass(frozen=True)
class TopM:
    """A sparse teacher: its m most likely tokens per row."""

    ids: torch.Tensor  # [rows, m] int64, distinct within a row
    logprobs: torch.Tensor  # [rows, m] log-probabilities (any constant offset per row: they are renormalised)

    @staticmethod
    def from_logits(logits: torch.Tensor, m: int) -> TopM:  # logits: [rows, vocab]
        logprobs, ids = torch.log_softmax(logits.float(), dim=-1).topk(m, dim=-1)
        return TopM(ids, logprobs)


Teacher = torch.Tensor | TopM


def _on_support(
    student_logits: torch.Tensor,  # [rows, vocab]
    teacher: Teacher,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p and log q on the teacher's support S ([rows, m]) and log q_rest ([rows]; -inf when S is everything)."""
    s = student_logits.float() / temperature
    log_q_full = torch.log_softmax(s, dim=-1)  # [rows, vocab]
    if isinstance(teacher, TopM):
        log_p = torch.log_softmax(teacher.logprobs.float() / temperature, dim=-1)  # [rows, m]
        log_q = log_q_full.gather(-1, teacher.ids)  # [rows, m]
        outside = s.scatter(-1, teacher.ids, float("-inf"))  # [rows, vocab]
        log_q_rest = torch.logsumexp(outside, dim=-1) - torch.logsumexp(s, dim=-1)  # [rows]
        return log_p, log_q, log_q_rest
    if teacher.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher.shape)} and student logits "
            f"{tuple(student_logits.shape)} must have the same shape"
        )
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    return log_p, log_q_full, torch.full(log_p.shape[:-1], float("-inf"), device=log_p.device)


def forward_kl(student_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) = sum_i p_i (log p_i - log q_i), per row. Mass-covering: the student must cover the teacher."""
    log_p, log_q, _ = _on_support(student_logits, teacher, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def reverse_kl(student_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0) -> torch.Tensor:
    """KL(q || p) = sum_i q_i (log q_i - log p_i), per row. Mode-seeking: the student may drop teacher modes.

    With a top-m teacher: KL(q_S || p) - log q(S), q_S = q renormalised over the support S, q(S) = 1 - q_rest
    (see the module docstring).
    """
    log_p, log_q, _ = _on_support(student_logits, teacher, temperature)
    if not isinstance(teacher, TopM):
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_mass = torch.logsumexp(log_q, dim=-1)  # [rows] log q(S)
    log_q_s = log_q - log_mass[..., None]
    return (log_q_s.exp() * (log_q_s - log_p)).sum(-1) - log_mass


def jsd(student_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), per row:

    JSD(beta) = beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q,  0 < beta < 1.

    beta = 0.5 is the symmetric JSD (bounded by log 2); its gradients approach forward KL's as beta -> 0
    and reverse KL's as beta -> 1.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta!r}")
    log_p, log_q, log_q_rest = _on_support(student_logits, teacher, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    rest = log_q_rest.exp() * -math.log(1.0 - beta)  # outside S: m = (1 - beta) q
    return beta * kl_p + (1.0 - beta) * (kl_q + rest)


def total_variation(student_logits: torch.Tensor, teacher: Teacher, temperature: float = 1.0) -> torch.Tensor:
    """TV(p, q) = 1/2 sum_i |p_i - q_i|, per row; in [0, 1].

    1 - TV is the probability that speculative sampling accepts a draft token (Leviathan et al. 2023),
    so minimising TV maximises acceptance directly (DistillSpec, Zhou et al. 2024).
    """
    log_p, log_q, log_q_rest = _on_support(student_logits, teacher, temperature)
    return 0.5 * ((log_p.exp() - log_q.exp()).abs().sum(-1) + log_q_rest.exp())


def distill_loss(
    student_logits: torch.Tensor,  # [rows, vocab]
    teacher: Teacher,  # [rows, vocab] logits, or TopM with [rows, m] fields
    loss: str = "fkl",
    temperature: float = 1.0,
    beta: float = 0.5,
    labels: torch.Tensor | None = None,  # [rows] int64 hard targets (the teacher's sampled tokens)
    hard_label_weight: float = 0.0,
    weights: torch.Tensor | None = None,  # [rows] >= 0: per-row weights of the mean (None: all 1)
) -> torch.Tensor:  # scalar
    """Mean over rows of (1 - w) D(p, q) + w CE(labels, softmax(student_logits)), w = hard_label_weight.

    D is one of LOSSES at `temperature`; the cross-entropy is at temperature 1. w = 0 is pure logit
    distillation, w = 1 pure sequence-level distillation (next-token loss on the teacher's outputs).
    The divergence is not rescaled by T^2. With `weights` the mean is sum_r weights_r x_r / sum_r weights_r
    (online distillation weights the positions where the draft was rejected more).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= hard_label_weight <= 1.0:
        raise ValueError(f"hard_label_weight must be in [0, 1], got {hard_label_weight!r}")
    if weights is not None and weights.shape != student_logits.shape[:1]:
        raise ValueError(f"weights {tuple(weights.shape)} must have one entry per row of {tuple(student_logits.shape)}")
    total = student_logits.new_zeros(())
    if hard_label_weight < 1.0:
        if loss == "fkl":
            d = forward_kl(student_logits, teacher, temperature)
        elif loss == "rkl":
            d = reverse_kl(student_logits, teacher, temperature)
        elif loss == "jsd":
            d = jsd(student_logits, teacher, temperature, beta)
        else:
            d = total_variation(student_logits, teacher, temperature)
        d = d.mean() if weights is None else (weights * d).sum() / weights.sum()
        total = total + (1.0 - hard_label_weight) * d
    if hard_label_weight > 0.0:
        if labels is None:
            raise ValueError("hard_label_weight > 0 needs labels")
        if weights is None:
            ce = F.cross_entropy(student_logits.float(), labels)
        else:
            ce = (weights * F.cross_entropy(student_logits.float(), labels, reduction="none")).sum() / weights.sum()
        total = total + hard_label_weight * ce
    return total
