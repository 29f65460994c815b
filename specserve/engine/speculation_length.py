"""SpeculationLength: how many draft tokens (k) each request proposes this step.

Leviathan et al. (2023): with per-token acceptance rate alpha and a draft step costing c verifier
steps, proposing k tokens yields (1 - alpha^(k+1)) / (1 - alpha) tokens for 1 + k*c verifier-step
costs. The policy picks the k in [0, k_max] that maximises that ratio from each request's running
acceptance estimate (a Beta-style blend of its own counts with the engine-wide rate) and the
measured c, and caps k as the batch grows since verifying many tokens stops being free. A
request held at k = 0 probes with k = 1 now and then so its estimate can recover. A fixed k
(`--num-speculative-tokens`) bypasses all of this.
"""

from __future__ import annotations

from specserve.config import SpeculativeConfig
from specserve.engine.request import Request

PRIOR_WEIGHT = 8.0  # pseudo-drafted tokens the engine-wide rate counts for in a request's estimate
PROBE_INTERVAL = 16  # steps at k = 0 before a request probes again with k = 1
EMA = 0.05


def expected_speedup(alpha: float, k: int, c: float) -> float:
    """Expected tokens per unit of verifier time, relative to plain decoding (Leviathan et al. eq. 1)."""
    if k == 0:
        return 1.0
    alpha = min(max(alpha, 0.0), 0.999)
    return (1.0 - alpha ** (k + 1)) / ((1.0 - alpha) * (1.0 + k * c))


def best_k(alpha: float, c: float, k_max: int) -> int:
    return max(range(k_max + 1), key=lambda k: (expected_speedup(alpha, k, c), -k))


class SpeculationLengthPolicy:
    def __init__(self, config: SpeculativeConfig, initial_cost_ratio: float) -> None:
        self.config = config
        self.cost_ratio = initial_cost_ratio
        self.acceptance_rate = 0.6  # engine-wide, updated from every verification

    def observe_acceptance(self, drafted: int, accepted: int) -> None:
        if drafted:
            rate = accepted / drafted
            w = 1.0 - (1.0 - EMA) ** drafted
            self.acceptance_rate += w * (rate - self.acceptance_rate)

    def observe_cost_ratio(self, c: float) -> None:
        self.cost_ratio += EMA * (c - self.cost_ratio)

    def request_acceptance(self, request: Request) -> float:
        return (request.num_accepted + PRIOR_WEIGHT * self.acceptance_rate) / (request.num_drafted + PRIOR_WEIGHT)

    def __call__(self, request: Request, num_running: int) -> int:
        if self.config.num_speculative_tokens is not None:
            return self.config.num_speculative_tokens
        cap = min(self.config.max_speculative_tokens, self.config.max_batch_speculative_tokens // max(num_running, 1))
        k = best_k(self.request_acceptance(request), self.cost_ratio, cap)
        if k == 0 and cap > 0 and request.steps_since_draft >= PROBE_INTERVAL:
            return 1
        return k
