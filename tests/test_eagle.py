"""EAGLE draft heads: checkpoint round trip, the verifier features they read, and lossless speculation with them."""

from __future__ import annotations

import os

import pytest
import torch
from test_speculative import chi_square_pvalue, exact_second_token_distribution
from tiny_models import PROMPTS, greedy

from specserve import LLM, SamplingParams
from specserve.config import CacheConfig, SchedulerConfig
from specserve.engine.eagle_proposer import EagleProposer
from specserve.model.eagle import EagleHead, is_eagle_checkpoint, load_eagle, verifier_fingerprint
from specserve.model.loader import load_model
from specserve.model.upcast import enable_upcast


def build_head(verifier_dir: str, out: str, vocab_ids: torch.Tensor | None = None, seed: int = 0) -> str:
    torch.manual_seed(seed)
    verifier = load_model(verifier_dir, torch.float32, "cpu")
    head = EagleHead(verifier, vocab_ids)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    head.save(out, verifier_dir)
    return out


@pytest.fixture(scope="module")
def heads(tiny, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eagle")
    vocab = load_model(tiny["llama"], torch.float32, "cpu").arch.vocab_size
    trimmed = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))[: vocab // 3]
    return {
        "full": build_head(tiny["llama"], str(root / "full")),
        "trimmed": build_head(tiny["llama"], str(root / "trimmed"), trimmed, seed=1),
    }


def make(tiny, draft: str | None, k: int | None, **kw) -> LLM:
    cache = kw.pop("cache", CacheConfig(num_blocks=256, block_size=4))
    return LLM(tiny["llama"], draft=draft, dtype="float32", num_speculative_tokens=k, cache=cache, **kw)


@pytest.fixture(scope="module")
def plain(tiny) -> LLM:
    return make(tiny, None, None)


def test_checkpoint_round_trip_and_fingerprint(tiny, heads):
    assert is_eagle_checkpoint(heads["trimmed"]) and not is_eagle_checkpoint(tiny["llama"])
    verifier = load_model(tiny["llama"], torch.float32, "cpu")
    head = load_eagle(heads["trimmed"], verifier, tiny["llama"])
    assert head.trimmed and head.draft_vocab_size < verifier.arch.vocab_size
    # the head saves only its own weights: no embedding, norm or output layer
    assert set(head.state_dict()) == {"draft_vocab"} | {n for n, _ in head.named_parameters()}
    assert not any("embed" in n or "lm_head" in n for n in head.state_dict())
    assert os.path.getsize(os.path.join(heads["trimmed"], "model.safetensors")) < 200_000
    assert verifier_fingerprint(tiny["llama"]) != verifier_fingerprint(tiny["qwen2"])
    other = load_model(tiny["qwen2"], torch.float32, "cpu")
    with pytest.raises(ValueError, match="trained for verifier"):
        load_eagle(heads["full"], other, tiny["qwen2"])


def test_trimmed_head_puts_no_probability_outside_its_vocabulary(tiny, heads):
    verifier = load_model(tiny["llama"], torch.float32, "cpu")
    head = load_eagle(heads["trimmed"], verifier, tiny["llama"])
    logits = head.compute_logits(torch.randn(5, verifier.arch.hidden_size))
    probs = logits.softmax(-1)
    outside = torch.ones(verifier.arch.vocab_size, dtype=torch.bool)
    outside[head.draft_vocab] = False
    assert torch.all(probs[:, outside] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("which", ["full", "trimmed"])
def test_greedy_with_eagle_equals_plain_greedy(tiny, heads, plain, which, k):
    spec = make(tiny, heads[which], k)
    assert isinstance(spec.engine.proposer, EagleProposer)
    expected = [c.token_ids for c in plain.generate(PROMPTS, greedy(32))]
    assert [c.token_ids for c in spec.generate(PROMPTS, greedy(32))] == expected
    assert spec.engine.metrics.spec(spec.engine.draft_version).drafted_tokens > 0
    assert spec.engine.kv.num_free_blocks == spec.engine.num_blocks


def test_eagle_with_preemption_chunked_prefill_prefix_cache_and_hybrid(tiny, heads, plain):
    spec = make(
        tiny,
        heads["trimmed"],
        None,  # adaptive k, hybrid with prompt lookup
        cache=CacheConfig(num_blocks=24, block_size=4),
        scheduler=SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8),
    )
    prompts = PROMPTS + PROMPTS[:2]  # repeats hit the prefix cache
    expected = [c.token_ids for c in plain.generate(prompts, greedy(30))]
    assert [c.token_ids for c in spec.generate(prompts, greedy(30))] == expected
    assert spec.engine.kv.num_free_blocks == spec.engine.num_blocks


def test_head_reads_the_verifiers_true_features(tiny, heads):
    """The features handed to the head are the verifier's last-layer outputs at exactly those positions."""
    spec = make(tiny, heads["full"], 3)
    eng = spec.engine
    rid = eng.add_request(PROMPTS[0], greedy(40))
    seen = []
    original = eng.proposer.propose

    def spy(items):
        for r, _, _ in items:
            if r.features is not None:
                seen.append((list(r.all_token_ids), r.features_start, r.features.clone()))
        return original(items)

    eng.proposer.propose = spy
    while eng.has_unfinished():
        eng.step()
    assert rid not in eng.requests and len(seen) > 3
    verifier = load_model(tiny["llama"], torch.float32, "cpu")
    enable_upcast(verifier)  # the engine's kernels (fp32: the row-invariant C ones where built)
    from specserve.engine.model_runner import ModelRunner, TokenRun

    for tokens, start, feats in seen:
        runner = ModelRunner(verifier, 64, 4)
        every = runner.run([TokenRun(tokens, 0, list(range(64)), 1)], keep_features=True).features  # [tokens, hidden]
        torch.testing.assert_close(feats, every[start : start + feats.shape[0]], atol=1e-4, rtol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("which", ["full", "trimmed"])
def test_sampled_speculation_with_eagle_keeps_the_verifier_distribution(tiny, heads, which):
    pytest.importorskip("scipy")
    temperature = 1.5
    spec = make(tiny, heads[which], 2, scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096))
    prompt = spec.tokenizer.encode("The quick brown fox")
    n = 6000
    outs = spec.generate(
        [prompt] * n, [SamplingParams(max_tokens=3, temperature=temperature, seed=i, ignore_eos=True) for i in range(n)]
    )
    vocab = spec.engine.verifier.arch.vocab_size
    counts = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=vocab).float()
    exact = exact_second_token_distribution(tiny["llama"], prompt, temperature)
    stats = spec.engine.metrics.total_speculation()
    assert 0.02 < stats.acceptance_rate < 0.95, stats.acceptance_rate
    assert chi_square_pvalue(counts, exact) > 1e-3


