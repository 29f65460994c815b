"""SpeculationLength: how many draft tokens (k) each request proposes this step.

Leviathan et al. (2023): with per-token acceptance rate alpha, proposing k tokens yields
E(k) = (1 - alpha^(k+1)) / (1 - alpha) tokens per step. A step costs one plain verifier step,
plus k draft steps (c each, relative to the verifier step), plus the verifier's extra work for k
more tokens per request (v each). On a GPU at small batch v ~ 0 ("verification is free"); on a CPU
without native bf16 matmuls, or at large batch, it is not. So the policy fits the verifier's step
time against the number of tokens in the step (t(n) = a + b n, online), times the draft's
single-token steps, and picks the k in [0, k_max] maximising E(k) / (1 + k (c + v) + o) with the
request's acceptance estimate (its own counts blended with the engine-wide rate). With prompt
lookup (n-gram) enabled, a request whose context tail recurs proposes from the match instead
(c = 0), with its own acceptance estimate per source. k = 0 is plain
decoding; a request held there probes with k = 1 now and then, backing off while probes fail,
so its estimate can recover. A fixed k (`--num-speculative-tokens`) bypasses all of this.

o is what the draft must compute before it can propose: a request whose last tokens came from
prompt lookup or plain steps has a gap of tokens the draft has not seen, and its catch-up forward
(fitted online like the verifier's: t_d(n) = a_d + b_d n) costs (t_d(gap) - t_d(1)) / plain step.
Without it, a hybrid would switch to a cold draft whenever the n-gram match ran out and pay a
prefill of the whole gap for a few probable rejections.
"""

from __future__ import annotations

from specserve.config import SpeculativeConfig
from specserve.engine.ngram_proposer import NgramProposer
from specserve.engine.request import Request

PRIOR_WEIGHT = 8.0  # pseudo-drafted tokens the engine-wide rate counts for in a request's estimate
FIRST_PROBE_INTERVAL = 16  # steps at k = 0 before a request first probes with k = 1
MAX_PROBE_INTERVAL = 256
EMA = 0.05


def expected_speedup(alpha: float, k: int, c: float, overhead: float = 0.0) -> float:
    """Expected speedup over plain decoding (Leviathan et al. eq. 1): tokens per step over cost per step.

    overhead: a fixed cost of drafting at all this step (the draft's catch-up), in plain verifier steps."""
    if k == 0:
        return 1.0
    alpha = min(max(alpha, 0.0), 0.999)
    return (1.0 - alpha ** (k + 1)) / ((1.0 - alpha) * (1.0 + k * c + overhead))


def best_k(alpha: float, c: float, k_max: int, overhead: float = 0.0) -> int:
    return max(range(k_max + 1), key=lambda k: (expected_speedup(alpha, k, c, overhead), -k))


class StepCostModel:
    """Online fit of a forward pass's seconds against the tokens it computes: t(n) = a + b n."""

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self.s = self.sn = self.snn = self.st = self.snt = 0.0

    def observe(self, n: int, seconds: float) -> None:
        d = self.decay
        self.s = d * self.s + 1.0
        self.sn = d * self.sn + n
        self.snn = d * self.snn + n * n
        self.st = d * self.st + seconds
        self.snt = d * self.snt + n * seconds

    def fit(self) -> tuple[float, float] | None:
        if self.s < 3:
            return None
        var = self.snn / self.s - (self.sn / self.s) ** 2
        mean_t = self.st / self.s
        if var <= 1e-9:  # every step had the same size: no slope information yet
            return mean_t, 0.0
        b = max(0.0, (self.snt / self.s - (self.sn / self.s) * mean_t) / var)
        a = max(1e-6, mean_t - b * self.sn / self.s)
        return a, b

    def predict(self, n: int) -> float | None:
        f = self.fit()
        return None if f is None else f[0] + f[1] * n


