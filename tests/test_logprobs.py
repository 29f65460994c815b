"""Logprobs: the verifier's raw log_softmax at the emitted (and prompt) positions, the same under speculation.

The oracle is HF's forward of the tiny verifier over prompt + output (teacher forcing), in float32. The
server tests check the OpenAI shapes (parsed by the official client's own models), that the values are the
engine's, streaming, echo / max_tokens=0 prompt scoring, and the 400s for values out of range.
"""

from __future__ import annotations

import json

import openai.types as oai
import openai.types.chat as oai_chat
import pytest
import torch
from fastapi.testclient import TestClient
from tiny_models import PROMPTS
from transformers import AutoModelForCausalLM

from specserve import LLM, SamplingParams
from specserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from specserve.engine import engine as engine_module
from specserve.engine.engine import LLMEngine
from specserve.engine.logprobs import token_logprobs
from specserve.server import AsyncEngine, build_app
from specserve.server.logprobs import TokenText, byte_level_alphabet

MODEL = "tiny"
GREEDY = {"temperature": 0, "ignore_eos": True}
N = 12  # tokens generated per prompt


def make_llm(tiny, draft: str | None = None, method: str | None = None, budget: int = 512) -> LLM:
    spec = SpeculativeConfig(
        draft=tiny[draft] if draft else None,
        num_speculative_tokens=3 if draft or method else None,
        method=method,
        ngram_min=1,  # prompt lookup proposes on any repeated token
    )
    return LLM(
        tiny["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=256, block_size=4),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        speculative=spec,
    )


@pytest.fixture(scope="module")
def reference(tiny):
    """ids [tokens] -> [tokens, vocab]: log_softmax of HF's forward of the verifier, row q scoring token q + 1."""
    hf = AutoModelForCausalLM.from_pretrained(tiny["llama"], dtype=torch.float32)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)

    return logprobs


@pytest.fixture(scope="module")
def plain(tiny) -> LLM:
    return make_llm(tiny)


def check_against(reference, prompt_ids: list[int], out, n_top: int) -> None:
    """out's logprobs are rows P - 1 .. of the teacher-forced reference, their top n its n best."""
    rows = reference(prompt_ids + out.token_ids)[len(prompt_ids) - 1 : -1]  # [output, vocab]
    assert len(out.logprobs) == len(out.token_ids) == rows.shape[0]
    for e, token, row in zip(out.logprobs, out.token_ids, rows):
        assert e.token_id == token
        assert e.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert e.rank == 1 + int((row > row[token]).sum())  # the reference's rank (no near-ties at this init)
        best = row.topk(n_top)
        assert [i for i, _ in e.top] == best.indices.tolist()
        torch.testing.assert_close(torch.tensor([lp for _, lp in e.top]), best.values, atol=1e-4, rtol=0)


# ---- engine -------------------------------------------------------------------------------------


def test_plain_logprobs_are_the_teacher_forced_log_softmax(plain, reference):
    outs = plain.generate(PROMPTS[:3], SamplingParams(max_tokens=N, logprobs=4, **GREEDY))
    for prompt, out in zip(PROMPTS[:3], outs):
        check_against(reference, plain.tokenizer.encode(prompt), out, 4)
        assert all(e.rank == 1 for e in out.logprobs)  # greedy emits the verifier's argmax


@pytest.mark.parametrize("draft, method", [("draft", "draft"), ("llama", "draft"), (None, "ngram")])
def test_speculative_logprobs_equal_plain(tiny, plain, reference, draft, method):
    """Greedy: the same tokens, and the verifier's values for every one, accepted draft tokens included."""
    params = SamplingParams(max_tokens=N, logprobs=3, **GREEDY)
    prompts = PROMPTS[:2]
    spec = make_llm(tiny, draft, method)
    expected = plain.generate(prompts, params)
    got = spec.generate(prompts, params)
    assert spec.engine.metrics.spec(spec.engine.draft_version if draft else "ngram").drafted_tokens > 0  # it speculated
    for prompt, a, b in zip(prompts, expected, got):
        assert b.token_ids == a.token_ids
        torch.testing.assert_close(
            torch.tensor([e.logprob for e in b.logprobs]),
            torch.tensor([e.logprob for e in a.logprobs]),
            atol=1e-4,
            rtol=0,
        )
        assert [[i for i, _ in e.top] for e in b.logprobs] == [[i for i, _ in e.top] for e in a.logprobs]
        check_against(reference, spec.tokenizer.encode(prompt), b, 3)


