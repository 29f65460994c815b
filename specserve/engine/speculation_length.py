"""SpeculationLength: how many draft tokens (k) each request proposes this step.

Leviathan et al. (2023): with per-token acceptance rate alpha, proposing k tokens yields
E(k) = (1 - alpha^(k+1)) / (1 - alpha) tokens per step. A step costs one plain verifier step,
plus k draft steps (c each, relative to the verifier step), plus the verifier's extra work for k
more tokens per request (v each). On a GPU at small batch v ~ 0 ("verification is free"); on a CPU
without native bf16 matmuls, or at large batch, it is not. So the policy times the engine's
decode steps (the verifier's forward, sampling and acceptance; the draft apart) by the tokens in
them (each size keeps its own running time; see StepCostModel for sizes not seen yet), times the
draft's single-token steps, and picks the k in [0, k_max] maximising
E(k) / (t(B (k + 1)) / t(B) + k c + o) for a batch of B, with the request's acceptance estimate
(its own counts blended with the engine-wide rate). With prompt lookup (n-gram) enabled, a
request whose context tail recurs can also propose from the match (c = 0, k at most the match's
continuation); each source gets its best k and expected speedup from its own acceptance
estimate, and the higher speedup proposes. k = 0 is plain decoding; a request held there probes
with k = 1 now and then (each request once per source on its own account, then engine-wide: a
source's probes grow rarer while they fail), so its estimate can recover. The plain step every
choice is priced against is timed before anyone drafts, and again whenever REFRESH_STEPS steps
pass without one. A fixed k
(`--num-speculative-tokens`) bypasses all of this: the n-gram match proposes whenever there is
one, else the draft, always k tokens.

o is what the draft must compute before it can propose: a request whose last tokens came from
prompt lookup or plain steps has a gap of tokens the draft has not seen, and its catch-up forward
(a line fitted online: t_d(n) = a_d + b_d n) costs (t_d(gap) - t_d(1)) / plain step.
Without it, a hybrid would switch to a cold draft whenever the n-gram match ran out and pay a
prefill of the whole gap for a few probable rejections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specserve.config import SpeculativeConfig
from specserve.engine.ngram_proposer import NgramProposer
from specserve.engine.proposal import SpecChoice, SpecSource
from specserve.engine.request import Request

PRIOR_WEIGHT = 8.0  # pseudo-drafted tokens the engine-wide rate counts for in a request's estimate
DRAFT_PRIOR = 0.6  # the engine-wide rates before the first verification
NGRAM_PRIOR = 0.5
RATE_PRIOR_TOKENS = 4.0  # pseudo-drafted tokens the prior counts for in an engine-wide rate
RATE_DECAY = 0.998  # per drafted token: an engine-wide rate remembers the last ~500 drafted tokens
FIRST_PROBE_INTERVAL = 16  # steps without a source before a request probes it with k = 1 (engine-wide, adapts)
MAX_PROBE_INTERVAL = 256
EMA = 0.05
MIN_SEEN = 3  # observations of a token count before its own running time replaces the line fit
REFRESH_STEPS = 64  # a batch's plain step is timed again when this many steps have passed without one


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one verification step yields with k drafts at per-token acceptance alpha (Leviathan et al.)."""
    alpha = min(max(alpha, 0.0), 0.999)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, k: int, c: float, overhead: float = 0.0) -> float:
    """Expected speedup over plain decoding (Leviathan et al. eq. 1): tokens per step over cost per step.

    overhead: a fixed cost of drafting at all this step (the draft's catch-up), in plain verifier steps."""
    if k == 0:
        return 1.0
    return expected_tokens(alpha, k) / (1.0 + k * c + overhead)


