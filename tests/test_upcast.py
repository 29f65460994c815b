"""Upcast matmuls: a bf16 model's multi-row matmuls on fp32 weight copies (specserve/model/upcast.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import PROMPTS, greedy

from specserve import LLM
from specserve.config import CacheConfig, EngineConfig
from specserve.engine.model_runner import ModelRunner, TokenRun
from specserve.model import upcast
from specserve.model.loader import load_model
from specserve.model.upcast import Linear, UpcastWeight, enable_upcast, linear, packing_available, upcast_default


def test_linear_runs_multi_row_inputs_on_the_fp32_copy(monkeypatch):
    monkeypatch.setattr(upcast, "cpu_has_native_bf16", lambda: False)  # the AVX2 CPU this path is for
    torch.manual_seed(0)
    w, b = torch.randn(48, 32).bfloat16(), torch.randn(48).bfloat16()
    holder = UpcastWeight()
    rows = torch.randn(5, 32).bfloat16()
    out = linear(rows, w, b, holder)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), F.linear(rows.float(), w.float(), b.float()), rtol=1e-2, atol=1e-2)
    assert holder.weight.dtype == torch.float32
    # one row keeps the bf16 weights: the same call as without an upcast at all
    one = rows[:1]
    assert holder.key is not None and torch.equal(linear(one, w, b, holder), F.linear(one, w, b))
    # many rows (a prefill) and a batch of sequences: the same product, the output's shape and layout kept
    for shape in [(40, 32), (2, 3, 32)]:
        x = torch.randn(*shape).bfloat16()
        y = linear(x, w, b, holder)
        assert y.shape == (*shape[:-1], 48) and y.is_contiguous()
        assert torch.allclose(y.float(), F.linear(x.float(), w.float(), b.float()), rtol=1e-2, atol=1e-2)
    # a weight changed in place gets a fresh copy
    with torch.no_grad():
        w.mul_(2)
    again = linear(rows, w, b, holder).float()
    assert torch.allclose(again, F.linear(rows.float(), w.float(), b.float()), rtol=1e-2, atol=1e-2)


def test_a_weight_under_training_keeps_its_gradient():
    layer = Linear(8, 4).bfloat16()
    enable_upcast(layer)
    x = torch.randn(3, 8).bfloat16()
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    layer.requires_grad_(False)
    with torch.no_grad():  # frozen: the upcast path
        assert torch.equal(layer(x), F.linear(x.float(), layer.weight.float(), layer.bias.float()).bfloat16())


def test_auto_is_on_for_half_weights_on_a_cpu_without_native_bf16(monkeypatch):
    monkeypatch.setattr(upcast, "cpu_has_native_bf16", lambda: False)
    assert upcast_default("auto", torch.bfloat16, "cpu")
    assert upcast_default("auto", torch.float16, "cpu")
    assert upcast_default("auto", torch.float32, "cpu")  # the skinny form only, on the weights as they are
    assert not upcast_default("auto", torch.bfloat16, "cuda")
    assert not upcast_default("off", torch.bfloat16, "cpu") and upcast_default("on", torch.float32, "cuda")
    monkeypatch.setattr(upcast, "cpu_has_native_bf16", lambda: True)  # bf16 is packed as it is, not upcast
    assert upcast_default("auto", torch.bfloat16, "cpu") == packing_available()
    assert not upcast_default("auto", torch.float16, "cpu")
    with pytest.raises(ValueError, match="'sometimes'"):
        upcast_default("sometimes", torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="upcast_matmuls"):
        EngineConfig(verifier="x", upcast_matmuls="yes")


def test_a_bf16_model_gives_the_same_logits_within_bf16_rounding(tiny):
    """Prefill and a 4-token verification pass, with and without upcast: the same model, the same KV."""
    logits = {}
    for on in (False, True):
        model = load_model(tiny["llama"], "bfloat16")
        if on:
            enable_upcast(model)
        runner = ModelRunner(model, 8, 4)
        blocks = list(range(8))
        prompt = list(range(3, 20))
        first = runner.forward([TokenRun(prompt, 0, blocks, 1)])
        verify = runner.forward([TokenRun([5, 6, 7, 8], len(prompt), blocks, 4)])
        one = runner.forward([TokenRun([9], len(prompt) + 4, blocks, 1)])
        logits[on] = (first, verify, one)
    for off, on in zip(logits[False], logits[True], strict=True):
        scale = off.abs().max()
        assert (off - on).abs().max() <= 0.05 * scale  # bf16 rounding of different summation orders
        assert torch.equal(off.argmax(-1), on.argmax(-1))


def test_engine_arms_both_models_and_a_swapped_draft(tiny):
    llm = LLM(
        tiny["llama"],
        draft=tiny["draft"],
        dtype="bfloat16",
        cache=CacheConfig(num_blocks=64, block_size=4),
        upcast_matmuls="on",
    )
    engine = llm.engine
    assert engine.upcast
    linears = [m for m in engine.verifier.modules() if isinstance(m, Linear)]
    assert linears and all(m.upcast is not None for m in linears)
    assert engine.verifier.logits_upcast is not None
    assert all(m.upcast is not None for m in engine.proposer.runner.model.modules() if isinstance(m, Linear))
    fresh = load_model(tiny["draft"], "bfloat16")
    engine.swap_draft(fresh, "v2")
    assert all(m.upcast is not None for m in fresh.modules() if isinstance(m, Linear))
    out = llm.generate(PROMPTS[:2], greedy(12))
    assert all(len(o.token_ids) == 12 for o in out)
    off = LLM(tiny["llama"], dtype="float32", cache=CacheConfig(num_blocks=64, block_size=4), upcast_matmuls="off")
    assert not off.engine.upcast and off.engine.verifier.logits_upcast is None


def test_fp32_weights_take_the_skinny_form_without_a_copy():
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48)
    holder = UpcastWeight()
    for rows in (1, 2, 3, 16, 40):
        x = torch.randn(rows, 32)
        y = linear(x, w, b, holder)
        assert y.shape == (rows, 48) and y.is_contiguous()
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert holder.weight is None  # the weight itself, no copy


def test_a_weight_made_under_inference_mode_can_be_upcast():
    """A trimmed EAGLE head's output rows are derived under inference mode: no version counter to read."""
    with torch.inference_mode():
        w = torch.randn(48, 32).bfloat16()[:40].clone()
        x = torch.randn(5, 32).bfloat16()
        y = linear(x, w, None, UpcastWeight())
    torch.testing.assert_close(y.float(), F.linear(x.float(), w.float()), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not packing_available(), reason="no oneDNN packed linear in this torch build")
def test_bf16_on_a_cpu_with_native_bf16_is_packed_in_bf16(monkeypatch):
    """With AVX512-BF16/AMX the bf16 weights are packed as they are (no fp32 copy), from one row (padded to two),
    and each row's output is the same bits whatever the number of rows."""
    monkeypatch.setattr(upcast, "cpu_has_native_bf16", lambda: True)
    assert upcast_default("auto", torch.bfloat16, "cpu")
    torch.manual_seed(0)
    w, b = (torch.randn(96, 576) * 0.05).bfloat16(), torch.randn(96).bfloat16()
    x = torch.randn(12, 576).bfloat16()
    holder = UpcastWeight()
    alone = torch.cat([linear(x[i : i + 1], w, b, holder) for i in range(12)])
    assert holder.packed is not None and holder.weight is None and alone.dtype == torch.bfloat16
    torch.testing.assert_close(alone.float(), F.linear(x.float(), w.float(), b.float()), rtol=2e-2, atol=2e-2)
    for rows in range(2, 13):
        assert torch.equal(linear(x[:rows], w, b, holder), alone[:rows])