def test_sampled_logprobs_are_raw_not_tempered(plain, reference):
    """At temperature 0.5 with top-k 3 the token is drawn from a reshaped distribution; the logprob reported
    is the raw one (temperature 1, all tokens), vLLM's default."""
    params = SamplingParams(max_tokens=N, temperature=0.5, top_k=3, seed=11, ignore_eos=True, logprobs=2)
    prompt = PROMPTS[0]
    out = plain.generate([prompt], params)[0]
    check_against(reference, plain.tokenizer.encode(prompt), out, 2)
    assert all(e.rank <= 3 for e in out.logprobs)  # top-k 3 drew every token from the three best
    ids = plain.tokenizer.encode(prompt)
    rows = reference(ids + out.token_ids)[len(ids) - 1 : -1]
    tempered = torch.log_softmax(rows / 0.5, dim=-1).gather(1, torch.tensor(out.token_ids)[:, None])[:, 0]
    assert not torch.allclose(tempered, torch.tensor([e.logprob for e in out.logprobs]), atol=1e-3)


@pytest.mark.parametrize("budget", [512, 5])
def test_prompt_logprobs_match_a_full_forward(tiny, reference, budget):
    """Whole or in prefill chunks of 5, and after the same prompt filled the prefix cache: every prompt token
    but the first is scored by the verifier's rows over the prompt."""
    llm = make_llm(tiny, budget=budget)
    prompt = PROMPTS[4]
    ids = llm.tokenizer.encode(prompt)
    llm.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))  # its full blocks are now cached
    hits = llm.engine.kv.prefix_hit_blocks
    out = llm.generate([prompt], SamplingParams(max_tokens=3, prompt_logprobs=2, logprobs=1, **GREEDY))[0]
    assert llm.engine.kv.prefix_hit_blocks == hits  # a request scoring its prompt computes all of it
    assert len(out.prompt_logprobs) == len(ids) and out.prompt_logprobs[0] is None
    rows = reference(ids)
    for q, e in enumerate(out.prompt_logprobs[1:]):  # row q scores token q + 1
        assert e.token_id == ids[q + 1]
        assert e.logprob == pytest.approx(rows[q, ids[q + 1]].item(), abs=1e-4)
        assert [i for i, _ in e.top] == rows[q].topk(2).indices.tolist()
    check_against(reference, ids, out, 1)
    # the next request with that prompt, not scoring it, uses the cache again
    llm.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))
    assert llm.engine.kv.prefix_hit_blocks > hits


def test_prompt_logprobs_survive_preemption(tiny, reference):
    """A pool too small for both requests preempts one mid-way; its recomputation adds no duplicate rows."""
    llm = LLM(
        tiny["llama"],
        dtype="float32",
        cache=CacheConfig(num_blocks=12, block_size=4),
        scheduler=SchedulerConfig(max_num_batched_tokens=6),
    )
    prompts = [PROMPTS[1], PROMPTS[4]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, prompt_logprobs=0, logprobs=0, **GREEDY))
    assert llm.engine.metrics.preemptions > 0
    for prompt, out in zip(prompts, outs):
        ids = llm.tokenizer.encode(prompt)
        rows = reference(ids)
        got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
        torch.testing.assert_close(got, rows[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], atol=1e-4, rtol=0)
        check_against(reference, ids, out, 0)


def test_top_logprobs_are_sorted_and_hold_the_chosen_token(plain):
    params = SamplingParams(max_tokens=N, temperature=1.0, seed=3, ignore_eos=True, logprobs=5)
    for out in plain.generate(PROMPTS[:3], params):
        for e in out.logprobs:
            values = [lp for _, lp in e.top]
            assert len(e.top) == 5 and values == sorted(values, reverse=True)
            assert e.logprob <= values[0] + 1e-6 and e.rank >= 1
            if e.rank <= 5:  # the chosen token sits at its rank, with the same value
                assert e.top[e.rank - 1] == (e.token_id, e.logprob)
            else:
                assert e.token_id not in [i for i, _ in e.top] and e.logprob <= values[-1]


def test_no_logprobs_asked_costs_nothing(plain, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("logprobs computed for requests that did not ask")

    monkeypatch.setattr(engine_module, "token_logprobs", refuse)
    out = plain.generate(PROMPTS[:2], SamplingParams(max_tokens=4, **GREEDY))
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in out)


def test_token_logprobs_rows_in_passes(monkeypatch):
    """More rows than one pass holds give the same values as one pass."""
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    ids, ns = [3, 1, 4, 1, 5, 9, 2], [0, 1, 2, 3, 4, 5, 6]
    whole = token_logprobs(logits, ids, ns)
    monkeypatch.setattr("specserve.engine.logprobs.ROWS_PER_PASS", 3)
    assert token_logprobs(logits, ids, ns) == whole
    assert [len(e.top) for e in whole] == ns


