"""Prompt-lookup (n-gram) proposals, alone and in hybrid with the draft model."""

from __future__ import annotations

import pytest
import torch
from test_speculative import chi_square_pvalue, exact_second_token_distribution, settled_rate

from specserve import LLM, SamplingParams
from specserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from specserve.engine.ngram_proposer import NgramProposer
from specserve.engine.proposal import SpecChoice, SpecSource

REPEATING = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The quick",
    "def add(a, b):\n    return a + b\ndef add(a, b):\n    return a + b\ndef add(",
    "To be, or not to be, that is the question. To be, or not to be",
]


def test_proposes_what_followed_the_latest_match():
    p = NgramProposer(min_n=2, max_n=3)
    assert p.lookup([1, 2, 3, 4, 5, 9, 2, 3], k=3) == ([4, 5, 9], 2)
    # the most recent earlier occurrence wins
    assert p.lookup([1, 2, 7, 1, 2, 8, 1, 2], k=1) == ([8], 2)
    # the longest n is tried first: (5, 1, 2) recurs -> 9, though (1, 2) alone most recently -> 8
    assert p.lookup([5, 1, 2, 9, 1, 2, 8, 5, 1, 2], k=1) == ([9], 3)
    assert p.lookup([1, 2, 3, 4], k=3) == ([], 0)
    assert p.lookup([1, 2, 3, 1, 2], k=0) == ([], 0)
    # proposals stop at the end of the context
    assert p.lookup([1, 2, 3, 1, 2], k=5) == ([3, 1, 2], 2)


def test_bad_ngram_sizes_are_refused():
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(min_n=3, max_n=2)
    with pytest.raises(ValueError, match="needs a draft model"):
        SpeculativeConfig(method="hybrid")


def spec_llm(tiny, method: str, draft: str | None, k: int | None, **kw) -> LLM:
    return LLM(
        tiny["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=256, block_size=4),
        speculative=SpeculativeConfig(draft=draft, method=method, num_speculative_tokens=k, ngram_min=1, ngram_max=3),
        **kw,
    )


@pytest.mark.parametrize(
    "method, draft, k", [("ngram", None, 3), ("ngram", None, None), ("hybrid", "draft", 2), ("hybrid", "draft", None)]
)
def test_greedy_equals_plain(tiny, method, draft, k):
    plain = LLM(tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=256, block_size=4))
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    expected = [c.token_ids for c in plain.generate(REPEATING, params)]
    spec = spec_llm(tiny, method, tiny[draft] if draft else None, k)
    assert [c.token_ids for c in spec.generate(REPEATING, params)] == expected
    stats = spec.engine.metrics.speculation
    assert stats["ngram"].drafted_tokens > 0
    if method == "hybrid" and k is not None:
        assert stats[spec.engine.draft_version].drafted_tokens > 0  # both sources proposed
    assert spec.engine.kv.num_free_blocks == spec.engine.num_blocks


@pytest.mark.integration
def test_sampled_ngram_keeps_the_verifier_distribution(tiny):
    """Token 2 of many seeded requests, some proposed by prompt lookup (mostly rejected on a random
    model: the accept branch of one-hot drafts is covered statistically in the kernel tests)."""
    pytest.importorskip("scipy")
    temperature = 1.5
    spec = spec_llm(tiny, "ngram", None, 2, scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096))
    # many distinct tokens, so the first sampled token often recurs in the prompt (an n = 1 match)
    prompt = spec.tokenizer.encode(" ".join(REPEATING))
    n = 5000
    outs = spec.generate(
        [prompt] * n,
        [SamplingParams(max_tokens=3, temperature=temperature, seed=i, ignore_eos=True) for i in range(n)],
    )
    stats = spec.engine.metrics.speculation["ngram"]
    assert stats.verification_steps > 300
    vocab = spec.engine.verifier.arch.vocab_size
    counts = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=vocab).float()
    assert chi_square_pvalue(counts, exact_second_token_distribution(tiny["llama"], prompt, temperature)) > 1e-3


