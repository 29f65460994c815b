"""Tests for specserve.kernels.rejection_sampler: hand tables, invariants, statistics, Triton parity.

Tiers:
  a. hand-made tables with known answers, run on every available implementation;
  b. structural invariants of the reference on many random batches;
  c. statistical: the emitted tokens follow the target distribution, not the draft;
  d. the Triton kernel matches the reference bit for bit (interpreter on CPU, compiled on CUDA).
"""

from __future__ import annotations

import doctest
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import specserve.kernels.rejection_sampler as rs_module
from specserve.kernels import (
    PLACEHOLDER_TOKEN_ID,
    rejection_sample,
    rejection_sample_reference,
    rejection_sample_triton,
)

HAS_CUDA = torch.cuda.is_available()
# The Triton path runs on CPU tensors only when conftest switched on the interpreter.
TRITON_ON_CPU = rs_module.triton is not None and getattr(rs_module, "_KERNEL_INTERPRETED", False)

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_triton_cpu = pytest.mark.skipif(not TRITON_ON_CPU, reason="needs triton running under TRITON_INTERPRET=1")

Sampler = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _triton_small_blocks(*args: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # A 2-wide vocab chunk makes even 3..6-token vocabularies span several chunks, so the
    # cross-chunk argmax bookkeeping is exercised by the hand tables too.
    return rejection_sample_triton(*args, block_v=2)


@pytest.fixture(
    params=[
        pytest.param(rejection_sample_reference, id="reference"),
        pytest.param(_triton_small_blocks, id="triton", marks=requires_triton_cpu),
    ]
)
def sampler(request: pytest.FixtureRequest) -> Sampler:
    return request.param


@dataclass
class Case:
    """One call's worth of inputs, in the argument order of the samplers."""

    draft_token_ids: torch.Tensor  # [batch, max_k] int64
    draft_probs: torch.Tensor | None  # [batch, max_k, vocab] float32
    target_probs: torch.Tensor  # [batch, max_k + 1, vocab] float32
    num_draft_tokens: torch.Tensor  # [batch] int64
    uniform: torch.Tensor  # [batch, max_k] float32
    exp_noise: torch.Tensor  # [batch, vocab] float32
    is_greedy: torch.Tensor  # [batch] bool

    def args(self) -> tuple[torch.Tensor | None, ...]:
        return (
            self.draft_token_ids,
            self.draft_probs,
            self.target_probs,
            self.num_draft_tokens,
            self.uniform,
            self.exp_noise,
            self.is_greedy,
        )

    def to(self, device: str) -> Case:
        return Case(*(None if t is None else t.to(device) for t in self.args()))


def make_case(
    draft_token_ids: list[list[int]],
    target_probs: list[list[list[float]]],
    num_draft_tokens: list[int],
    is_greedy: list[bool],
    *,
    draft_probs: list[list[list[float]]] | None = None,
    uniform: list[list[float]] | None = None,
    exp_noise: list[list[float]] | None = None,
) -> Case:
    """Build a Case from nested lists; uniform defaults to 0.5 and exp_noise to 1 (plain argmax)."""
    draft = torch.tensor(draft_token_ids, dtype=torch.int64)  # [[], []] gives shape [2, 0]
    target = torch.tensor(target_probs, dtype=torch.float32)
    batch, max_k = draft.shape
    vocab = target.shape[2]
    return Case(
        draft_token_ids=draft,
        draft_probs=None
        if draft_probs is None
        else torch.tensor(draft_probs, dtype=torch.float32).reshape(batch, max_k, vocab),
        target_probs=target,
        num_draft_tokens=torch.tensor(num_draft_tokens, dtype=torch.int64),
        uniform=torch.full((batch, max_k), 0.5)
        if uniform is None
        else torch.tensor(uniform, dtype=torch.float32).reshape(batch, max_k),
        exp_noise=torch.ones(batch, vocab) if exp_noise is None else torch.tensor(exp_noise, dtype=torch.float32),
        is_greedy=torch.tensor(is_greedy, dtype=torch.bool),
    )


def run(sampler: Sampler, case: Case) -> tuple[list[list[int]], list[int]]:
    output_token_ids, num_accepted = sampler(*case.args())
    return output_token_ids.tolist(), num_accepted.tolist()


# Target rows reused by several tables: argmaxes are 1, 0, 3, 2.
P0 = [0.1, 0.6, 0.2, 0.1]
P1 = [0.5, 0.1, 0.3, 0.1]
P2 = [0.1, 0.1, 0.1, 0.7]
P3 = [0.2, 0.1, 0.4, 0.3]


# ---------------------------------------------------------------- tier a: hand-made tables


def test_greedy_all_accepted_emits_bonus_argmax(sampler: Sampler) -> None:
    case = make_case([[1, 0, 3]], [[P0, P1, P2, P3]], [3], [True])
    assert run(sampler, case) == ([[1, 0, 3, 2]], [3])


def test_greedy_first_mismatch_emits_recovered_argmax(sampler: Sampler) -> None:
    case = make_case([[1, 2, 3]], [[P0, P1, P2, P3]], [3], [True])
    # Position 1 drafts 2 but argmax(P1) = 0; position 2 is never looked at.
    assert run(sampler, case) == ([[1, 0, -1, -1]], [1])


def test_greedy_mismatch_at_first_position(sampler: Sampler) -> None:
    case = make_case([[0, 0]], [[P0, P1, P2]], [2], [True])
    assert run(sampler, case) == ([[1, -1, -1]], [0])


def test_greedy_argmax_ties_pick_lowest_token_id(sampler: Sampler) -> None:
    tied_row = [0.0, 0.3, 0.1, 0.3, 0.0, 0.3]  # max 0.3 at 1, 3 and 5
    unused = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]  # after a rejection at position 0
    # Request 0 drafts the tied token 3: the argmax is 1, so it is rejected and 1 is emitted.
    # Request 1 drafts 1 and gets it accepted, then the bonus row is tied too.
    case = make_case(
        [[3], [1]],
        [[tied_row, unused], [tied_row, tied_row]],
        [1, 1],
        [True, True],
    )
    assert run(sampler, case) == ([[1, -1], [1, 1]], [0, 1])


