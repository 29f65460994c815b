"""EAGLE-3's fused features: the verifier taps the inputs of some layers beside its last output, a head with
`feature_layers` fuses them, and serving, hot swaps and training keep every output the verifier's."""

from __future__ import annotations

import json

import pytest
import torch
from test_distill import GREEDY, bigram_verifier, prompt_file  # noqa: F401
from test_eagle import build_head, make
from test_eagle_distill import config
from tiny_models import PROMPTS, greedy

from specserve.distill.eagle_trainer import train_eagle
from specserve.engine.eagle_proposer import EagleProposer
from specserve.engine.model_runner import ModelRunner, TokenRun
from specserve.kernels import cpu_decoder
from specserve.model.eagle import EagleHead, load_eagle
from specserve.model.loader import load_model
from specserve.model.upcast import enable_upcast


def _features(model, tokens: list[int]) -> torch.Tensor:
    runner = ModelRunner(model, 32, 4)
    return runner.run([TokenRun(tokens, 0, list(range(32)), 1)], keep_features=True).features


def _fused_head(verifier_dir: str, plain_dir: str, out: str, seed: int = 3) -> str:
    """A fused head (layer 1 tapped) with the plain head's weights and a random fusing layer."""
    verifier = load_model(verifier_dir, torch.float32, "cpu")
    plain = load_eagle(plain_dir, verifier, verifier_dir)
    head = EagleHead(verifier, plain.draft_vocab if plain.trimmed else None, (1,))
    head.load_state_dict(plain.state_dict(), strict=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        head.fuse.weight.normal_(0, 0.1)
    head.save(out, verifier_dir)
    return out


@pytest.fixture(scope="module")
def heads(tiny, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fused")
    plain = build_head(tiny["llama"], str(root / "plain"))
    return {"plain": plain, "fused": _fused_head(tiny["llama"], plain, str(root / "fused"))}


@pytest.mark.parametrize("one_call", [True, False])
def test_taps_are_the_residual_stream_entering_each_layer(tiny, monkeypatch, one_call):
    model = load_model(tiny["llama"], torch.float32, "cpu")
    enable_upcast(model)
    if not one_call:
        monkeypatch.setattr(cpu_decoder, "available", lambda: False)
    tokens = torch.randint(0, model.arch.vocab_size, (13,), generator=torch.Generator().manual_seed(0)).tolist()
    plain = _features(model, tokens)
    model.feature_layers = (1,)
    wide = _features(model, tokens)
    h = model.arch.hidden_size
    assert wide.shape == (13, 2 * h)
    assert torch.equal(wide[:, h:], plain)  # the last layer's output is unchanged, after the taps
    # layer 1's input: the embedding plus layer 0's attention and MLP, as the layer-by-layer path sums them
    with torch.inference_mode():
        x = model.embed_tokens(torch.tensor(tokens))
        runner = ModelRunner(model, 32, 4)
        from specserve.model.attention import AttentionMetadata

        meta = AttentionMetadata.build([13], [13], torch.arange(13), torch.arange(13)[None], rows_only=True)
        cos, sin = model.rotary(torch.arange(13), x.dtype)
        x1, pending = model.layers[0].step(x, None, cos, sin, runner.kv_cache[0, 0], runner.kv_cache[0, 1], meta)
    torch.testing.assert_close(wide[:, :h], x1 + pending, rtol=1e-5, atol=1e-5)


def test_one_call_and_layer_by_layer_taps_are_the_same_bits(tiny, monkeypatch):
    if not cpu_decoder.available():
        pytest.skip("no C compiler")
    model = load_model(tiny["llama"], torch.float32, "cpu")
    enable_upcast(model)
    model.feature_layers = (1,)
    tokens = list(range(3, 30))
    fused = _features(model, tokens)
    monkeypatch.setattr(cpu_decoder, "available", lambda: False)
    assert torch.equal(fused, _features(model, tokens))


def test_a_fused_head_starts_as_the_plain_head_and_round_trips(tiny, heads, tmp_path):
    verifier = load_model(tiny["llama"], torch.float32, "cpu")
    plain = load_eagle(heads["plain"], verifier, tiny["llama"])
    fresh = EagleHead(verifier, None, (1,))
    fresh.load_state_dict(plain.state_dict(), strict=False)  # fuse: a pass-through of the last layer's output
    h = verifier.arch.hidden_size
    assert fresh.feature_width == 2 * h
    from specserve.engine.model_runner import ModelRunner as Runner

    a, b = Runner(plain, 8, 4), Runner(fresh, 8, 4)
    last, low = torch.randn(5, h), torch.randn(5, h)
    run = [TokenRun([1, 2, 3, 4, 5], 0, [0, 1], 5)]
    with torch.inference_mode():
        expected = a.run(run, last).hidden
        torch.testing.assert_close(b.run(run, torch.cat([low, last], dim=1)).hidden, expected, rtol=0, atol=0)
        # the head's own predicted features are hidden wide and skip the fusing layer
        torch.testing.assert_close(b.run(run, last).hidden, expected, rtol=0, atol=0)
    loaded = load_eagle(heads["fused"], verifier, tiny["llama"])
    assert loaded.feature_layers == (1,)
    assert json.load(open(f"{heads['fused']}/config.json"))["feature_layers"] == [1]
    assert not torch.equal(loaded.fuse.weight[:, h:], torch.eye(h))  # the saved random fusing layer came back
    with pytest.raises(ValueError, match="feature_layers"):
        EagleHead(verifier, None, (verifier.arch.num_layers,))
    with pytest.raises(ValueError, match="wide"):
        fresh(torch.tensor([1]), torch.tensor([0]), b.kv_cache, None, torch.zeros(1, 3 * h))


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_with_a_fused_head_equals_plain_greedy(tiny, heads, k):
    spec = make(tiny, heads["fused"], k)
    assert isinstance(spec.engine.proposer, EagleProposer) and spec.engine.verifier.feature_layers == (1,)
    widths = []
    original = spec.engine.proposer.catchup_features

    def spy(items):
        out = original(items)
        widths.append(out.shape[1])
        return out

    spec.engine.proposer.catchup_features = spy
    plain = make(tiny, None, None)
    expected = [c.token_ids for c in plain.generate(PROMPTS, greedy(32))]
    assert [c.token_ids for c in spec.generate(PROMPTS, greedy(32))] == expected
    h = spec.engine.verifier.arch.hidden_size
    assert widths and set(widths) == {2 * h}  # the head reads the tapped features, fused
    assert spec.engine.metrics.spec(spec.engine.draft_version).drafted_tokens > 0
    assert spec.engine.kv.num_free_blocks == spec.engine.num_blocks


def test_hot_swaps_between_plain_and_fused_heads_change_no_output(tiny, heads):
    spec = make(tiny, heads["plain"], 3)
    plain = make(tiny, None, None)
    expected = [c.token_ids for c in plain.generate(PROMPTS, greedy(40))]
    eng = spec.engine
    ids = [eng.add_request(p, greedy(40)) for p in PROMPTS]
    verifier = eng.verifier
    swaps = [("fused", (1,)), ("plain", ())]
    outputs, steps = {}, 0
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                outputs[out.request_id] = out.token_ids
        steps += 1
        if steps % 4 == 0 and swaps:
            which, layers = swaps.pop(0)
            eng.swap_draft(load_eagle(heads[which], verifier, tiny["llama"]), f"v{which}")
            assert verifier.feature_layers == layers
            assert all(r.features is None for r in eng.requests.values())  # the old width is dropped
    assert not swaps
    assert [outputs[i] for i in ids] == expected
    assert eng.kv.num_free_blocks == eng.num_blocks


@pytest.mark.integration
def test_a_fused_head_trains_from_a_plain_one_and_serves(bigram_verifier, prompt_file, tmp_path):  # noqa: F811
    plain = tmp_path / "plain"
    train_eagle(config(bigram_verifier, prompt_file, plain, steps=20, eval_every=20))
    out = tmp_path / "fused"
    result = train_eagle(config(bigram_verifier, prompt_file, out, init_head=str(plain), feature_layers=(1,)))
    record = json.load(open(out / "distill.json"))
    evals = [h for h in record["history"] if "agreement" in h]
    # it starts where the plain head ended (the fusing layer passes the last layer's output through)
    plain_best = json.load(open(plain / "distill.json"))["history"]
    assert abs(evals[0]["agreement"] - [h for h in plain_best if "agreement" in h][-1]["agreement"]) < 1e-6
    assert result["best"]["agreement"] >= evals[0]["agreement"]
    assert json.load(open(out / "config.json"))["feature_layers"] == [1]
    from specserve import LLM
    from specserve.config import CacheConfig

    cache = CacheConfig(num_blocks=128, block_size=4)
    own = LLM(bigram_verifier, draft=str(out), dtype="float32", num_speculative_tokens=3, cache=cache)
    reference = LLM(bigram_verifier, dtype="float32", cache=cache)
    assert [c.token_ids for c in own.generate(PROMPTS, GREEDY)] == [
        c.token_ids for c in reference.generate(PROMPTS, GREEDY)
    ]
    with pytest.raises(ValueError, match="fused head starts only"):
        train_eagle(config(bigram_verifier, prompt_file, tmp_path / "x", init_head=str(out), feature_layers=()))
