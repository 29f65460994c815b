"""Engine hooks for online distillation: traces of finished requests, and swapping the draft between steps."""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, greedy
from transformers import AutoModelForCausalLM

from specserve import LLM, SamplingParams
from specserve.config import CacheConfig, EngineConfig, SpeculativeConfig
from specserve.engine.engine import LLMEngine
from specserve.model.loader import load_model


def engine(tiny, draft: str | None = "draft", k: int | None = 3, trace_topm: int = 0) -> LLMEngine:
    spec = SpeculativeConfig(draft=tiny[draft] if draft else None, num_speculative_tokens=k)
    config = EngineConfig(
        tiny["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=256, block_size=4),
        speculative=spec,
        trace_topm=trace_topm,
    )
    return LLMEngine(config)


def run(eng: LLMEngine, prompts, params, on_step=None) -> dict[str, object]:
    ids = [eng.add_request(p, params) for p in prompts]
    done, step = {}, 0
    while len(done) < len(ids):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
        if on_step is not None:
            on_step(eng, step)
    return [done[i] for i in ids]


@pytest.fixture(scope="module")
def plain_greedy(tiny) -> list[list[int]]:
    llm = LLM(tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=256, block_size=4))
    return [c.token_ids for c in llm.generate(PROMPTS, greedy(24))]


@pytest.mark.parametrize("draft", [None, "draft", "llama"])
def test_trace_holds_the_verifier_top_m_at_every_generated_position(tiny, draft, plain_greedy):
    eng = engine(tiny, draft, 3 if draft else None, trace_topm=5)
    outs = run(eng, PROMPTS, greedy(24))
    # the oracle: HF's forward of the verifier over prompt + output
    ref = AutoModelForCausalLM.from_pretrained(tiny["llama"], torch_dtype=torch.float32)
    for out, expected in zip(outs, plain_greedy):
        trace = out.trace
        assert trace is not None and out.token_ids == expected
        n = len(out.token_ids)
        assert trace.output_token_ids == out.token_ids
        assert trace.topm_ids.shape == (n, 5) and trace.topm_logprobs.shape == (n, 5)
        assert trace.topm_ids[:, 0].tolist() == out.token_ids  # greedy: the emitted token is the top-1
        assert torch.all(trace.topm_logprobs[:, :-1] >= trace.topm_logprobs[:, 1:])
        ids = torch.tensor([trace.prompt_token_ids + trace.output_token_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(ref(ids).logits[0].float(), dim=-1)
        p = len(trace.prompt_token_ids)
        rows = logprobs[p - 1 : p - 1 + n]  # [n, vocab]: the distribution each output token was drawn from
        torch.testing.assert_close(trace.topm_logprobs, rows.gather(1, trace.topm_ids.long()), atol=1e-4, rtol=1e-4)
        assert trace.topm_ids[:, 0].tolist() == rows.argmax(-1).tolist()
        # every step's emitted tokens cover the output exactly once
        assert sum(s.num_accepted + 1 for s in trace.steps) >= n
        assert all(0 <= s.num_accepted <= s.num_draft_tokens for s in trace.steps)
        if draft is None:
            assert {s.source for s in trace.steps} == {"none"}
        assert trace.draft_version == eng.draft_version


def test_no_trace_unless_asked(tiny):
    outs = run(engine(tiny), PROMPTS[:2], greedy(8))
    assert all(o.trace is None for o in outs)


def test_sampled_trace_rows_match_emitted_tokens(tiny):
    eng = engine(tiny, "draft", 2, trace_topm=8)
    outs = run(eng, PROMPTS, SamplingParams(max_tokens=20, temperature=0.8, seed=3))
    for out in outs:
        assert out.trace.topm_ids.shape[0] == len(out.token_ids)


def test_swapping_the_draft_mid_generation_keeps_outputs_exact(tiny, plain_greedy):
    eng = engine(tiny, "llama", 3)  # starts with the verifier as its own draft: all accepted
    first = eng.draft_version
    other = load_model(tiny["draft"], torch.float32, "cpu")  # a different, smaller draft

    def swap(e: LLMEngine, step: int) -> None:
        if step == 3:
            e.swap_draft(other, "v2")
            assert all(r.num_draft_computed_tokens == 0 for r in e.requests.values())

    outs = run(eng, PROMPTS, greedy(24), on_step=swap)
    assert [o.token_ids for o in outs] == plain_greedy
    assert eng.draft_version == "v2"
    before, after = eng.metrics.spec(first), eng.metrics.spec("v2")
    assert before.drafted_tokens > 0 and before.accepted_tokens == before.drafted_tokens
    assert after.drafted_tokens > 0 and after.accepted_tokens < after.drafted_tokens  # a random draft: now rejected
    assert eng.kv.num_free_blocks == eng.num_blocks


def test_swap_refuses_a_draft_that_needs_more_kv_than_reserved(tiny):
    eng = engine(tiny, "draft", 3)
    bigger = load_model(tiny["llama"], torch.float32, "cpu")  # 2 layers x 2 kv heads vs the draft's 1 x 1
    with pytest.raises(ValueError, match="KV bytes per block"):
        eng.swap_draft(bigger, "v2")
    assert eng.draft_version != "v2"


def test_swap_needs_a_draft_engine(tiny):
    eng = engine(tiny, None, None)
    with pytest.raises(ValueError, match="without a draft"):
        eng.swap_draft(load_model(tiny["draft"], torch.float32, "cpu"), "v2")
