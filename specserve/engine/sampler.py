"""Sampler: logits to the probabilities requests sample from, and the random draws they use.

Temperature, top-k and top-p turn a row of logits into the distribution the request samples
from; the rejection sampler in `specserve/kernels/` then draws tokens from it (for plain decoding it is
the same kernel with zero draft tokens). Randomness comes from each request's own generator, so
a seeded request is reproducible whatever it is batched with. Knows nothing about models or KV.
"""

from __future__ import annotations

import torch

from specserve.sampling_params import SamplingParams


def sampling_probs(
    logits: torch.Tensor,  # [rows, vocab] fp32
    params: list[SamplingParams],  # one per row
) -> torch.Tensor:  # [rows, vocab] fp32
    """The distribution each row samples from. Greedy rows get softmax(logits): same argmax."""
    dev = logits.device
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], dtype=torch.float32, device=dev)
    logits = logits / temps[:, None]
    top_ks = [p.top_k for p in params]
    if any(k > 0 for k in top_ks):
        vocab = logits.shape[-1]
        k = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_ks], device=dev)
        sorted_logits = logits.sort(dim=-1, descending=True).values
        kth = sorted_logits.gather(1, (k - 1)[:, None])  # [rows, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    top_ps = [p.top_p for p in params]
    if any(p < 1.0 for p in top_ps):
        top_p = torch.tensor(top_ps, dtype=torch.float32, device=dev)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop = mass_before >= top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw_uniform(generators: list[torch.Generator], ks: list[int]) -> torch.Tensor:  # [batch, max k]
    """U(0, 1) acceptance draws: exactly k_i from request i's generator (the rest pad), so what a
    seeded request draws does not depend on what it is batched with."""
    out = torch.ones(len(generators), max(ks, default=0))
    for i, (g, k) in enumerate(zip(generators, ks)):
        if k:
            out[i, :k].uniform_(generator=g)
    return out


def draw_exponential(generators: list[torch.Generator], vocab: int, greedy: list[bool]) -> torch.Tensor:
    """Exp(1) noise for the exponential race [batch, vocab]; greedy rows don't consume randomness."""
    out = torch.ones(len(generators), vocab)
    for i, g in enumerate(generators):
        if not greedy[i]:
            out[i].exponential_(generator=g)
    # float32 exponential_ can return exactly 0, which would hand its token the race whatever its weight
    return out.clamp_min_(torch.finfo(torch.float32).tiny)