def test_plain_decoding_without_any_draft(sampler: Sampler) -> None:
    # max_k == 0: every request emits one token from row 0.
    case = make_case(
        [[], []],
        [[P2], [P2]],
        [0, 0],
        [True, False],
        exp_noise=[[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.01, 1.0]],
    )
    # Sampled request: scores are p / noise = [0.1, 0.1, 10, 0.7], so token 2 wins the race.
    assert run(sampler, case) == ([[3], [2]], [0, 0])


def test_padded_per_request_draft_lengths(sampler: Sampler) -> None:
    garbage = [0.0, 0.0, 1.0, 0.0]  # rows past k_i must be ignored; they would pick token 2
    case = make_case(
        [[1, 0, 3], [1, -1, -1], [-1, -1, -1]],
        [[P0, P1, P2, P3], [P0, P2, garbage, garbage], [P1, garbage, garbage, garbage]],
        [3, 1, 0],
        [True, True, True],
    )
    # Request 1 has k = 1: bonus comes from row 1 (argmax 3), not from row max_k.
    # Request 2 has k = 0: plain decoding from row 0 (argmax 0).
    assert run(sampler, case) == ([[1, 0, 3, 2], [1, 3, -1, -1], [0, -1, -1, -1]], [3, 1, 0])


def test_mixed_greedy_and_sampled_requests(sampler: Sampler) -> None:
    # Same draft and target for both requests; the draft token 2 at position 0 is not the
    # argmax (greedy rejects) but p(2) = 0.2 >= 0.5 * q(2) = 0.15 (sampled accepts).
    q = [[0.1, 0.3, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]]
    case = make_case(
        [[2, 0], [2, 0]],
        [[P0, P1, P2], [P0, P1, P2]],
        [2, 2],
        [True, False],
        draft_probs=[q, q],
        exp_noise=[[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]],
    )
    # Sampled: position 1 accepts 0 (0.5 * 0.25 <= 0.5); bonus from P2 with unit noise is 3.
    assert run(sampler, case) == ([[1, -1, -1], [2, 0, 3]], [0, 2])