def test_matches_across_the_prompt_output_boundary_and_repeats():
    p = NgramProposer(min_n=2, max_n=4)
    prompt, output = [10, 11, 12, 13], [14, 10, 11]
    # the tail (10, 11) spans into the output; its earlier occurrence is in the prompt
    assert p.lookup(prompt + output, k=3) == ([12, 13, 14], 2)
    # a run of one repeated token matches itself shifted by one
    assert p.lookup([7, 7, 7, 7], k=2) == ([7], 3)
    assert p.lookup([5, 7, 7, 7, 7], k=3) == ([7], 3)
    # min_n bounds the shortest match
    assert NgramProposer(min_n=3, max_n=4).lookup([1, 2, 9, 1, 2], k=2) == ([], 0)


def test_a_cold_draft_pays_its_catch_up_in_the_choice_of_k():
    """A request whose recent tokens came from prompt lookup: the draft must first catch up on them."""
    from types import SimpleNamespace

    from specserve.config import SpeculativeConfig
    from specserve.engine.speculation_length import SpeculationLengthPolicy

    policy = SpeculationLengthPolicy(SpeculativeConfig(draft="x"), initial_cost_ratio=0.1, ngram=None)
    policy.draft_rate = settled_rate(0.5)
    for n in [1, 2, 3, 4] * 5:  # verification nearly free
        policy.observe_step(n, 0.03 + 0.0003 * n)
    policy.observe_draft_step(0.003)
    for n in [1, 10, 50, 200] * 3:  # the draft's catch-up: 1 ms per token it has not seen
        policy.observe_draft_catchup(n, 0.002 + 0.001 * n)
    warm = SimpleNamespace(request_id="warm", num_tokens=100, num_draft_computed_tokens=99, all_token_ids=[1] * 100)
    cold = SimpleNamespace(**{**vars(warm), "request_id": "cold", "num_draft_computed_tokens": 0})
    assert policy.draft_overhead(warm, 1) == 0.0
    assert policy.draft_overhead(cold, 1) > 2.0  # ~100 ms of catch-up against a 30 ms step
    assert policy(warm, 1).k >= 2
    assert policy(cold, 1) is None


def hybrid_policy(verify_slope: float):
    """A hybrid policy with measured costs: a 30 ms verifier step, `verify_slope` s per extra token, a 3 ms draft."""
    from specserve.config import SpeculativeConfig
    from specserve.engine.speculation_length import SpeculationLengthPolicy

    policy = SpeculationLengthPolicy(
        SpeculativeConfig(draft="x", method="hybrid", ngram_min=2, ngram_max=4), 0.1, NgramProposer(2, 4)
    )
    for n in [1, 2, 3, 4] * 5:
        policy.observe_step(n, 0.03 + verify_slope * n)
    policy.observe_draft_step(0.003)
    return policy


def decoding_request(tokens: list[int], request_id: str = "r"):
    from types import SimpleNamespace

    return SimpleNamespace(
        request_id=request_id, num_tokens=len(tokens), num_draft_computed_tokens=len(tokens) - 1, all_token_ids=tokens
    )


def test_hybrid_proposes_from_the_source_with_the_higher_expected_speedup():
    policy = hybrid_policy(verify_slope=0.0003)
    repeat = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2]  # the tail (1, 2) recurs: a 2-gram match
    r = decoding_request(repeat)
    policy.draft_rate = settled_rate(0.3)
    policy.ngram_rate[2] = settled_rate(0.8)
    choice = policy(r, 1)
    assert (choice.source, choice.match_len) == (SpecSource.NGRAM, 2) and choice.k >= 3
    assert list(choice.token_ids) == [3, 4, 5, 6, 7, 8, 9, 1, 2][: choice.k]
    # 2-gram matches have been poor lately: the draft, though a match exists
    policy.ngram_rate[2] = settled_rate(0.1)
    choice = policy(r, 1)
    assert choice.k >= 1 and choice.source is SpecSource.DRAFT and choice.token_ids == ()
    # a longer match is judged by its own length's rate
    r3 = decoding_request([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3], "r3")
    policy.ngram_rate[3] = settled_rate(0.9)
    choice = policy(r3, 1)
    assert choice.k >= 3 and (choice.source, choice.match_len) == (SpecSource.NGRAM, 3)
    # the request's own history outweighs the engine-wide rate
    policy.stats(r.request_id).counts[SpecSource.NGRAM] = (40, 38)
    choice = policy(r, 1)
    assert choice.k >= 3 and choice.source is SpecSource.NGRAM


