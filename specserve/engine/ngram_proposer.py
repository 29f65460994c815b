"""NgramProposer: prompt lookup. Propose the tokens that followed the latest earlier occurrence of
the context's last n tokens (n from `max_n` down to `min_n`) in the request's own prompt and output.

No model runs: the proposal is deterministic, so for the rejection sampler it is a one-hot draft
(q(x) = 1 at the proposed token), which keeps sampled output exactly the verifier's distribution.
The lookup runs at scheduling time (the speculation-length policy prices the match); `propose`
hands back the tokens the choice already carries.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from specserve.engine.proposal import Proposal, ProposeItem


class NgramProposer:
    recompute_accepted = False  # no KV of its own
    reads_verifier_features = False

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, items: list[ProposeItem]) -> Proposal:
        """The tokens each choice found at scheduling time, as one-hot drafts (probs None)."""
        max_k = max(choice.k for _, choice, _ in items)
        ids = torch.full((len(items), max_k), -1, dtype=torch.int64)  # [batch, max_k]
        for i, (_, choice, _) in enumerate(items):
            ids[i, : choice.k] = torch.tensor(choice.token_ids[: choice.k])
        return Proposal(ids, None)

    def lookup(self, token_ids: list[int], k: int) -> tuple[list[int], int]:
        """Up to k tokens continuing `token_ids`, and the length n of the match they follow;
        ([], 0) when no n-gram of the tail recurs."""
        if k <= 0 or len(token_ids) <= self.min_n:
            return [], 0
        arr = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(arr) - 1), self.min_n - 1, -1):
            tail = arr[-n:]
            # windows starting at 0 .. len - n - 1: every earlier occurrence, not the tail itself
            windows = sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start : start + k].tolist(), n
        return [], 0
