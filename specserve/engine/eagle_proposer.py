"""EagleProposer: an EAGLE head catches up on the verifier's features and proposes k tokens per request.

The head's input at position i is (token x_i, the verifier's feature f_{i-1}). After a verification
step the engine hands each request the features of its newly committed positions (rows the verifier
computed anyway); the head catches up on every position it has not seen with those true features,
which yields its prediction for the first draft token, then drafts further tokens on its own
predicted features. Its KV for draft positions was built from predicted features, so after
verification the head recomputes the accepted ones from the true features (one batched forward over
a few tokens): the engine sets the head's counter back to the request's committed length.

Where a true feature is unavailable (position 0, or a prefix-cache hit whose draft KV was not kept)
the head reads zeros: proposals get worse there, outputs cannot change. Batched like DraftProposer,
whose sampling (the request's own temperature/top-k/top-p and generator) it shares.
"""

from __future__ import annotations

import torch

from specserve.engine.model_runner import ForwardOutput
from specserve.engine.proposal import ProposeItem
from specserve.engine.proposer import DraftProposer
from specserve.engine.request import Request


def feature_rows(request: Request, first: int, last: int, width: int, device) -> torch.Tensor:
    """The request's verifier features for positions first..last (inclusive); zeros where unknown."""
    out = torch.zeros(max(0, last - first + 1), width, device=device)  # [rows, width]
    f, start = request.features, request.features_start
    if f is None or out.shape[0] == 0:
        return out
    lo, hi = max(first, start), min(last, start + f.shape[0] - 1)
    if lo <= hi:
        out[lo - first : hi - first + 1] = f[lo - start : hi - start + 1].to(device=device, dtype=out.dtype)
    return out


class EagleProposer(DraftProposer):
    recompute_accepted = True  # accepted draft positions are re-run with the verifier's true features
    reads_verifier_features = True

    def catchup_features(self, items: list[ProposeItem]) -> torch.Tensor:
        """[catch-up tokens, width]: f_{h-1} .. f_{T-2} of every request (h: the head's counter), as wide as the
        verifier's features the head reads (`EagleHead.feature_width`)."""
        width, dev = self.runner.model.feature_width, self.runner.device
        return torch.cat(
            [feature_rows(r, r.num_draft_computed_tokens - 1, r.num_tokens - 2, width, dev) for r, _, _ in items]
        )

    def next_features(self, previous: ForwardOutput, keep: list[int]) -> torch.Tensor:
        """The head's own predicted features of the rows still drafting."""
        return previous.hidden[keep]  # [len(keep), hidden]
