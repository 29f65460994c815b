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

import time

import torch

from specserve.engine.model_runner import TokenRun
from specserve.engine.proposer import DraftProposer
from specserve.engine.request import Request
from specserve.engine.sampler import sampling_probs


def feature_rows(request: Request, first: int, last: int, hidden: int, device) -> torch.Tensor:
    """The request's verifier features for positions first..last (inclusive); zeros where unknown."""
    out = torch.zeros(max(0, last - first + 1), hidden, device=device)  # [rows, hidden]
    f, start = request.features, request.features_start
    if f is None or out.shape[0] == 0:
        return out
    lo, hi = max(first, start), min(last, start + f.shape[0] - 1)
    if lo <= hi:
        out[lo - first : hi - first + 1] = f[lo - start : hi - start + 1].to(device=device, dtype=out.dtype)
    return out


class EagleProposer(DraftProposer):
    recompute_accepted = True  # accepted draft positions are re-run with the verifier's true features

    def propose(
        self, items: list[tuple[Request, int, list[int]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [batch, max_k] ids (-1 pad), [batch, max_k, vocab] q
        requests = [r for r, _, _ in items]
        ks = [k for _, k, _ in items]
        max_k = max(ks)
        batch, vocab = len(items), self.runner.vocab_size
        hidden = self.runner.model.arch.hidden_size
        dev = self.runner.device
        draft_ids = torch.full((batch, max_k), -1, dtype=torch.int64)
        draft_probs = torch.zeros(batch, max_k, vocab)
        runs, feats = [], []
        for r, _, blocks in items:
            h = r.num_draft_computed_tokens
            runs.append(TokenRun(r.all_token_ids[h:], h, blocks, 1))
            feats.append(feature_rows(r, h - 1, r.num_tokens - 2, hidden, dev))
        features = torch.cat(feats)  # [catch-up tokens, hidden]
        active = list(range(batch))
        for j in range(max_k):
            t0 = time.perf_counter()
            logits = self.runner.forward(runs, features)
            if all(len(run.token_ids) == 1 for run in runs):
                self.step_seconds = time.perf_counter() - t0
            if j == 0:
                self.catchup = (sum(len(run.token_ids) for run in runs), time.perf_counter() - t0)
            probs = sampling_probs(logits, [requests[i].params for i in active])
            tokens = self._sample(probs, [requests[i] for i in active])
            for row, i in enumerate(active):
                draft_ids[i, j] = tokens[row]
                draft_probs[i, j] = probs[row]
            keep = [row for row, i in enumerate(active) if ks[i] > j + 1]
            predicted = self.runner.last_hidden  # [len(active), hidden]: the head's predicted features
            runs = [
                TokenRun([int(tokens[row])], requests[active[row]].num_tokens + j, items[active[row]][2], 1)
                for row in keep
            ]
            features = predicted[keep]
            active = [active[row] for row in keep]
            if not active:
                break
        return draft_ids, draft_probs