def test_bad_counts_are_refused(plain):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="logprobs must be None or an integer >= 0"):
            SamplingParams(logprobs=bad)
        with pytest.raises(ValueError, match="prompt_logprobs must be None or an integer >= 0"):
            SamplingParams(prompt_logprobs=bad)
    vocab = plain.engine.verifier.arch.vocab_size
    with pytest.raises(ValueError, match=f"at most the vocabulary size \\({vocab}\\), got {vocab + 1}"):
        plain.generate(["To"], SamplingParams(logprobs=vocab + 1))


# ---- token text ---------------------------------------------------------------------------------


def test_byte_level_alphabet_is_a_bijection():
    table = byte_level_alphabet()
    assert len(table) == 256 and sorted(table.values()) == list(range(256))
    assert table["!"] == ord("!") and table["\u0120"] == ord(" ")  # 'Ġ' spells the space


def test_token_text_recovers_exact_bytes(plain):
    tok = plain.tokenizer
    text = TokenText(tok)
    s = "Héllo wörld 🙂"
    ids = tok.encode(s)
    assert b"".join(text(i)[1] for i in ids).decode() == s  # even where one token holds part of a character
    partial = [i for i in ids if text(i)[0] != text(i)[1].decode("utf-8", errors="replace")]
    assert partial, "expected a token holding part of a multi-byte character"
    assert all("\\x" in text(i)[0] for i in partial)
    assert text(tok.eos_token_id) == ("<|im_end|>", b"<|im_end|>")


# ---- server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tiny):
    config = EngineConfig(verifier=tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=64, block_size=4))
    engine = LLMEngine(config)
    with TestClient(build_app(AsyncEngine(engine, max_queue=8), MODEL)) as client:
        yield client, engine