class SpeculationLengthPolicy:
    """Chooses each decoding request's proposal source ('ngram' or 'draft') and its k.

    The choice is left on the request (`spec_source`, and `ngram_proposal` for prompt lookup) for
    the engine's execute phase; the scheduler only sees k.
    """

    def __init__(self, config: SpeculativeConfig, initial_cost_ratio: float, ngram: NgramProposer | None) -> None:
        self.config = config
        self.method = config.resolved_method
        self.initial_cost_ratio = initial_cost_ratio
        self.ngram = ngram
        # engine-wide acceptance rate per source, updated from every verification
        self.acceptance_rate = {"draft": 0.6, "ngram": 0.5}
        self.verifier_cost = StepCostModel()
        self.draft_cost = StepCostModel()  # the draft's first forward of a proposal (catch-up) vs its tokens
        self.draft_step_seconds: float | None = None

    def reset_draft(self, initial_cost_ratio: float) -> None:
        """A new draft model: forget what was measured of the old one."""
        self.initial_cost_ratio = initial_cost_ratio
        self.acceptance_rate["draft"] = 0.6
        self.draft_step_seconds = None
        self.draft_cost = StepCostModel()

    def observe_acceptance(self, source: str, drafted: int, accepted: int) -> None:
        if drafted:
            w = 1.0 - (1.0 - EMA) ** drafted
            self.acceptance_rate[source] += w * (accepted / drafted - self.acceptance_rate[source])

    def observe_verifier_step(self, num_tokens: int, seconds: float) -> None:
        self.verifier_cost.observe(num_tokens, seconds)

    def observe_draft_catchup(self, num_tokens: int, seconds: float) -> None:
        self.draft_cost.observe(num_tokens, seconds)

    def draft_overhead(self, request: Request, batch: int) -> float:
        """o: the draft's catch-up on the tokens it has not seen, beyond one token, in plain verifier steps."""
        gap = request.num_tokens - request.num_draft_computed_tokens
        draft, verifier = self.draft_cost.fit(), self.verifier_cost.fit()
        if gap <= 1 or draft is None or verifier is None:
            return 0.0
        return draft[1] * (gap - 1) / (verifier[0] + verifier[1] * batch)

    def observe_draft_step(self, seconds: float) -> None:
        if self.draft_step_seconds is None:
            self.draft_step_seconds = seconds
        else:
            self.draft_step_seconds += EMA * (seconds - self.draft_step_seconds)

    def cost_per_draft_token(self, batch: int, source: str = "draft") -> float:
        """c + v: what one more proposed token per request costs, in plain verifier steps.

        c is the draft model's single-token step (0 for prompt lookup), v the verifier's extra
        work for one more token per request.
        """
        fit = self.verifier_cost.fit()
        if fit is None or (source == "draft" and self.draft_step_seconds is None):
            return self.initial_cost_ratio if source == "draft" else 0.0
        a, b = fit
        plain = a + b * batch
        c = self.draft_step_seconds / plain if source == "draft" else 0.0
        return c + b * batch / plain

    def request_acceptance(self, request: Request, source: str = "draft") -> float:
        drafted, accepted = request.spec_counts.get(source, (0, 0))
        return (accepted + PRIOR_WEIGHT * self.acceptance_rate[source]) / (drafted + PRIOR_WEIGHT)

    def __call__(self, request: Request, num_running: int) -> int:
        fixed = self.config.num_speculative_tokens
        cap = min(self.config.max_speculative_tokens, self.config.max_batch_speculative_tokens // max(num_running, 1))
        if fixed is not None:
            cap = fixed
        request.spec_source = None
        if self.method in ("ngram", "hybrid") and self.ngram is not None and cap > 0:
            proposal = self.ngram.propose(request.all_token_ids, cap)
            if proposal:
                if fixed is not None:
                    k = len(proposal)
                else:
                    alpha = self.request_acceptance(request, "ngram")
                    k = best_k(alpha, self.cost_per_draft_token(num_running, "ngram"), len(proposal))
                if k > 0:
                    request.spec_source = "ngram"
                    request.ngram_proposal = proposal[:k]
                    return k
        if self.method not in ("draft", "hybrid"):
            return 0
        request.spec_source = "draft"
        if fixed is not None:
            return fixed
        overhead = self.draft_overhead(request, num_running)
        k = best_k(self.request_acceptance(request), self.cost_per_draft_token(num_running), cap, overhead)
        if k == 0 and cap > 0 and request.steps_since_draft >= request.probe_interval:
            return 1
        return k

    def observe_request(self, request: Request, drafted: int, accepted: int) -> None:
        """After a verification: a probe that failed makes the next one wait longer."""
        if drafted == 1 and accepted == 0:
            request.probe_interval = min(2 * request.probe_interval, MAX_PROBE_INTERVAL)
        elif accepted:
            request.probe_interval = FIRST_PROBE_INTERVAL
