"""DraftProposer: the draft model catches up on unseen tokens and proposes k tokens per request.

Batched over requests: one forward over every request's catch-up tokens (the tokens the verifier
has committed since the draft last ran, ending with the newest one) yields each request's first
draft token; then one single-token forward per further position. Draft tokens are drawn from the
draft's distribution q after the request's own temperature/top-k/top-p, with the request's
generator; q is returned for the rejection sampler. The draft's KV for draft tokens lies beyond
the committed counter, so rejected ones are simply overwritten later.
"""

from __future__ import annotations

import time

import torch

from specserve.engine.model_runner import ForwardOutput, ModelRunner, TokenRun
from specserve.engine.proposal import Proposal, ProposeItem
from specserve.engine.request import Request
from specserve.engine.sampler import sampling_probs


def draft_forward(runner: ModelRunner, runs: list[TokenRun], features=None):
    """A draft's forward as the proposer runs it: (its output, logits [rows, V] over the draft's own vocabulary,
    that vocabulary's token ids [V], or None when it is the verifier's). A draft with a trimmed vocabulary (an
    EAGLE head's 8,192 of 49,152 tokens) skips the verifier-vocabulary output: every other token has q = 0
    exactly, so softmax, top-k, top-p and the draw over its V tokens give the same distribution as over all of
    them, at a sixth of the work."""
    model = runner.model
    if getattr(model, "trimmed", False):
        out = runner.run(runs, features, logits=False)
        return out, model.draft_logits(out.hidden), model.draft_vocab.to(out.hidden.device)
    out = runner.run(runs, features)
    return out, out.logits, None


class DraftProposer:
    recompute_accepted = False  # the draft's KV of accepted draft tokens stays valid (see EagleProposer)
    reads_verifier_features = False

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def _sample(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:  # [batch]
        out = probs.argmax(dim=-1)
        for i, r in enumerate(requests):
            if not r.params.greedy:
                noise = torch.empty(probs.shape[-1]).exponential_(generator=r.generator)
                noise.clamp_min_(torch.finfo(torch.float32).tiny)
                out[i] = (probs[i] / noise.to(probs.device)).argmax()  # drawn on the host: same on any device
        return out

    def catchup_features(self, items: list[ProposeItem]) -> torch.Tensor | None:
        """Extra inputs of the catch-up forward (an EAGLE head's features); a plain draft takes none."""
        return None

    def next_features(self, previous: ForwardOutput, keep: list[int]) -> torch.Tensor | None:
        """Extra inputs of the next single-token forward, for the rows of `previous` still drafting."""
        return None

    def _distribution(self, runs: list[TokenRun], features, requests: list[Request]):
        """One forward: (its output, q over the draft's own vocabulary [rows, V], the vocabulary's token ids [V]
        or None when it is the verifier's), from `draft_forward`'s logits."""
        out, logits, vocab = draft_forward(self.runner, runs, features)
        return out, sampling_probs(logits, [r.params for r in requests]), vocab

    def propose(self, items: list[ProposeItem]) -> Proposal:
        """items: (request, choice with k >= 1, block ids). Draft tokens are not appended to the requests."""
        start = time.perf_counter()
        requests = [r for r, _, _ in items]
        ks = [choice.k for _, choice, _ in items]
        max_k = max(ks)
        batch, vocab = len(items), self.runner.vocab_size
        draft_ids = torch.full((batch, max_k), -1, dtype=torch.int64)  # [batch, max_k]
        # greedy requests only: drafts are the logits' argmax and no q is kept (the verifier's greedy acceptance
        # compares tokens); no softmax, no [batch, max_k, vocab] tensor (~0.15 ms of a ~1 ms head step)
        greedy = all(r.params.greedy for r in requests)
        draft_probs = None if greedy else torch.zeros(batch, max_k, vocab, device=self.runner.device)
        runs = [
            TokenRun(r.all_token_ids[r.num_draft_computed_tokens :], r.num_draft_computed_tokens, blocks, 1)
            for r, _, blocks in items
        ]
        features = self.catchup_features(items)
        active = list(range(batch))
        step_seconds, catchup = None, None
        for j in range(max_k):
            t0 = time.perf_counter()
            if greedy:
                out, logits, ids = draft_forward(self.runner, runs, features)
                tokens = logits.argmax(dim=-1).cpu()
                if ids is not None:
                    tokens = ids.cpu()[tokens]
            else:
                out, probs, ids = self._distribution(runs, features, [requests[i] for i in active])  # [rows, V]
                tokens = self._sample(probs, [requests[i] for i in active])
                if ids is not None:  # the draft's own vocabulary: its token ids, q scattered into the verifier's
                    tokens = ids[tokens]
                    draft_probs[active, j] = draft_probs.new_zeros(len(active), vocab).index_copy_(1, ids, probs)
                else:
                    draft_probs[active, j] = probs
            for row, i in enumerate(active):
                draft_ids[i, j] = tokens[row]
            seconds = time.perf_counter() - t0  # the forward and the sampling: what one more draft token costs
            if all(len(run.token_ids) == 1 for run in runs):
                step_seconds = seconds
            if j == 0:
                catchup = (sum(len(run.token_ids) for run in runs), seconds)
            keep = [row for row, i in enumerate(active) if ks[i] > j + 1]
            runs = [
                TokenRun([int(tokens[row])], requests[active[row]].num_tokens + j, items[active[row]][2], 1)
                for row in keep
            ]
            features = self.next_features(out, keep)
            active = [active[row] for row in keep]
            if not active:
                break
        return Proposal(draft_ids, draft_probs, time.perf_counter() - start, step_seconds, catchup)