def test_acceptance_of_prompt_lookup_is_kept_per_match_length():
    policy = hybrid_policy(verify_slope=0.0003)
    r = decoding_request([1, 2, 1, 2])
    before = {n: rate.value for n, rate in policy.ngram_rate.items()}
    policy.observe(r, SpecChoice(SpecSource.NGRAM, 4, (1, 2, 1, 2), 3), 0)
    now = {n: rate.value for n, rate in policy.ngram_rate.items()}
    assert now[3] < before[3] and now[2] == before[2] == now[4]
    draft = policy.draft_rate.value
    policy.observe(r, SpecChoice(SpecSource.DRAFT, 4), 4)
    assert policy.draft_rate.value > draft and policy.ngram_rate[3].value == now[3]
    assert policy.stats(r.request_id).counts == {SpecSource.NGRAM: (4, 0), SpecSource.DRAFT: (4, 4)}
    policy.forget(r.request_id)  # a finished request's history goes
    assert r.request_id not in policy.requests


def test_an_engine_wide_rate_soon_forgets_its_prior():
    """A source used only by rare probes must still learn that it does badly: 20 probes, 4 accepted, and the
    rate is near 0.2, not near its prior."""
    from specserve.engine.speculation_length import DRAFT_PRIOR, AcceptanceRate

    rate = AcceptanceRate(DRAFT_PRIOR)
    assert rate.value == DRAFT_PRIOR
    for i in range(20):
        rate.observe(1, int(i % 5 == 0))
    assert 0.2 <= rate.value < 0.3


def test_a_source_below_break_even_probes_and_backs_off():
    """Verification is expensive (as on a CPU without bf16 matmuls): neither source pays at its estimate,
    so the request decodes plainly, and a source it has not used for its interval proposes one token."""
    from specserve.engine.speculation_length import FIRST_PROBE_INTERVAL

    policy = hybrid_policy(verify_slope=0.02)
    policy.draft_rate = settled_rate(0.05)
    policy.ngram_rate[2] = settled_rate(0.05)
    r = decoding_request([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2])
    assert policy(r, 1) is None
    for _ in range(FIRST_PROBE_INTERVAL):
        policy.observe(r, None, 0)
    probe = policy(r, 1)
    assert probe.k == 1  # both are due: one probes
    first = probe.source
    policy.observe(r, probe, 0)  # the probe failed: that source waits twice as long
    assert policy.probe_interval[first] == 2 * FIRST_PROBE_INTERVAL and policy.stats("r").steps_since[first] == 0
    probe = policy(r, 1)
    assert probe.k == 1 and probe.source is not first  # the other source is still due
    other = probe.source
    policy.observe(r, probe, 1)  # accepted: its interval stays at the first
    assert policy.probe_interval[other] == FIRST_PROBE_INTERVAL
    assert policy(r, 1) is None
    # the back-off is engine-wide, but a new request probes each source once on its own account (its text may
    # suit a source that fails on others: a head good at math, poor at translation)
    fresh = decoding_request([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2], "fresh")
    for _ in range(FIRST_PROBE_INTERVAL - 1):
        policy.observe(fresh, None, 0)
    assert policy(fresh, 1) is None
    policy.observe(fresh, None, 0)
    probe = policy(fresh, 1)
    assert probe.k == 1  # both are due for it, though `first` waits 32 steps engine-wide
    policy.observe(fresh, probe, 0)
    again = policy(fresh, 1)
    assert again.k == 1 and again.source is not probe.source
    policy.observe(fresh, again, 0)  # both failed for it too: from now on, the engine-wide intervals
    for _ in range(FIRST_PROBE_INTERVAL):
        policy.observe(fresh, None, 0)
    assert policy(fresh, 1) is None
