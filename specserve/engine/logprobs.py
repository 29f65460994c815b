"""Logprobs: the verifier's log-probabilities of the tokens a request emits (or of its prompt), and the top n.

The values are *raw* logprobs, vLLM's default (``logprobs_mode="raw_logprobs"``): log_softmax of the
verifier's logits at temperature 1, before temperature, top-k and top-p reshape the distribution a token
is drawn from. They come from the logits rows that verification computes anyway (row j of a request's
k + 1 rows is the distribution its j-th emitted token was drawn from), so speculation does not change
them: a token accepted from a draft reports the verifier's value, exactly as plain decoding would.
Prompt logprobs need the verifier's rows over prompt positions, which only requests asking for them
compute (``prompt_rows``). Knows nothing about tokenizers, wire formats or scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from specserve.engine.request import Request

ROWS_PER_PASS = 256
"""Rows log-softmaxed at once: bounds the temporary [rows, vocab] buffers of a long prompt's logprobs."""


@dataclass
class TokenLogprobs:
    """One position: the chosen token's raw logprob and rank, and the verifier's n most likely tokens."""

    token_id: int
    logprob: float
    rank: int
    """1 + how many tokens the verifier found strictly more likely."""
    top: list[tuple[int, float]]
    """(token id, logprob) of the n most likely tokens, most likely first (empty for n = 0)."""


def token_logprobs(
    logits: torch.Tensor,  # [rows, vocab] fp32 verifier logits
    token_ids: list[int],  # [rows]: the token whose logprob each row reports
    num_top: list[int],  # [rows]: n of each row's top-n
) -> list[TokenLogprobs]:
    """Raw logprobs of ``token_ids`` under each row, with each row's top ``num_top`` (one host copy per pass)."""
    assert logits.dim() == 2 and logits.shape[0] == len(token_ids) == len(num_top), (logits.shape, len(token_ids))
    out: list[TokenLogprobs] = []
    for lo in range(0, len(token_ids), ROWS_PER_PASS):
        hi = min(lo + ROWS_PER_PASS, len(token_ids))
        logprobs = torch.log_softmax(logits[lo:hi].float(), dim=-1)  # [pass rows, vocab]
        ids = torch.tensor(token_ids[lo:hi], dtype=torch.int64, device=logits.device)
        chosen = logprobs.gather(1, ids[:, None])  # [pass rows, 1]
        rank = (logprobs > chosen).sum(dim=-1) + 1  # [pass rows]
        top = logprobs.topk(min(max(num_top[lo:hi]), logprobs.shape[-1]), dim=-1)  # [pass rows, max n]
        chosen_l, rank_l = chosen[:, 0].tolist(), rank.tolist()
        top_ids, top_values = top.indices.tolist(), top.values.tolist()
        for i in range(hi - lo):
            n = num_top[lo + i]
            pairs = list(zip(top_ids[i][:n], top_values[i][:n]))
            out.append(TokenLogprobs(token_ids[lo + i], chosen_l[i], rank_l[i], pairs))
    return out


def prompt_rows(request: Request, start: int, num_tokens: int) -> int:
    """How many prompt logprobs still missing this run of ``num_tokens`` tokens from position ``start`` yields.

    Position q's row scores token q + 1, so prompt tokens 1 .. P - 1 need rows 0 .. P - 2 (token 0 has no
    logprob). The missing ones begin at the request's next unscored prompt token t (row t - 1), so they are
    a contiguous run of rows starting there; the run must then return logits from row t - 1 to its end.
    """
    if request.prompt_logprobs is None:
        return 0
    t = len(request.prompt_logprobs)
    m = min(start + num_tokens, request.num_prompt_tokens - 1) - t + 1
    if m <= 0:
        return 0
    # the prefix cache is skipped while rows are missing (Request.scores_prompt), so no computed run hides them
    assert t - 1 >= start, f"prompt logprobs from token {t} on are missing, but this run starts at {start}"
    return m
