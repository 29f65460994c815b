"""Speculative decoding in the engine: greedy is token-for-token plain greedy, sampling keeps the
verifier's distribution, caches stay consistent, adaptive k falls back when drafting does not pay."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from kv_accounting import make_request
from tiny_models import PROMPTS, greedy

from specserve import LLM, SamplingParams
from specserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from specserve.engine.proposal import SpecSource
from specserve.engine.speculation_length import (
    FIRST_PROBE_INTERVAL,
    MAX_PROBE_INTERVAL,
    MIN_SEEN,
    AcceptanceRate,
    SpeculationLengthPolicy,
    expected_speedup,
)


def make(tiny, draft: str | None, k: int | None, **kw) -> LLM:
    cache = kw.pop("cache", CacheConfig(num_blocks=256, block_size=4))
    return LLM(tiny["llama"], draft=draft, dtype="float32", num_speculative_tokens=k, cache=cache, **kw)


def settled_rate(value: float):
    """An engine-wide acceptance rate that has seen many verifications at `value`."""
    rate = AcceptanceRate(value)
    rate.drafted, rate.accepted = 1000.0, 1000.0 * value
    return rate


@pytest.fixture(scope="module")
def plain(tiny) -> LLM:
    return make(tiny, None, None)


@pytest.mark.parametrize("k", [1, 2, 4, 7])
@pytest.mark.parametrize("draft", ["draft", "llama"])
def test_greedy_speculation_equals_plain_greedy(tiny, plain, draft, k):
    spec = make(tiny, tiny[draft], k)
    expected = [c.token_ids for c in plain.generate(PROMPTS, greedy(40))]
    got = [c.token_ids for c in spec.generate(PROMPTS, greedy(40))]
    assert got == expected
    stats = spec.engine.metrics.spec(spec.engine.draft_version)  # the draft model's proposals (not n-gram ones)
    assert stats.drafted_tokens > 0
    if draft == "llama":  # the verifier as its own draft: every draft token is accepted
        assert stats.accepted_tokens == stats.drafted_tokens
        assert stats.mean_acceptance_length > k  # k + 1 except where max_tokens caps k


def test_greedy_speculation_one_request_at_a_time(tiny, plain):
    spec = make(tiny, tiny["draft"], 3)
    for p in PROMPTS:
        assert spec.generate([p], greedy(30))[0].token_ids == plain.generate([p], greedy(30))[0].token_ids


def test_speculation_with_tiny_pool_preemption_and_chunked_prefill(tiny, plain):
    spec = make(
        tiny,
        tiny["draft"],
        4,
        cache=CacheConfig(num_blocks=24, block_size=4),
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8),
    )
    expected = [c.token_ids for c in plain.generate(PROMPTS, greedy(30))]
    assert [c.token_ids for c in spec.generate(PROMPTS, greedy(30))] == expected
    assert spec.engine.scheduler.num_preemptions > 0
    assert spec.engine.kv.num_free_blocks == spec.engine.num_blocks


def test_prefix_cache_with_draft_changes_nothing(tiny, plain):
    spec = make(tiny, tiny["draft"], 3)
    shared = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
    prompts = [shared + " The quick", shared + " def add", shared + " The quick"]
    expected = [plain.generate([p], greedy(20))[0].token_ids for p in prompts]
    got = [spec.generate([p], greedy(20))[0].token_ids for p in prompts]
    assert got == expected
    assert spec.engine.kv.prefix_hit_blocks > 0


def test_adaptive_k_matches_plain_and_mixed_batch(tiny, plain):
    spec = make(tiny, tiny["llama"], None)  # adaptive
    params = [greedy(24), SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True)] * 2
    got = spec.generate(PROMPTS[:4], params)
    expected_greedy = [plain.generate([p], greedy(24))[0].token_ids for p in PROMPTS[:4:2]]
    assert [got[0].token_ids, got[2].token_ids] == expected_greedy
    assert spec.engine.metrics.total_speculation().drafted_tokens > 0


def test_seeded_sampling_is_reproducible_with_fixed_k(tiny):
    # adaptive k follows measured timings, so the same seed may take another (equally distributed)
    # path; with a fixed k a seeded request draws the same numbers alone or in any batch
    spec = make(tiny, tiny["draft"], 3)
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True)
    alone = spec.generate([PROMPTS[1]], sampled)[0].token_ids
    again = spec.generate([PROMPTS[1]], sampled)[0].token_ids
    batched = spec.generate(PROMPTS[:3], [greedy(30), sampled, SamplingParams(max_tokens=5, temperature=1.0)])
    assert alone == again == batched[1].token_ids


def test_adaptive_k_falls_back_to_plain_when_drafts_miss(tiny, plain, tmp_path):
    # a draft whose logits are all 0 proposes token 0 (argmax's first index) every time; the verifier's greedy
    # output never has it, so every draft token is rejected, whatever the timings
    draft = transformers.AutoModelForCausalLM.from_pretrained(tiny["draft"], dtype=torch.float32)
    with torch.no_grad():
        draft.lm_head.weight.zero_()
    draft.save_pretrained(tmp_path)
    expected = [c.token_ids for c in plain.generate(PROMPTS, greedy(60))]
    assert not any(0 in ids for ids in expected)
    spec = make(tiny, str(tmp_path), None)  # adaptive k: the real policy on the engine's own timings
    assert [c.token_ids for c in spec.generate(PROMPTS, greedy(60))] == expected
    stats = spec.engine.metrics.total_speculation()
    generated = spec.engine.metrics.generation_tokens
    assert stats.drafted_tokens > 0 and stats.accepted_tokens == 0
    # with no draft accepted, k > 0 costs more than it yields on any machine: after the prior's first tries
    # only the occasional probe drafts a token
    assert stats.drafted_tokens < 0.25 * generated


def policy_run(steps: int, accepted: bool, verify_slope: float, draft_cost: float) -> list[int]:
    """The k a SpeculationLengthPolicy picks for one decoding request over `steps` steps, fed what the engine
    would measure: a plain verifier step of t(n) = 10 ms (1 + verify_slope (n - 1)) for n tokens, a draft step
    of draft_cost plain steps, and every draft token accepted or every one rejected."""
    policy = SpeculationLengthPolicy(SpeculativeConfig(draft="x"), initial_cost_ratio=draft_cost, ngram=None)
    request = make_request("r", [1, 2, 3], max_tokens=10**6)
    ks = []
    for _ in range(steps):
        choice = policy(request, 1)
        k = choice.k if choice is not None else 0
        ks.append(k)
        policy.observe_step(k + 1, 0.01 * (1 + verify_slope * k))
        if k:
            policy.observe_draft_step(0.01 * draft_cost)
        policy.observe(request, choice, k if accepted else 0)
    return ks


def test_adaptive_k_policy_weighs_acceptance_against_measured_costs():
    steps = 600
    # a GPU at batch 1: verifying more tokens is nearly free, the draft costs a tenth of a verifier step
    accepted = policy_run(steps, accepted=True, verify_slope=0.05, draft_cost=0.1)
    assert accepted[:MIN_SEEN] == [0] * MIN_SEEN  # the plain step is timed before anyone drafts
    assert sum(accepted) / steps > 6  # and then the longest k pays: up to max_speculative_tokens (8)
    # the same costs, every draft rejected: back to plain decoding, probes ever rarer
    missed = policy_run(4 * MAX_PROBE_INTERVAL, accepted=False, verify_slope=0.05, draft_cost=0.1)
    assert 0 < sum(missed) < 0.05 * len(missed)
    late = [i for i, k in enumerate(missed) if k and i > MAX_PROBE_INTERVAL // 2]
    assert len(late) >= 2 and all(missed[i] == 1 for i in late)  # a probe is one token
    assert all(b - a >= MAX_PROBE_INTERVAL for a, b in zip(late, late[1:]))  # failed probes back off
    # every draft accepted, but a CPU-like verifier (n tokens cost n steps) and a draft at 0.9 of a step:
    # drafting never pays, so only probes draft (an accepted probe keeps them at the shortest interval)
    costly = policy_run(steps, accepted=True, verify_slope=1.0, draft_cost=0.9)
    assert set(costly) == {0, 1}
    assert sum(costly) <= steps / FIRST_PROBE_INTERVAL


def test_speculation_length_policy_maths():
    assert expected_speedup(0.0, 3, 0.1) < 1.0
    policy = SpeculationLengthPolicy(SpeculativeConfig(draft="x"), initial_cost_ratio=0.1, ngram=None)
    assert policy.best(0.0, 8, 1, SpecSource.DRAFT) == (1.0, 0)  # untimed: each draft costs c0 = 0.1
    assert policy.best(0.9, 8, 1, SpecSource.DRAFT)[1] >= 4
    # Leviathan et al. eq. 1 at alpha = 0.8, k = 4, c = 0.1
    assert math.isclose(expected_speedup(0.8, 4, 0.1), (1 - 0.8**5) / (0.2 * 1.4))


def test_draft_with_other_vocabulary_is_refused(tiny, tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocabulary size 100"):
        LLM(tiny["llama"], draft=str(tmp_path), dtype="float32")


def exact_second_token_distribution(path: str, prompt_ids: list[int], temperature: float) -> torch.Tensor:
    """P(t2) = sum_t1 p(t1 | prompt) p(t2 | prompt, t1) under the verifier, computed exactly in fp32."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        p1 = (hf(torch.tensor([prompt_ids])).logits[0, -1] / temperature).softmax(-1)  # [vocab]
        vocab = p1.shape[0]
        batch = torch.tensor(prompt_ids).repeat(vocab, 1)
        batch = torch.cat([batch, torch.arange(vocab)[:, None]], dim=1)  # [vocab, len + 1]
        p2 = (hf(batch).logits[:, -1] / temperature).softmax(-1)  # [vocab (t1), vocab (t2)]
    return p1 @ p2


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; bins with expected count < 5 are pooled."""
    from scipy.stats import chisquare

    n = counts.sum().item()
    expected = probs * n
    big = expected >= 5
    obs, exp = counts[big].double(), expected[big].double()
    if (~big).any():
        obs = torch.cat([obs, counts[~big].sum(0, keepdim=True).double()])
        exp = torch.cat([exp, expected[~big].sum(0, keepdim=True).double()])
    exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


@pytest.mark.integration
@pytest.mark.parametrize("k", [2])
def test_sampled_speculation_keeps_the_verifier_distribution(tiny, k):
    """Token 2 is the first token a speculative step emits (token 1 comes from the prefill step)."""
    pytest.importorskip("scipy")
    temperature = 1.5  # flatter than the peaked random model, so many tokens carry mass
    spec = make(tiny, tiny["draft"], k, scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096))
    prompt = spec.tokenizer.encode("The quick brown fox")
    n = 6000
    outs = spec.generate(
        [prompt] * n, [SamplingParams(max_tokens=3, temperature=temperature, seed=i, ignore_eos=True) for i in range(n)]
    )
    vocab = spec.engine.verifier.arch.vocab_size
    counts = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=vocab).float()
    exact = exact_second_token_distribution(tiny["llama"], prompt, temperature)
    stats = spec.engine.metrics.total_speculation()
    assert 0.05 < stats.acceptance_rate < 0.95, "the test needs both accepted and rejected draft tokens"
    assert chi_square_pvalue(counts, exact) > 1e-3
    # and the output is not the draft's distribution
    draft_exact = exact_second_token_distribution(tiny["draft"], prompt, temperature)
    tv = 0.5 * (exact - draft_exact).abs().sum().item()
    assert tv > 0.2
    assert chi_square_pvalue(counts, draft_exact) < 1e-6


def test_step_cost_model_fits_a_line():
    from specserve.engine.speculation_length import StepCostModel

    m = StepCostModel()
    assert m.fit() is None
    for n in [1, 2, 4, 8, 1, 3, 5, 9] * 5:
        m.observe(n, 0.02 + 0.005 * n)
    a, b = m.fit()
    assert math.isclose(a, 0.02, rel_tol=1e-6) and math.isclose(b, 0.005, rel_tol=1e-6)


def test_costly_verification_turns_speculation_off():
    from specserve.engine.speculation_length import SpeculationLengthPolicy

    policy = SpeculationLengthPolicy(SpeculativeConfig(draft="x"), initial_cost_ratio=0.1, ngram=None)
    policy.draft_rate = settled_rate(0.5)
    for n in [1, 2, 3, 4] * 5:  # each extra verified token costs a whole plain step
        policy.observe_step(n, 0.03 * n)
    policy.observe_draft_step(0.003)
    assert policy.step_cost(1, 1) > 2.0
    assert policy.best(0.5, 8, 1, SpecSource.DRAFT) == (1.0, 0)
    free = SpeculationLengthPolicy(SpeculativeConfig(draft="x"), initial_cost_ratio=0.1, ngram=None)
    for n in [1, 2, 3, 4] * 5:  # verification nearly free: speculate
        free.observe_step(n, 0.03 + 0.0003 * n)
    free.observe_draft_step(0.003)
    assert free.best(0.7, 8, 1, SpecSource.DRAFT)[1] >= 3


def test_verification_cost_is_read_per_step_size_not_only_from_a_line():
    """A CPU whose upcast matmuls switch kernels: 2-3 tokens cost nearly 2 steps, 4-8 tokens barely more.
    A line through those points would call 3 tokens cheap and 6 dear; the policy reads each size's own time."""
    from specserve.engine.speculation_length import SpeculationLengthPolicy, StepCostModel

    curve = {1: 0.030, 2: 0.055, 3: 0.058, 4: 0.060, 5: 0.061, 6: 0.062, 7: 0.063, 8: 0.064}
    m = StepCostModel()
    for n in list(curve) * 4:
        m.observe(n, curve[n])
    assert all(math.isclose(m.predict(n), t) for n, t in curve.items())
    assert m.predict(20) == m.predict(8)  # unseen: priced like the largest size seen below it, to be tried
    m.observe(20, 0.2)
    assert m.predict(20) == m.predict(8)  # seen once: not yet trusted
    m.observe(20, 0.2)
    m.observe(20, 0.2)
    assert math.isclose(m.predict(20), 0.2) and math.isclose(m.predict(24), 0.2)
    low = StepCostModel()
    for n in [4, 5, 6] * 3:
        low.observe(n, 0.05 + 0.01 * n)
    assert math.isclose(low.predict(2), 0.07)  # nothing seen below: the line
    policy = SpeculationLengthPolicy(SpeculativeConfig(draft="x"), initial_cost_ratio=0.1, ngram=None)
    policy.verifier_cost = m
    policy.observe_draft_step(0.0015)
    assert math.isclose(policy.step_cost(2, 1), 0.058 / 0.030 + 2 * 0.05)
    # at alpha 0.6 one or two drafts do not pay for the jump to ~2 steps, four do (a line fit would say two)
    assert policy.best(0.6, 2, 1, SpecSource.DRAFT) == (1.0, 0)
    assert policy.best(0.6, 8, 1, SpecSource.DRAFT)[1] == 4