def post(client, path: str, **body) -> dict:
    r = client.post(path, json={"model": MODEL, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream(client, path: str, **body) -> list[dict]:
    r = client.post(path, json={"model": MODEL, **body, "stream": True})
    assert r.status_code == 200, r.text
    data = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def same_chat_entries(a: list[dict], b: list[dict]) -> bool:
    """Equal tokens and bytes, logprobs within fp32 rounding (a prefix-cache hit computes the prompt's KV
    in other batch shapes than the first request did)."""

    def split(entries):
        flat = [e for entry in entries for e in [entry, *entry["top_logprobs"]]]
        return [(e["token"], e["bytes"]) for e in flat], [e["logprob"] for e in flat]

    (names_a, values_a), (names_b, values_b) = split(a), split(b)
    return names_a == names_b and values_a == pytest.approx(values_b, abs=1e-5)


def test_chat_logprobs_shape_and_values(served, plain):
    client, engine = served
    messages = [{"role": "user", "content": "Hello"}]
    out = post(client, "/v1/chat/completions", messages=messages, max_tokens=N, logprobs=True, top_logprobs=3, **GREEDY)
    oai_chat.ChatCompletion.model_validate(out)  # the official client's own model of the response
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"] == N
    # the engine's values for the same prompt ids, offline
    text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    ref = plain.generate([ids], SamplingParams(max_tokens=N, logprobs=3, **GREEDY))[0]
    names = TokenText(engine.tokenizer)
    for entry, e in zip(content, ref.logprobs):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert (entry["token"], bytes(entry["bytes"])) == names(e.token_id)
        assert entry["logprob"] == pytest.approx(e.logprob, abs=1e-5)
        assert [t["token"] for t in entry["top_logprobs"]] == [names(i)[0] for i, _ in e.top]
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True) and entry["logprob"] == values[0]  # greedy: the argmax
    # without logprobs the field stays null; logprobs alone gives no alternatives
    assert post(client, "/v1/chat/completions", messages=messages, max_tokens=2)["choices"][0]["logprobs"] is None
    alone = post(client, "/v1/chat/completions", messages=messages, max_tokens=2, logprobs=True, **GREEDY)
    assert [e["top_logprobs"] for e in alone["choices"][0]["logprobs"]["content"]] == [[], []]


def test_chat_stream_carries_the_same_logprobs(served):
    client, _ = served
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": N, "logprobs": True, "top_logprobs": 2}
    whole = post(client, "/v1/chat/completions", **body, **GREEDY)
    chunks = stream(client, "/v1/chat/completions", **body, **GREEDY)
    for c in chunks:
        oai_chat.ChatCompletionChunk.model_validate(c)
    streamed = [e for c in chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert same_chat_entries(streamed, whole["choices"][0]["logprobs"]["content"])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]


def test_completion_logprobs_shape(served, plain):
    client, engine = served
    prompt = PROMPTS[0]
    out = post(client, "/v1/completions", prompt=prompt, max_tokens=N, logprobs=2, **GREEDY)
    oai.Completion.model_validate(out)
    lp = out["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == N
    ref = plain.generate([prompt], SamplingParams(max_tokens=N, logprobs=2, **GREEDY))[0]
    names = TokenText(engine.tokenizer)
    assert lp["tokens"] == [names(i)[0] for i in ref.token_ids]
    assert lp["token_logprobs"] == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-5)
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 2 <= len(top) <= 3 and top[token] == value  # the two best and the chosen token
    starts = [0] + [o + len(t) for o, t in zip(lp["text_offset"], lp["tokens"])][:-1]
    assert lp["text_offset"] == starts


def test_echo_max_tokens_zero_scores_the_prompt(served, reference):
    """lm-eval-harness loglikelihood: echo, max_tokens 0, logprobs: the prompt's logprobs, nothing generated."""
    client, engine = served
    prompt = PROMPTS[1]
    ids = engine.tokenizer.encode(prompt)
    out = post(client, "/v1/completions", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    # (not oai.Completion.model_validate: the client's model has no null for the first token, which OpenAI's own
    # echo responses and vLLM's send; the client builds responses without validating them)
    (choice,) = out["choices"]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    rows = reference(ids)
    expected = rows[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp["tokens"]) == prompt and lp["text_offset"][0] == 0
    # token-id prompts score the same; streamed, one chunk says it all
    by_ids = post(client, "/v1/completions", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    assert by_ids["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]
    chunks = stream(client, "/v1/completions", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    assert [c["choices"][0] for c in chunks] == [choice]


def test_echo_with_generation(served):
    client, _ = served
    prompt = PROMPTS[0]
    plain_out = post(client, "/v1/completions", prompt=prompt, max_tokens=6, logprobs=1, **GREEDY)["choices"][0]
    echoed = post(client, "/v1/completions", prompt=prompt, max_tokens=6, logprobs=1, echo=True, **GREEDY)
    choice = echoed["choices"][0]
    assert choice["text"] == prompt + plain_out["text"]
    lp, gen = choice["logprobs"], plain_out["logprobs"]
    p = len(lp["tokens"]) - 6
    assert lp["tokens"][p:] == gen["tokens"]
    assert lp["token_logprobs"][p:] == pytest.approx(gen["token_logprobs"], abs=1e-5)  # (the prefix cache's rounding)
    assert lp["text_offset"][p:] == [len(prompt) + o for o in gen["text_offset"]]  # offsets index choice["text"]
    # echo without logprobs just prepends the prompt; n choices each echo it
    two = post(client, "/v1/completions", prompt=prompt, max_tokens=3, echo=True, n=2, **GREEDY)
    assert all(c["text"].startswith(prompt) and c["logprobs"] is None for c in two["choices"])


def test_completion_stream_carries_the_same_logprobs(served):
    client, _ = served
    body = {"prompt": PROMPTS[2], "max_tokens": N, "logprobs": 2, "echo": True, **GREEDY}
    whole = post(client, "/v1/completions", **body)["choices"][0]
    chunks = stream(client, "/v1/completions", **body)
    merged = {k: [] for k in whole["logprobs"]}
    for c in chunks:
        for k, v in c["choices"][0]["logprobs"].items():
            merged[k] += v
    expected = whole["logprobs"]
    assert merged["tokens"] == expected["tokens"] and merged["text_offset"] == expected["text_offset"]
    assert merged["token_logprobs"][0] is None and expected["token_logprobs"][0] is None
    assert merged["token_logprobs"][1:] == pytest.approx(expected["token_logprobs"][1:], abs=1e-5)
    assert [None if t is None else sorted(t) for t in merged["top_logprobs"]] == [
        None if t is None else sorted(t) for t in expected["top_logprobs"]
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


HI = [{"role": "user", "content": "hi"}]
BAD = [
    ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20], got 21"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": -1}, "top_logprobs", "got -1"),
    ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ("/v1/chat/completions", {"messages": HI, "logprobs": "yes please"}, "logprobs", "valid boolean"),
    ("/v1/completions", {"prompt": "To", "logprobs": 6}, "logprobs", "[0, 5], got 6"),
    ("/v1/completions", {"prompt": "To", "logprobs": -1}, "logprobs", "got -1"),
    ("/v1/completions", {"prompt": "To", "logprobs": 1.5}, "logprobs", "valid integer"),
    ("/v1/completions", {"prompt": "To", "max_tokens": 0}, "max_tokens", "max_tokens must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("path, body, param, needle", BAD)
def test_bad_logprob_values_give_openai_400(served, path, body, param, needle):
    client, _ = served
    r = client.post(path, json={"model": MODEL, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle in error["message"], error