def test_sampled_acceptance_threshold_is_inclusive(sampler: Sampler) -> None:
    # u * q == p exactly (0.5 * 0.5 == 0.25 in float32) accepts; a hair more rejects.
    target = [[0.25, 0.75], [0.5, 0.5]]
    draft = [[0.5, 0.5]]
    case = make_case(
        [[0], [0]],
        [target, target],
        [1, 1],
        [False, False],
        draft_probs=[draft, draft],
        uniform=[[0.5], [0.5001]],
    )
    # Request 1 is rejected and recovers from max(p - q, 0) = [0, 0.25]: token 1.
    assert run(sampler, case) == ([[0, 0], [1, -1]], [1, 0])


def test_sampled_rejects_token_with_zero_target_probability(sampler: Sampler) -> None:
    # p(x) = 0 must reject even when u = 0 would make u * q <= p hold.
    target = [[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]
    case = make_case(
        [[0]],
        [target],
        [1],
        [False],
        draft_probs=[[[0.6, 0.2, 0.2]]],
        uniform=[[0.0]],
        exp_noise=[[1.0, 1.0, 0.5]],
    )
    # Residual is [0, 0.3, 0.3]; noise halves token 2's denominator, so it wins.
    assert run(sampler, case) == ([[2, -1]], [0])


def test_sampled_zero_draft_probability(sampler: Sampler) -> None:
    # q(x) = 0: accept iff p(x) > 0 (the ratio p / q is infinite), reject when p(x) = 0 too.
    target = [[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]
    q = [[0.0, 0.5, 0.5]]
    case = make_case(
        [[1], [0]],
        [target, target],
        [1, 1],
        [False, False],
        draft_probs=[[[0.5, 0.0, 0.5]], q],
        uniform=[[0.99], [0.99]],
    )
    # Request 1: residual max(p - q, 0) is all zero (p == q), so it falls back to p: token 1.
    assert run(sampler, case) == ([[1, 2], [1, -1]], [1, 0])


def test_one_hot_drafts_without_draft_probs(sampler: Sampler) -> None:
    # draft_probs=None: q is one-hot at the draft, so accept iff u <= p(x) and the recovered
    # token is drawn from p with the draft token removed.
    target = [[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]]
    case = make_case(
        [[1], [1]],
        [target, target],
        [1, 1],
        [False, False],
        uniform=[[0.6], [0.61]],
    )
    # Request 0 accepts (0.6 <= 0.6), bonus argmax of [0.3, 0.3, 0.4] is 2. Request 1 rejects
    # and recovers from [0.1, 0, 0.3]: token 2, although token 1 has the most target mass.
    assert run(sampler, case) == ([[1, 2], [2, -1]], [1, 0])


def test_one_hot_draft_fully_certain_target_is_always_accepted(sampler: Sampler) -> None:
    target = [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    case = make_case([[1]], [target], [1], [False], uniform=[[0.9999]])
    assert run(sampler, case) == ([[1, 2]], [1])


def test_bonus_and_recovered_tokens_follow_the_exponential_race(sampler: Sampler) -> None:
    # Bonus: p / noise = [0.07, 0.2, 0.1] picks token 1 although token 0 has the most mass.
    target = [[0.2, 0.5, 0.3], [0.7, 0.2, 0.1]]
    case = make_case(
        [[1]],
        [target],
        [1],
        [False],
        draft_probs=[[[0.2, 0.5, 0.3]]],
        uniform=[[0.3]],
        exp_noise=[[10.0, 1.0, 1.0]],
    )
    assert run(sampler, case) == ([[1, 1]], [1])


# The interpreter evaluates the masked-off divisions in numpy, which warns about the 0 / 0 and
# x / 0 this test provokes on purpose.
@pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")
def test_zero_noise_draw_never_makes_a_zero_weight_token_win(sampler: Sampler) -> None:
    # 0 / 0 would be NaN, which torch.argmax ranks highest; a zero-weight token must still lose.
    # A positive weight over zero noise scores +inf and wins, the limit of the race.
    target = [[0.5, 0.0, 0.5]]
    case = make_case([[], []], [target, target], [0, 0], [False, False], exp_noise=[[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert run(sampler, case) == ([[0], [2]], [0, 0])


def test_race_ties_pick_lowest_token_id(sampler: Sampler) -> None:
    # Equal weights and equal noise tie the race; as with argmax the lowest id wins, also across
    # the Triton kernel's vocab chunks (tokens 1 | 2, 3 with block_v = 2).
    uniform_row = [0.25, 0.25, 0.25, 0.25]
    case = make_case(
        [[0], [-1]],
        [[uniform_row, uniform_row], [[0.0, 0.0, 0.5, 0.5], uniform_row]],
        [1, 0],
        [False, False],
    )
    # Request 0 rejects 0 (0.5 > p = 0.25); residual [0, .25, .25, .25] ties across chunks.
    # Request 1 has no draft; its row ties 2 and 3 within one chunk.
    assert run(sampler, case) == ([[1, -1], [2, -1]], [0, 0])


def test_dispatcher_uses_reference_on_cpu() -> None:
    case = make_case([[1, 2, 3]], [[P0, P1, P2, P3]], [3], [True])
    assert run(rejection_sample, case) == run(rejection_sample_reference, case)


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(rs_module, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("field", "bad_value", "message"),
    [
        ("target_probs", torch.zeros(1, 2, 4), "target_probs must be"),
        ("uniform", torch.zeros(1, 2, dtype=torch.float64), "uniform must be torch.float32"),
        ("num_draft_tokens", torch.tensor([3]), "num_draft_tokens must lie in"),
        ("draft_token_ids", torch.tensor([[1, 7]]), "draft_token_ids within num_draft_tokens"),
        ("exp_noise", torch.ones(1, 5), "exp_noise must have shape"),
        ("is_greedy", torch.tensor([1]), "is_greedy must be torch.bool"),
    ],
)
def test_reference_rejects_malformed_inputs(field: str, bad_value: torch.Tensor, message: str) -> None:
    case = make_case([[1, 0]], [[P0, P1, P2]], [2], [True])
    setattr(case, field, bad_value)
    with pytest.raises(ValueError, match=message):
        rejection_sample_reference(*case.args())


@requires_triton_cpu
def test_triton_rejects_non_contiguous_inputs() -> None:
    case = make_case([[1, 0]], [[P0, P1, P2]], [2], [True])
    case.exp_noise = torch.ones(1, 8)[:, ::2]  # right shape [1, 4], every other element
    with pytest.raises(ValueError, match="exp_noise must be contiguous"):
        rejection_sample_triton(*case.args())


# ---------------------------------------------------------------- random inputs


def random_case(
    seed: int,
    batch: int,
    max_k: int,
    vocab: int,
    *,
    with_draft_probs: bool,
    greedy_fraction: float = 0.5,
    quantised: bool = False,
) -> Case:
    """Random but adversarial inputs: sparse supports, ties, p == q rows, off-support drafts."""
    gen = torch.Generator().manual_seed(seed)

    def random_probs(*shape: int) -> torch.Tensor:  # [*shape, vocab]
        if quantised:
            # Small integer weights: many exact ties and exact zeros.
            weights = torch.randint(0, 4, (*shape, vocab), generator=gen).float()
        else:
            weights = torch.randn(*shape, vocab, generator=gen).mul(2.0).exp()
            # Zero out about a third of the vocab, like top-k / top-p filtered distributions.
            weights *= torch.rand(*shape, vocab, generator=gen) > 0.35
        weights[..., 0] += weights.sum(-1) == 0  # keep every row a distribution
        return weights / weights.sum(-1, keepdim=True)

    target_probs = random_probs(batch, max_k + 1)  # [batch, max_k + 1, vocab]
    draft_probs = random_probs(batch, max_k)  # [batch, max_k, vocab]
    # A draft model resembles its target: mix p into q, and make some requests' q exactly p so
    # the all-zero-residual fallback gets exercised.
    mix = torch.rand(batch, 1, 1, generator=gen)
    draft_probs = mix * draft_probs + (1 - mix) * target_probs[:, :max_k]
    same = torch.rand(batch, generator=gen) < 0.2
    draft_probs[same] = target_probs[same, :max_k]

    num_draft_tokens = torch.randint(0, max_k + 1, (batch,), generator=gen)
    is_greedy = torch.rand(batch, generator=gen) < greedy_fraction
    if max_k > 0:
        flat_q = draft_probs.reshape(-1, vocab)
        from_q = torch.multinomial(flat_q, 1, generator=gen).reshape(batch, max_k)
        # Some drafts ignore q (stale probabilities, n-gram proposals) and may hit p = 0 or q = 0.
        anything = torch.randint(0, vocab, (batch, max_k), generator=gen)
        draft = torch.where(torch.rand(batch, max_k, generator=gen) < 0.8, from_q, anything)
        # Greedy requests: usually draft the target argmax so long accepted runs occur.
        target_argmax = target_probs[:, :max_k].argmax(-1)
        agree = torch.rand(batch, max_k, generator=gen) < 0.8
        draft = torch.where(is_greedy[:, None] & agree, target_argmax, draft)
    else:
        draft = torch.empty(batch, 0, dtype=torch.int64)
    pad = torch.arange(max_k)[None, :] >= num_draft_tokens[:, None]
    draft_token_ids = draft.masked_fill(pad, PLACEHOLDER_TOKEN_ID)

    uniform = torch.rand(batch, max_k, generator=gen)
    exp_noise = torch.empty(batch, vocab).exponential_(generator=gen)
    return Case(
        draft_token_ids=draft_token_ids,
        draft_probs=draft_probs.contiguous() if with_draft_probs else None,
        target_probs=target_probs,
        num_draft_tokens=num_draft_tokens,
        uniform=uniform,
        exp_noise=exp_noise,
        is_greedy=is_greedy,
    )


# ---------------------------------------------------------------- tier b: invariants


@pytest.mark.parametrize("seed", range(40))
def test_reference_structural_invariants(seed: int) -> None:
    gen = torch.Generator().manual_seed(1000 + seed)
    batch = int(torch.randint(1, 33, (), generator=gen))
    max_k = int(torch.randint(0, 9, (), generator=gen))
    vocab = int(torch.randint(1, 65, (), generator=gen))
    case = random_case(
        seed,
        batch,
        max_k,
        vocab,
        with_draft_probs=seed % 3 != 0,
        greedy_fraction=[0.0, 0.5, 1.0][seed % 3],
        quantised=seed % 2 == 1,
    )
    output_token_ids, num_accepted = rejection_sample_reference(*case.args())

    assert output_token_ids.shape == (batch, max_k + 1) and output_token_ids.dtype == torch.int64
    assert num_accepted.shape == (batch,) and num_accepted.dtype == torch.int64
    for b in range(batch):
        n, k = int(num_accepted[b]), int(case.num_draft_tokens[b])
        row = output_token_ids[b].tolist()
        assert 0 <= n <= k
        # Contiguous accepted prefix equal to the draft, one emitted token, then padding.
        assert row[:n] == case.draft_token_ids[b, :n].tolist()
        assert 0 <= row[n] < vocab
        assert all(t == PLACEHOLDER_TOKEN_ID for t in row[n + 1 :])

        target = case.target_probs[b]  # [max_k + 1, vocab]
        if case.is_greedy[b]:
            # Greedy: every kept token and the emitted one are the target argmax.
            assert row[: n + 1] == target[: n + 1].argmax(-1).tolist()
        else:
            # Sampled: nothing outside the target's support is ever kept or emitted.
            assert all(target[j, row[j]] > 0 for j in range(n + 1))
            if n < k:
                # A rejected position emits from the residual when it has mass.
                q = (
                    case.draft_probs[b, n]
                    if case.draft_probs is not None
                    else torch.nn.functional.one_hot(case.draft_token_ids[b, n], vocab).float()
                )
                residual = (target[n] - q).clamp_min(0)
                if residual.max() > 0:
                    assert residual[row[n]] > 0


def test_reference_accepts_everything_when_draft_equals_target() -> None:
    # p == q gives acceptance probability 1 for every token the target can produce.
    case = random_case(7, 32, 5, 50, with_draft_probs=True, greedy_fraction=0.0)
    case.draft_probs = case.target_probs[:, :5].contiguous()
    gen = torch.Generator().manual_seed(7)
    flat = case.draft_probs.reshape(-1, 50)
    drafted = torch.multinomial(flat, 1, generator=gen).reshape(32, 5)
    case.num_draft_tokens = torch.full((32,), 5)
    case.draft_token_ids = drafted
    _, num_accepted = rejection_sample_reference(*case.args())
    assert num_accepted.tolist() == [5] * 32


# ---------------------------------------------------------------- tier c: statistics


def chi_square_threshold(dof: int, z: float = 4.265) -> float:
    """Upper chi-square quantile via Wilson-Hilferty; z = 4.265 is the 1e-5 normal tail.

    Wilson-Hilferty is within about 1% of the exact quantile for dof >= 1 at this tail, which is
    far below the margin that matters here: a wrong sampler overshoots by orders of magnitude.
    """
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:  # [vocab], [vocab]
    """Pearson statistic of `counts` against `probs`, over the support of `probs`."""
    expected = probs * counts.sum()
    support = probs > 0
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


# Target rows (k + 1 = 4 positions, vocab 8) and draft rows (k = 3). The supports differ on
# purpose: q puts mass where p has none (always rejected) and vice versa (reachable only through
# the residual), and the overlap sum(min(p, q)) is roughly 0.5-0.7 per row.
STAT_TARGET = torch.tensor(
    [
        [0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.07, 0.00],
        [0.05, 0.05, 0.40, 0.20, 0.10, 0.10, 0.00, 0.10],
        [0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125, 0.125],
        [0.00, 0.50, 0.00, 0.25, 0.00, 0.15, 0.00, 0.10],
    ]
)
STAT_DRAFT = torch.tensor(
    [
        [0.10, 0.40, 0.05, 0.05, 0.20, 0.00, 0.10, 0.10],
        [0.20, 0.05, 0.30, 0.05, 0.20, 0.05, 0.10, 0.05],
        [0.40, 0.05, 0.05, 0.30, 0.05, 0.05, 0.05, 0.05],
    ]
)
STAT_SAMPLES = 200_000


def sampled_position_counts(device: str, with_draft_probs: bool, max_k: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run STAT_SAMPLES identical sampled requests; return per-position token counts and num_accepted."""
    gen = torch.Generator().manual_seed(2024 + max_k + 10 * with_draft_probs)
    batch, vocab = STAT_SAMPLES, STAT_TARGET.shape[1]
    target_probs = STAT_TARGET[: max_k + 1].expand(batch, -1, -1).contiguous()
    draft_rows = STAT_DRAFT[:max_k]  # [max_k, vocab]
    # Draft tokens are sampled from q whether or not the sampler gets to see q.
    draft_token_ids = torch.stack(
        [torch.multinomial(draft_rows[j], batch, replacement=True, generator=gen) for j in range(max_k)],
        dim=1,
    )  # [batch, max_k]
    case = Case(
        draft_token_ids=draft_token_ids,
        draft_probs=draft_rows.expand(batch, -1, -1).contiguous() if with_draft_probs else None,
        target_probs=target_probs,
        num_draft_tokens=torch.full((batch,), max_k),
        uniform=torch.rand(batch, max_k, generator=gen),
        # Clamped as the module docstring advises: a zero draw would bias the race.
        exp_noise=torch.empty(batch, vocab).exponential_(generator=gen).clamp_min_(torch.finfo(torch.float32).tiny),
        is_greedy=torch.zeros(batch, dtype=torch.bool),
    ).to(device)
    output_token_ids, num_accepted = rejection_sample(*case.args())
    output_token_ids = output_token_ids.cpu()
    counts = []
    for j in range(max_k + 1):
        tokens = output_token_ids[:, j]
        counts.append(torch.bincount(tokens[tokens >= 0], minlength=vocab).double())
    return counts, num_accepted.cpu()


@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("max_k", [1, 3])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_cuda])])
def test_emitted_tokens_follow_the_target_distribution(device: str, max_k: int, with_draft_probs: bool) -> None:
    """Position j's token, given the request got that far, is distributed as p[j], not q[j].

    Whether position j is reached depends only on the draws at positions < j, and position j
    uses fresh draws, so conditioning on "reached" leaves its distribution at p[j]; the last
    position is the bonus token. Under a correct sampler the Pearson statistic exceeds the
    threshold with probability 1e-5 (and the seed is fixed, so the outcome is deterministic).
    One-hot drafts are accepted far less often (E_q[p(x)] ~ 0.15 per position), so later
    positions see fewer samples; the chi-square test stays valid while every expected count is
    well above 5, which the `reached` floor below guarantees for p >= 0.05.
    """
    counts, num_accepted = sampled_position_counts(device, with_draft_probs, max_k)
    assert int(counts[0].sum()) == STAT_SAMPLES
    for j, position_counts in enumerate(counts):
        p = STAT_TARGET[j].double()
        reached = int(position_counts.sum())
        assert reached == int((num_accepted >= j).sum())
        assert reached >= 400, f"position {j} reached only {reached} times; test lacks power"
        assert position_counts[p == 0].sum() == 0, f"position {j} emitted a token with p = 0"
        dof = int((p > 0).sum()) - 1
        threshold = chi_square_threshold(dof)
        stat = chi_square(position_counts, p)
        assert stat < threshold, f"position {j}: chi2 {stat:.1f} >= {threshold:.1f} against p"
        # Total variation is the intuitive reading: its typical size is about 1 / sqrt(reached).
        tv = 0.5 * float((position_counts / reached - p).abs().sum())
        assert tv < 5.0 / math.sqrt(reached), f"position {j}: TV {tv:.4f}"

    # The first token is seen by every request; it must be measurably unlike the draft q[0]
    # (a sampler that just passed drafts through would match q[0]). Compare on q's support,
    # since tokens outside it would make the statistic infinite and the check vacuous.
    # TV(p[0], q[0]) = 0.43, so a q-distributed output would sit at chi2 ~ 1e5 here.
    q = STAT_DRAFT[0].double()
    assert chi_square(counts[0], q) > 100 * chi_square_threshold(int((q > 0).sum()) - 1)


# ---------------------------------------------------------------- tier d: Triton == reference

PARITY_SHAPES = [
    # (batch, max_k, vocab, block_v)
    (8, 4, 200, 64),  # vocab not a multiple of the chunk
    (8, 8, 256, 256),  # single chunk, longest draft
    (5, 0, 100, 32),  # plain decoding, no draft at all
    (3, 1, 7, 4),  # tiny odd vocab
    (6, 3, 33, 16),
    (1, 2, 1, 1),  # one-token vocab: everything is accepted
]


def assert_triton_matches_reference(case: Case, block_v: int | None) -> None:
    expected_ids, expected_n = rejection_sample_reference(*case.args())
    got_ids, got_n = rejection_sample_triton(*case.args(), block_v=block_v)
    assert torch.equal(got_n.cpu(), expected_n.cpu())
    assert torch.equal(got_ids.cpu(), expected_ids.cpu())


@requires_triton_cpu
@pytest.mark.parametrize("quantised", [False, True], ids=["continuous", "quantised"])
@pytest.mark.parametrize("greedy_fraction", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize(("batch", "max_k", "vocab", "block_v"), PARITY_SHAPES)
def test_triton_interpreter_matches_reference(
    batch: int,
    max_k: int,
    vocab: int,
    block_v: int,
    with_draft_probs: bool,
    greedy_fraction: float,
    quantised: bool,
) -> None:
    # Distinct, fixed seed per parameter combination.
    seed = 7919 * batch + 997 * max_k + vocab + 2 * with_draft_probs + int(10 * greedy_fraction) + quantised
    case = random_case(
        seed,
        batch,
        max_k,
        vocab,
        with_draft_probs=with_draft_probs,
        greedy_fraction=greedy_fraction,
        quantised=quantised,
    )
    assert_triton_matches_reference(case, block_v)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("with_draft_probs", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize(
    ("batch", "max_k", "vocab"),
    [(64, 8, 49152), (8, 4, 128256), (16, 0, 32000), (3, 1, 7), (64, 3, 1000)],
)
def test_triton_cuda_matches_reference(batch: int, max_k: int, vocab: int, with_draft_probs: bool) -> None:
    for seed in range(3):
        case = random_case(
            seed,
            batch,
            max_k,
            vocab,
            with_draft_probs=with_draft_probs,
            quantised=seed == 2,
        ).to("cuda")
        assert_triton_matches_reference(case, block_v=None)