def test_a_prefix_cache_hit_gives_the_head_what_it_had_the_first_time(tiny, heads):
    """A head catches up on the verifier's features, which a prefix hit skips computing: the hit counts only as far
    as the head's own KV is cached too (marked once the head has caught up past a block), so the head proposes
    what it proposed without the hit, and a seeded sample with a fixed k is the same again and in a batch."""
    spec = make(tiny, heads["full"], 3)
    assert spec.engine.scheduler.hit_needs_draft_kv
    sampled = SamplingParams(max_tokens=24, temperature=0.9, seed=3, ignore_eos=True)
    prompt = PROMPTS[1] * 3  # several full blocks
    first = spec.generate([prompt], sampled)[0].token_ids
    hits = spec.engine.kv.prefix_hit_blocks
    again = spec.generate([prompt], sampled)[0].token_ids
    assert spec.engine.kv.prefix_hit_blocks > hits  # the second run did hit the cache
    batched = spec.generate([PROMPTS[0], prompt, PROMPTS[2]], [greedy(10), sampled, greedy(5)])[1].token_ids
    assert first == again == batched
    nocache = make(tiny, heads["full"], 3, cache=CacheConfig(num_blocks=256, block_size=4, enable_prefix_caching=False))
    assert nocache.generate([prompt], sampled)[0].token_ids == first


def test_a_head_beside_a_verifier_of_bf16_numbers_is_rounded_to_them(tiny, heads):
    """drafts.arm rounds a draft's fp32 weights to bf16 numbers when the verifier's are (the default verifier: a
    bf16 checkpoint run in fp32), so the C kernel streams bf16 copies; otherwise the draft is left as it is."""
    from specserve.engine import drafts
    from specserve.kernels import cpu_linear

    if not cpu_linear.available():
        pytest.skip("no C compiler: no bf16 copies to stream")
    verifier = load_model(tiny["llama"], torch.float32, "cpu")
    enable_upcast(verifier)
    assert not drafts.holds_bf16_numbers(verifier)  # random fp32 weights
    head = load_eagle(heads["full"], verifier, tiny["llama"])
    before = {n: p.clone() for n, p in head.named_parameters()}
    drafts.arm(head, upcast=True, batch_invariant=False, bf16_numbers=drafts.holds_bf16_numbers(verifier))
    assert all(torch.equal(p, before[n]) for n, p in head.named_parameters())

    with torch.no_grad():
        for p in verifier.parameters():
            p.copy_(p.bfloat16().float())
    rounded_verifier = load_model(tiny["llama"], torch.float32, "cpu")
    rounded_verifier.load_state_dict(verifier.state_dict())
    enable_upcast(rounded_verifier)
    assert drafts.holds_bf16_numbers(rounded_verifier)
    head = load_eagle(heads["full"], rounded_verifier, tiny["llama"])
    drafts.arm(head, upcast=True, batch_invariant=False, bf16_numbers=True)
    for n, p in head.named_parameters():
        assert torch.equal(p, before[n].bfloat16().float())
    assert head.fc.upcast.compact is not None and head.logits_upcast.compact is not None


def test_a_trimmed_head_proposes_from_its_own_vocabulary(tiny, heads):
    """A head with a trimmed vocabulary samples over its own tokens (the proposer skips the verifier-vocabulary
    output layer): its draft tokens lie in the vocabulary, and q, handed to the rejection sampler in the verifier's
    vocabulary, sums to 1 with nothing outside it, for greedy and sampled requests alike."""
    spec = make(tiny, heads["trimmed"], 3)
    eng = spec.engine
    vocab_ids = set(eng.proposer.runner.model.draft_vocab.tolist())
    proposals = []
    original = eng.proposer.propose

    def spy(items):
        out = original(items)
        proposals.append((out, [choice.k for _, choice, _ in items]))
        return out

    eng.proposer.propose = spy
    spec.generate(PROMPTS[:2], [greedy(12), SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True)])
    assert proposals
    for proposal, ks in proposals:
        for i, k in enumerate(ks):
            tokens = proposal.token_ids[i, :k].tolist()
            assert set(tokens) <= vocab_ids
            q = proposal.probs[i, :k]  # [k, vocab]
            torch.testing.assert_close(q.sum(-1), torch.ones(k))
            outside = torch.ones(q.shape[-1], dtype=torch.bool)
            outside[list(vocab_ids)] = False
            assert q[:, outside].abs().sum() == 0
            assert all(q[j, t] > 0 for j, t in enumerate(tokens))