def test_the_plain_step_is_timed_before_any_drafting(tiny):
    """Every choice of k is priced against a plain step of the batch: until one is timed, requests decode plainly;
    prompt chunks never enter the step timings."""
    from types import SimpleNamespace

    from specserve.engine.speculation_length import MIN_SEEN, REFRESH_STEPS, SpeculationLengthPolicy

    policy = SpeculationLengthPolicy(SpeculativeConfig(draft="x"), initial_cost_ratio=0.01, ngram=None)
    policy.draft_rate = settled_rate(0.95)
    r = SimpleNamespace(request_id="r", num_tokens=10, num_draft_computed_tokens=9, all_token_ids=[1] * 10)
    for _ in range(10):  # steps of 2 tokens (a request drafting 1) say nothing of a 1-token step
        policy.observe_step(2, 0.031)
    assert policy(r, 1) is None
    for _ in range(MIN_SEEN):
        policy.observe_step(1, 0.030)
    choice = policy(r, 1)
    assert choice.k >= 4 and choice.source is SpecSource.DRAFT
    for _ in range(REFRESH_STEPS + 1):  # drafting for long: the plain step's time is taken again
        policy.observe_step(5, 0.032)
    assert policy(r, 1) is None
    policy.observe_step(1, 0.030)
    assert policy(r, 1).k >= 4

    llm = LLM(tiny["llama"], draft=tiny["draft"], dtype="float32", cache=CacheConfig(num_blocks=128, block_size=4))
    prompt = list(range(3, 40))
    llm.generate([prompt], greedy(24))
    seen = llm.engine.spec_policy.verifier_cost.seen
    assert seen and max(seen) <= 1 + SpeculativeConfig().max_speculative_tokens  # decode steps only
    assert seen[1][0] >= MIN_SEEN
