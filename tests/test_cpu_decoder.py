"""The decoder's layers in one C call (specserve/kernels/cpu_decoder.c) give the bits of the layer-by-layer path."""

import pytest
import torch

from specserve.kernels import cpu_decoder

pytestmark = pytest.mark.skipif(not cpu_decoder.available(), reason="no C compiler: the layers run one by one")


def _run(model, steps):
    """Logits of each step's forward (a list of TokenRun lists) on a fresh runner, and the KV cache after."""
    from specserve.engine.model_runner import ModelRunner

    with torch.inference_mode():
        runner = ModelRunner(model, 16, 8)
        return [runner.forward(runs) for runs in steps], runner.kv_cache.clone()


def _steps(vocab):
    """A prefill, a 3-token verification-shaped step, then two requests on shuffled blocks in one batch."""
    from specserve.engine.model_runner import TokenRun

    ids = torch.randint(0, vocab, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    a, b = [9, 2, 7, 4, 11, 13], [5, 0, 12, 3]
    return [
        [TokenRun(ids[:21], 0, a, 1)],
        [TokenRun(ids[21:24], 21, a, 3)],
        [TokenRun(ids[24:25], 24, a, 1), TokenRun(ids[25:35], 0, b, 1)],
        [TokenRun(ids[35:40], 25, a, 5), TokenRun(ids[30:31], 10, b, 1)],
    ]


def _bf16_numbers(model):
    """Round every weight to a bf16 number (as the default verifier's are), so linear layers read bf16 copies."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


@pytest.mark.parametrize("name,bf16_numbers", [("llama", False), ("qwen2", False), ("llama", True)])
def test_one_call_gives_the_bits_of_the_layers_one_by_one(tiny, monkeypatch, name, bf16_numbers):
    from specserve.model import upcast
    from specserve.model.loader import load_model

    model = load_model(tiny[name], "float32")
    if bf16_numbers:
        _bf16_numbers(model)
    upcast.enable_upcast(model)
    assert (model.layers[0].self_attn.qkv_proj.upcast.compact is not None) == bf16_numbers
    calls = []
    original = cpu_decoder.decoder_layers

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(cpu_decoder, "decoder_layers", spy)
    steps = _steps(model.arch.vocab_size)
    fused, fused_cache = _run(model, steps)
    assert calls == [21, 3, 11, 6]
    monkeypatch.setattr(cpu_decoder, "available", lambda: False)
    layered, layered_cache = _run(model, steps)
    assert len(calls) == 4  # the second run took the layers one by one
    for f, lay in zip(fused, layered, strict=True):
        assert torch.equal(f, lay)
    assert torch.equal(fused_cache, layered_cache)


def test_a_switch_of_packed_kernel_packs_and_points_again(tiny):
    """cpu_linear.set_amx changes the packed copies' layout: the layers pack again and the C call's pointer table
    is rebuilt, so it never reads a copy in the other layout (the same model, forwards before and after)."""
    from specserve.kernels import cpu_linear
    from specserve.model import upcast
    from specserve.model.loader import load_model

    was = cpu_linear.amx_on()
    if cpu_linear.set_amx(not was) == was:
        pytest.skip("one packed kernel only (no AMX)")
    cpu_linear.set_amx(was)
    model = _bf16_numbers(load_model(tiny["llama"], "float32"))
    upcast.enable_upcast(model)
    steps = _steps(model.arch.vocab_size)
    try:
        before, _ = _run(model, steps)
        cpu_linear.set_amx(not was)
        after, _ = _run(model, steps)
        qkv = model.layers[0].self_attn.qkv_proj
        assert qkv.upcast.compact.shape == cpu_linear.packed_shape(*qkv.weight.shape)
        for a, b in zip(before, after, strict=True):  # two kernels: the last bits may differ
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    finally:
        cpu_linear.set_amx(was)


def test_a_weight_changed_in_place_is_read_fresh(tiny):
    """The bf16 copies the kernel reads are checked every call, as the layer-by-layer path checks them."""
    from specserve.model import upcast
    from specserve.model.loader import load_model

    model = _bf16_numbers(load_model(tiny["llama"], "float32"))
    upcast.enable_upcast(model)
    steps = _steps(model.arch.vocab_size)[:2]
    before, _ = _run(model, steps)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight.mul_(2)  # still bf16 numbers: the copy is remade, not dropped
    after, _ = _run(model, steps)
    assert model.layers[0].mlp.down_proj.upcast.compact is not None
    fresh = _bf16_numbers(load_model(tiny["llama"], "float32"))
    with torch.no_grad():
        fresh.layers[0].mlp.down_proj.weight.mul_(2)
    upcast.enable_upcast(fresh)
    expected, _ = _run(fresh, steps)
    assert not torch.equal(before[0], after[0])
    assert torch.equal(after[0], expected[0]) and torch.equal(after[1], expected[1])


def test_other_models_and_autograd_keep_the_layers_one_by_one(tiny, monkeypatch):
    """Without enable_upcast (no linear layer on the C kernel), or with gradients wanted, no table is made."""
    from specserve.model import upcast
    from specserve.model.attention import AttentionMetadata
    from specserve.model.loader import load_model

    model = load_model(tiny["llama"], "float32")
    kv = torch.zeros(model.arch.num_layers, 2, 64, model.arch.num_kv_heads, model.arch.head_dim)
    meta = AttentionMetadata.build([4], [4], torch.arange(4), torch.arange(4)[None])
    x = torch.zeros(4, model.arch.hidden_size)
    with torch.inference_mode():
        assert model.fused_layers.table(model.layers, model.arch, x, kv, meta) is None  # not armed
    upcast.enable_upcast(model)
    with torch.inference_mode():
        table = model.fused_layers.table(model.layers, model.arch, x, kv, meta)
    assert table is not None and table.numel() == model.arch.num_layers * cpu_decoder.WEIGHTS_PER_LAYER
    assert model.fused_layers.table(model.layers, model.arch, x, kv, meta) is None  # gradients wanted: torch path


def test_an_eagle_heads_layer_in_one_call_gives_the_same_bits(tiny, monkeypatch):
    """The draft head's decoder layer takes the same C call (`EagleHead.fused_layers`), with the same bits."""
    from specserve.model.attention import AttentionMetadata
    from specserve.model.eagle import EagleHead
    from specserve.model.loader import load_model
    from specserve.model.upcast import enable_upcast

    torch.manual_seed(0)
    verifier = load_model(tiny["llama"], "float32")
    head = EagleHead(verifier)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    enable_upcast(verifier)
    enable_upcast(head)
    a = head.arch
    ids = torch.randint(0, a.vocab_size, (7,), generator=torch.Generator().manual_seed(2))
    features = torch.randn(7, a.hidden_size)
    slots = torch.randperm(32)[:7]

    def forward():
        kv = torch.zeros(1, 2, 32, a.num_kv_heads, a.head_dim)
        meta = AttentionMetadata.build([7], [7], slots, slots[None])
        with torch.inference_mode():
            return head(ids, torch.arange(7), kv, meta, features), kv

    calls = []
    original = cpu_decoder.decoder_layers
    monkeypatch.setattr(cpu_decoder, "decoder_layers", lambda *a, **k: calls.append(1) or original(*a, **k))
    fused, fused_kv = forward()
    monkeypatch.setattr(cpu_decoder, "available", lambda: False)
    layered, layered_kv = forward()
    assert calls == [1]
    assert torch.equal(fused, layered) and torch.equal(fused_kv, layered_kv)
