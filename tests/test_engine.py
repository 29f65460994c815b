"""The engine without speculation: HF-identical greedy output, batching, sampling, stops, bad input."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from tiny_models import PROMPTS, greedy

from specserve import LLM, SamplingParams
from specserve.config import CacheConfig, SchedulerConfig


@pytest.fixture(scope="module")
def llm(tiny) -> LLM:
    return LLM(tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=128, block_size=4))


def hf_greedy(path: str, ids: list[int], n: int) -> list[int]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.generation_config.eos_token_id = None
    out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, pad_token_id=0)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_matches_hf_generate(tiny, name):
    llm = LLM(tiny[name], dtype="float32", cache=CacheConfig(num_blocks=64, block_size=4))
    for prompt in PROMPTS[:3]:
        ids = llm.tokenizer.encode(prompt)
        ours = llm.generate([ids], greedy(24))[0].token_ids
        assert ours == hf_greedy(tiny[name], ids, 24), prompt


def test_batch_equals_each_alone(llm):
    alone = [llm.generate([p], greedy(20))[0].token_ids for p in PROMPTS]
    batched = [c.token_ids for c in llm.generate(PROMPTS, greedy(20))]
    assert batched == alone


def test_chunked_prefill_changes_nothing(tiny):
    small_budget = LLM(
        tiny["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=128, block_size=4),
        scheduler=SchedulerConfig(max_num_batched_tokens=7),
    )
    big = LLM(tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=128, block_size=4))
    a = [c.token_ids for c in small_budget.generate(PROMPTS, greedy(12))]
    b = [c.token_ids for c in big.generate(PROMPTS, greedy(12))]
    assert a == b


def test_seed_reproducible_and_distinct(llm):
    p = dict(max_tokens=16, temperature=1.0, ignore_eos=True)
    a = llm.generate(["The quick"], SamplingParams(seed=7, **p))[0].token_ids
    b = llm.generate(["The quick"], SamplingParams(seed=7, **p))[0].token_ids
    # batched with other requests, the seeded request still draws the same tokens
    c = llm.generate(
        ["To", "The quick", "def"], [SamplingParams(seed=1, **p), SamplingParams(seed=7, **p), SamplingParams(**p)]
    )[1].token_ids
    d = llm.generate(["The quick"], SamplingParams(seed=8, **p))[0].token_ids
    assert a == b == c
    assert a != d


def test_top_k_one_is_greedy(llm):
    g = llm.generate(["The quick"], greedy(10))[0].token_ids
    k1 = llm.generate(["The quick"], SamplingParams(max_tokens=10, temperature=0.9, top_k=1, ignore_eos=True))
    assert k1[0].token_ids == g


def test_max_tokens_and_finish_reason(llm):
    out = llm.generate(["The quick"], greedy(5))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_token_ends_generation(llm):
    ref = llm.generate(["The quick"], greedy(12))[0].token_ids
    stop_at = ref[4]
    first = ref.index(stop_at)
    out = llm.generate(
        ["The quick"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
    )[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"


def test_stop_string_truncates_text(llm):
    ref = llm.generate(["The quick"], greedy(16))[0].text
    assert len(ref) > 6
    stop = ref[3:6]
    out = llm.generate(["The quick"], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == ref[: ref.index(stop)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-3), "top_k"),
    ],
)
def test_bad_sampling_params_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts_are_rejected(tiny):
    llm = LLM(
        tiny["llama"],
        dtype="float32",
        scheduler=SchedulerConfig(max_model_len=32),
        cache=CacheConfig(num_blocks=64, block_size=4),
    )
    with pytest.raises(ValueError, match="empty"):
        llm.generate([""], greedy(4))
    with pytest.raises(ValueError, match="context holds 32"):
        llm.generate([list(range(3, 40))], greedy(4))
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[1, 2, 10**6]], greedy(4))
    assert not llm.engine.has_unfinished()
    # the engine still serves after rejecting bad input
    assert len(llm.generate(["The"], greedy(3))[0].token_ids) == 3


def test_output_capped_by_context(tiny):
    llm = LLM(
        tiny["llama"],
        dtype="float32",
        scheduler=SchedulerConfig(max_model_len=24),
        cache=CacheConfig(num_blocks=64, block_size=4),
    )
    ids = list(range(3, 20))
    out = llm.generate([ids], greedy(100))[0]
    assert out.finish_reason == "length" and len(ids) + len(out.token_ids) == 24


def test_streamed_deltas_add_up_to_text(llm):
    engine = llm.engine
    rid = engine.add_request("Héllo wörld", SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True))
    pieces, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            pieces.append(out.delta_text)
            final = out
    assert "".join(pieces) == final.text


def test_detokenizer_never_splits_a_character(llm):
    from specserve.engine.detokenizer import IncrementalDetokenizer

    text = "Héllo wörld, ünïcode and emoji 🙂 must survive"
    ids = llm.tokenizer.encode(text)
    detok = IncrementalDetokenizer(llm.tokenizer, [], stop=[])
    pieces = []
    for t in ids:
        detok.add(t)
        pieces.append(detok.take_delta(finished=False))
    assert all(not p.endswith("\ufffd") for p in pieces)
    assert "".join(pieces) == text
    # some multi-byte character spans tokens, so some step must have held text back
    assert any(p == "" for p in pieces)


def test_stop_string_is_held_back_while_streaming(llm):
    from specserve.engine.detokenizer import IncrementalDetokenizer

    ids = llm.tokenizer.encode("the question: whether")
    detok = IncrementalDetokenizer(llm.tokenizer, [], stop=["question: wh"])
    streamed, stop = "", None
    for t in ids:
        stop = detok.add(t)
        streamed += detok.take_delta(finished=stop is not None)
        if stop:
            break
    assert stop == "question: wh" and streamed == "the "


@pytest.mark.integration
def test_random_operations_leak_no_blocks(tiny):
    llm = LLM(
        tiny["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=40, block_size=4),
        scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=24),
    )
    engine = llm.engine
    rng = random.Random(0)
    live: list[str] = []
    for _ in range(1000):
        op = rng.random()
        if op < 0.35:
            n = rng.randint(1, 20)
            live.append(
                engine.add_request(
                    [rng.randint(3, 300) for _ in range(n)],
                    SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0, 1])),
                )
            )
        elif op < 0.5 and live:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        else:
            for out in engine.step():
                if out.finished and out.request_id in live:
                    live.remove(out.request_id)
    for rid in live:
        engine.abort_request(rid)
    assert not engine.has_unfinished()
    assert engine.kv.num_free_blocks == engine.num_blocks
    assert all(b.ref_count == 0 for b in engine.kv.pool.blocks)
    assert not engine.kv.req_blocks


def test_prefix_cache_reuses_blocks_and_changes_nothing(tiny):
    shared = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."
    prompts = [shared + " The quick", shared + " def add"]
    cold = LLM(
        tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=128, block_size=4, enable_prefix_caching=False)
    )
    warm = LLM(tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=128, block_size=4))
    expected = [c.token_ids for c in cold.generate(prompts, greedy(10))]
    first = warm.generate([prompts[0]], greedy(10))[0].token_ids
    hits_before = warm.engine.kv.prefix_hit_blocks
    second = warm.generate([prompts[1]], greedy(10))[0].token_ids
    again = warm.generate([prompts[0]], greedy(10))[0].token_ids
    hits = warm.engine.kv.prefix_hit_blocks - hits_before
    shared_blocks = len(warm.tokenizer.encode(shared)) // 4
    assert hits >= shared_blocks, (hits, shared_blocks)
    assert [first, second] == expected and again == expected[0]
    assert cold.engine.kv.prefix_hit_blocks == 0


def test_small_pool_preempts_and_outputs_unchanged(tiny):
    roomy = LLM(tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=256, block_size=4))
    tight = LLM(
        tiny["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=24, block_size=4),
        scheduler=SchedulerConfig(max_num_seqs=8),
    )
    expected = [c.token_ids for c in roomy.generate(PROMPTS, greedy(30))]
    got = [c.token_ids for c in tight.generate(PROMPTS, greedy(30))]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == expected
    assert tight.engine.kv.num_free_blocks == tight.engine.num_blocks