class StepCostModel:
    """Online model of a forward pass's seconds against the tokens it computes.

    Every token count seen keeps its own running time: the curve need not be a line, nor even
    rise (on the AVX2 machine, fp32: 2 tokens 1.8x one, 3 tokens 2.1x, 8 tokens 2.0x). A count not
    seen often enough is priced, optimistically, like the largest well-seen count below it, so that
    the policy tries it and learns its cost (a line through small counts would overprice large
    ones that the policy then never tries); with none below, from a line fitted to every
    observation, t(n) = a + b n.
    """

    def __init__(self, decay: float = 0.98) -> None:
        self.decay = decay
        self.s = self.sn = self.snn = self.st = self.snt = 0.0
        self.seen: dict[int, tuple[int, float]] = {}  # tokens -> (observations, running seconds)
        self.steps = 0
        self.last_seen: dict[int, int] = {}  # tokens -> the step that last had that many

    def observe(self, n: int, seconds: float) -> None:
        d = self.decay
        self.s = d * self.s + 1.0
        self.sn = d * self.sn + n
        self.snn = d * self.snn + n * n
        self.st = d * self.st + seconds
        self.snt = d * self.snt + n * seconds
        count, mean = self.seen.get(n, (0, seconds))
        self.seen[n] = (count + 1, mean + max(EMA, 1.0 / (count + 1)) * (seconds - mean))
        self.steps += 1
        self.last_seen[n] = self.steps

    def fit(self) -> tuple[float, float] | None:
        if sum(count for count, _ in self.seen.values()) < 3:
            return None
        var = self.snn / self.s - (self.sn / self.s) ** 2
        mean_t = self.st / self.s
        if var <= 1e-9:  # every step had the same size: no slope information yet
            return mean_t, 0.0
        b = max(0.0, (self.snt / self.s - (self.sn / self.s) * mean_t) / var)
        a = max(1e-6, mean_t - b * self.sn / self.s)
        return a, b

    def count(self, n: int) -> int:
        """How often a step of n tokens was seen."""
        return self.seen.get(n, (0, 0.0))[0]

    def stale(self, n: int) -> bool:
        """Whether steps of n tokens are timed too rarely to trust, or not lately: the time of a size the policy
        stopped choosing (the plain step, while every request drafts) would otherwise never be corrected."""
        return self.count(n) < MIN_SEEN or self.steps - self.last_seen[n] > REFRESH_STEPS

    def predict(self, n: int) -> float | None:
        count, mean = self.seen.get(n, (0, 0.0))
        if count >= MIN_SEEN:
            return mean
        below = [m for m, (c, _) in self.seen.items() if m < n and c >= MIN_SEEN]
        if below:
            return self.seen[max(below)][1]
        f = self.fit()
        return None if f is None else f[0] + f[1] * n


class AcceptanceRate:
    """An engine-wide accepted / drafted of one proposal source: decayed counts over a weak prior, so a few
    verifications outweigh the guess (a source used only by rare probes still learns it does badly) and
    old traffic fades."""

    def __init__(self, prior: float) -> None:
        self.drafted = RATE_PRIOR_TOKENS
        self.accepted = RATE_PRIOR_TOKENS * prior

    @property
    def value(self) -> float:
        return self.accepted / self.drafted

    def observe(self, drafted: int, accepted: int) -> None:
        d = RATE_DECAY**drafted
        self.drafted = d * self.drafted + drafted
        self.accepted = d * self.accepted + accepted


@dataclass
class RequestSpecStats:
    """One request's history per source, kept by the policy while the request runs."""

    counts: dict[SpecSource, tuple[int, int]] = field(default_factory=dict)
    """Per source: (drafted, accepted) tokens."""
    steps_since: dict[SpecSource, int] = field(default_factory=dict)
    """Per source: verification steps since it last proposed."""


