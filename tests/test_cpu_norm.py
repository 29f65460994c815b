"""The fp32 CPU RMSNorm kernel (specserve/kernels/cpu_norm.c) and its place in the model.

Row-invariant (a row's bits never depend on the rows beside it), within float rounding of F.rms_norm and of
float64, the fused residual add exactly torch's add; the model's fused layer loop gives the bits of the plain one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specserve.kernels import cpu_norm

pytestmark = pytest.mark.skipif(not cpu_norm.available(), reason="no C compiler built the CPU kernels")


@pytest.mark.parametrize("hidden", [576, 64, 37, 15, 1])
def test_rows_alone_and_together_and_close_to_float64(hidden):
    torch.manual_seed(hidden)
    x, w = torch.randn(40, hidden) * 3, torch.randn(hidden)
    every = cpu_norm.rms_norm(x, w, 1e-5)
    for i in range(len(x)):
        assert torch.equal(cpu_norm.rms_norm(x[i : i + 1], w, 1e-5)[0], every[i])
    exact = w.double() * (x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5))
    ours, torchs = (every.double() - exact).abs().max(), (F.rms_norm(x, (hidden,), w, 1e-5).double() - exact).abs()
    assert ours <= 4 * max(torchs.max().item(), 1e-7)
    assert torch.allclose(every, F.rms_norm(x, (hidden,), w, 1e-5), rtol=1e-5, atol=1e-6)


def test_add_then_norm_is_the_add_and_the_norm():
    torch.manual_seed(1)
    x, h, w = torch.randn(3, 7, 576), torch.randn(3, 7, 576), torch.randn(576)
    total, normed = cpu_norm.add_rms_norm(x, h, w, 1e-6)
    assert torch.equal(total, x + h)
    assert torch.equal(normed, cpu_norm.rms_norm(x + h, w, 1e-6))
    assert total.shape == normed.shape == x.shape
    empty = torch.empty(0, 576)
    assert cpu_norm.add_rms_norm(empty, empty, w, 1e-6)[1].shape == (0, 576)


def test_bad_arguments_and_where_it_does_not_apply():
    w = torch.randn(8)
    with pytest.raises(ValueError, match="features"):
        cpu_norm.rms_norm(torch.randn(2, 9), w, 1e-5)
    with pytest.raises(ValueError, match="must match"):
        cpu_norm.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), w, 1e-5)
    with pytest.raises(TypeError):
        cpu_norm.rms_norm(torch.randn(2, 8).double(), w, 1e-5)
    assert not cpu_norm.applies(torch.randn(2, 8).bfloat16(), w)
    assert not cpu_norm.applies(torch.randn(2, 8, requires_grad=True), w)  # training: torch's, so gradients flow
    with torch.no_grad():
        assert cpu_norm.applies(torch.randn(2, 8, requires_grad=True), w)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_the_fused_layer_loop_gives_the_plain_loops_bits(tiny, name):
    """LlamaModel runs its layers through `DecoderLayer.step` (the residual add fused into the next norm); a loop
    of `DecoderLayer.forward` (the adds apart) gives the same hidden states bit for bit."""
    from specserve.engine.model_runner import ModelRunner, TokenRun
    from specserve.model.loader import load_model

    model = load_model(tiny[name], "float32")
    ids = torch.randint(0, model.arch.vocab_size, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    captured = {}
    with torch.inference_mode():
        runner = ModelRunner(model, 8, 4)
        original = model.forward

        def plain(input_ids, positions, kv_cache, meta):  # the same layers, each through forward()
            x = model.embed_tokens(input_ids)
            cos, sin = model.rotary(positions, x.dtype)
            for i, layer in enumerate(model.layers):
                x = layer(x, cos, sin, kv_cache[i, 0], kv_cache[i, 1], meta)
            return x

        for label, fn in (("fused", original), ("plain", plain)):
            model.forward = fn
            runner.forward([TokenRun(ids[:20], 0, [0, 1, 2, 3, 4, 5], 1)])
            captured[label] = runner.forward([TokenRun(ids[20:], 20, [0, 1, 2, 3, 4, 5], 3)])
        model.forward = original
    assert torch.equal(captured["fused"], captured["plain"])