class SpeculationLengthPolicy:
    """Chooses each decoding request's proposal source (draft model or prompt lookup) and its k.

    Each source that can propose this step is scored by the speedup it is expected to give at its
    best k (its acceptance estimate, its cost per token, the draft's catch-up), and the better one
    proposes; if neither beats plain decoding, the request decodes plainly (or probes, below). The
    choice is returned as a SpecChoice (with the tokens, for prompt lookup), which the scheduler puts
    in its plan for the engine's execute and update phases.

    Acceptance estimates: the draft model has one engine-wide rate; prompt lookup one per matched
    n-gram length (a 4-token match is better evidence than a 2-token one). A request blends its own
    counts per source (kept here by request id until `forget`) with the engine-wide rate. A source a
    request has not used for its probe interval proposes one token, so an estimate that fell below
    the break-even can recover; each failed probe doubles that source's interval.
    """

    def __init__(self, config: SpeculativeConfig, initial_cost_ratio: float, ngram: NgramProposer | None) -> None:
        self.config = config
        self.method = config.resolved_method
        self.initial_cost_ratio = initial_cost_ratio
        self.ngram = ngram
        # engine-wide acceptance rate per source, updated from every verification; prompt lookup per match length
        self.draft_rate = AcceptanceRate(DRAFT_PRIOR)
        self.probe_interval = dict.fromkeys(SpecSource, FIRST_PROBE_INTERVAL)
        self.ngram_rate = {n: AcceptanceRate(NGRAM_PRIOR) for n in range(ngram.min_n, ngram.max_n + 1)} if ngram else {}
        self.verifier_cost = StepCostModel()
        self.draft_cost = StepCostModel()  # the draft's first forward of a proposal (catch-up) vs its tokens
        self.draft_step_seconds: float | None = None
        self.requests: dict[str, RequestSpecStats] = {}  # request id -> its history, while it runs

    def stats(self, request_id: str) -> RequestSpecStats:
        """The request's history per source (created empty on first use)."""
        return self.requests.setdefault(request_id, RequestSpecStats())

    def forget(self, request_id: str) -> None:
        """The request finished: drop its history."""
        self.requests.pop(request_id, None)

    def reset_draft(self, initial_cost_ratio: float) -> None:
        """A new draft model: forget what was measured of the old one, engine-wide and per request."""
        self.initial_cost_ratio = initial_cost_ratio
        self.draft_rate = AcceptanceRate(DRAFT_PRIOR)
        self.probe_interval[SpecSource.DRAFT] = FIRST_PROBE_INTERVAL
        self.draft_step_seconds = None
        self.draft_cost = StepCostModel()
        for stats in self.requests.values():
            stats.counts.pop(SpecSource.DRAFT, None)

    def _rate(self, source: SpecSource, match_len: int) -> AcceptanceRate:
        return self.ngram_rate[match_len] if source is SpecSource.NGRAM else self.draft_rate

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """One decode step over `num_tokens` verifier tokens, timed without the draft's proposals (prefill steps
        are not observed: their cost is not what a choice of k changes)."""
        self.verifier_cost.observe(num_tokens, seconds)

    def observe_draft_catchup(self, num_tokens: int, seconds: float) -> None:
        self.draft_cost.observe(num_tokens, seconds)

    def draft_overhead(self, request: Request, batch: int) -> float:
        """o: the draft's catch-up on the tokens it has not seen, beyond one token, in plain verifier steps."""
        gap = request.num_tokens - request.num_draft_computed_tokens
        draft, plain = self.draft_cost.fit(), self.verifier_cost.predict(batch)
        if gap <= 1 or draft is None or plain is None:
            return 0.0
        return draft[1] * (gap - 1) / plain

    def observe_draft_step(self, seconds: float) -> None:
        if self.draft_step_seconds is None:
            self.draft_step_seconds = seconds
        else:
            self.draft_step_seconds += EMA * (seconds - self.draft_step_seconds)

    def step_cost(self, k: int, batch: int, source: SpecSource = SpecSource.DRAFT, overhead: float = 0.0) -> float:
        """A step in which each of `batch` requests proposes k tokens, over a plain step's time.

        The verifier's time for batch (k + 1) tokens over its time for batch tokens, plus k draft
        steps for the draft model (none for prompt lookup), plus the draft's catch-up `overhead`.
        Until the verifier has been timed: 1 + k c0, c0 the draft's share of the parameters."""
        if k == 0:
            return 1.0
        draft_model = source is SpecSource.DRAFT
        plain, verify = self.verifier_cost.predict(batch), self.verifier_cost.predict(batch * (k + 1))
        if plain is None or verify is None:
            return 1.0 + (k * self.initial_cost_ratio if draft_model else 0.0) + overhead
        cost = max(verify, plain) / plain + overhead
        if draft_model:
            draft = self.draft_step_seconds / plain if self.draft_step_seconds is not None else self.initial_cost_ratio
            cost += k * draft
        return cost

    def best(
        self, alpha: float, k_max: int, batch: int, source: SpecSource, overhead: float = 0.0
    ) -> tuple[float, int]:
        """(expected speedup, k) of the k in [0, k_max] with the highest speedup (the smaller k on a tie)."""
        options = [(self.speedup(alpha, k, batch, source, overhead), k) for k in range(k_max + 1)]
        return max(options, key=lambda o: (o[0], -o[1]))

    def speedup(self, alpha: float, k: int, batch: int, source: SpecSource, overhead: float = 0.0) -> float:
        """Expected tokens of a step proposing k over that step's cost, in plain steps."""
        return expected_tokens(alpha, k) / self.step_cost(k, batch, source, overhead)

    def _plan(
        self, request: Request, alpha: float, k_max: int, batch: int, source: SpecSource, overhead: float = 0.0
    ) -> tuple[float, int]:
        """(expected speedup, k) for one source: its best k, or a probe (k = 1) when that is 0 and one is due."""
        speedup, k = self.best(alpha, k_max, batch, source, overhead)
        if k == 0 and self._probe_due(request, source):
            return self.speedup(alpha, 1, batch, source, overhead), 1
        return speedup, k

    def request_acceptance(
        self, request: Request, source: SpecSource = SpecSource.DRAFT, ngram_match: int = 0
    ) -> float:
        """The request's own accepted / drafted for `source`, with the engine-wide rate as a prior
        (for prompt lookup: the rate of matches of length `ngram_match`)."""
        drafted, accepted = self.stats(request.request_id).counts.get(source, (0, 0))
        prior = self._rate(source, ngram_match).value
        return (accepted + PRIOR_WEIGHT * prior) / (drafted + PRIOR_WEIGHT)

    def _probe_due(self, request: Request, source: SpecSource) -> bool:
        """A source this request has never tried is due after FIRST_PROBE_INTERVAL steps, whatever the engine-wide
        back-off: acceptance depends on the text (the shipped head: ~0.5 on math, ~0.1 on translation), so a
        source failing on other requests may still pay on this one. After that, the engine-wide interval."""
        stats = self.stats(request.request_id)
        interval = FIRST_PROBE_INTERVAL if source not in stats.counts else self.probe_interval[source]
        return stats.steps_since.get(source, 0) >= interval

    def __call__(self, request: Request, num_running: int) -> SpecChoice | None:
        """This step's proposal for a decoding request; None: it decodes plainly."""
        fixed = self.config.num_speculative_tokens
        cap = min(self.config.max_speculative_tokens, self.config.max_batch_speculative_tokens // max(num_running, 1))
        if fixed is not None:
            cap = fixed
        if cap <= 0:
            return None
        if fixed is None and self.verifier_cost.stale(num_running):
            # a plain step of this batch is what every choice is measured against: time it (again), or a
            # request that always drafts would never learn (or notice a change in) what not drafting costs
            return None
        options: list[tuple[float, SpecChoice]] = []  # (expected speedup, choice at its best k; k may be 0)
        if self.method in ("ngram", "hybrid") and self.ngram is not None:
            proposal, n = self.ngram.lookup(request.all_token_ids, cap)
            if proposal and fixed is not None:  # a fixed k: the match, whenever there is one
                return SpecChoice(SpecSource.NGRAM, len(proposal), tuple(proposal), n)
            if proposal:
                alpha = self.request_acceptance(request, SpecSource.NGRAM, n)
                speedup, k = self._plan(request, alpha, len(proposal), num_running, SpecSource.NGRAM)
                options.append((speedup, SpecChoice(SpecSource.NGRAM, k, tuple(proposal[:k]), n)))
        if self.method in ("draft", "hybrid"):
            if fixed is not None:
                return SpecChoice(SpecSource.DRAFT, fixed)
            overhead = self.draft_overhead(request, num_running)
            alpha = self.request_acceptance(request)
            speedup, k = self._plan(request, alpha, cap, num_running, SpecSource.DRAFT, overhead)
            options.append((speedup, SpecChoice(SpecSource.DRAFT, k)))
        if not options:
            return None
        # the better expected speedup; a probe (k = 1 at a speedup below 1) wins only against plain decoding
        _, choice = max(options, key=lambda o: (o[1].k > 0 and o[0] > 1.0, o[1].k > 0, o[0], -o[1].k))
        return choice if choice.k > 0 else None

    def observe(self, request: Request, choice: SpecChoice | None, num_accepted: int) -> None:
        """After every verification of a decoding request (choice None: it decoded plainly).

        Updates the engine-wide rate of the source, the request's own counts, and the probe intervals.
        The probe interval is engine-wide, per source: a failed probe doubles it, an accepted token halves
        it, so a source that does not pay on this traffic (a weak draft) is probed ever more rarely, and
        a new request pays for one probe of it (`_probe_due`), not for the same failed series again."""
        stats = self.stats(request.request_id)
        source = choice.source if choice is not None else None
        if choice is not None:
            self._rate(choice.source, choice.match_len).observe(choice.k, num_accepted)
            drafted, accepted = stats.counts.get(choice.source, (0, 0))
            stats.counts[choice.source] = (drafted + choice.k, accepted + num_accepted)
        for s in SpecSource:
            stats.steps_since[s] = 0 if s is source else stats.steps_since.get(s, 0) + 1
        if choice is None:
            return
        interval = self.probe_interval[choice.source]
        if choice.k == 1 and num_accepted == 0:
            self.probe_interval[choice.source] = min(2 * interval, MAX_PROBE_INTERVAL)
        elif num_accepted:
            self.probe_interval[choice.source] = max(interval // 2, FIRST_PROBE_INTERVAL)
