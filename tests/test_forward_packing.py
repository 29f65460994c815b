"""The cheap small-batch forward: fused projections, oneDNN-packed fp32 weights (the fallback where no C compiler
builds our own kernel, tests/test_cpu_linear.py), the attention view and fold.

Fused q/k/v and gate/up projections concatenate weights along output rows, which leaves every output's
reduction as it was: the fused products are the separate ones, bit for bit. The packed fp32 path
(specserve/model/upcast.py) sums in its own order, so it is compared with F.linear within fp32
rounding, and its rows with themselves across row counts (the property that makes a verification
pass's linear layers compute what the decode steps would). The attention's view of a run of slots and
its grouped-query fold are checked against the gather and `enable_gqa`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from specserve.engine.model_runner import ModelRunner, TokenRun
from specserve.model import upcast
from specserve.model.attention import AttentionMetadata, paged_attention
from specserve.model.loader import load_model
from specserve.model.upcast import UpcastWeight, enable_upcast, linear, packing_available

needs_packing = pytest.mark.skipif(
    not packing_available(), reason="no oneDNN packed linear in this torch build: fp32 takes the skinny form"
)


@pytest.fixture
def without_c_kernel(monkeypatch):
    """fp32 weights take oneDNN's packed copy, as where no C compiler built specserve/kernels/cpu_linear.c."""
    monkeypatch.setattr(upcast, "runs_cpu_kernel", lambda weight: False)


@pytest.mark.parametrize("armed", [False, True], ids=["F.linear", "upcast"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])  # qwen2: q/k/v bias
def test_fused_projections_are_the_separate_ones_bit_for_bit(tiny, name, armed):
    model = load_model(tiny[name], "float32")
    if armed:
        enable_upcast(model)
    hf = load_file(f"{tiny[name]}/model.safetensors")
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    p = "model.layers.0."
    qkv = [(hf[p + f"self_attn.{n}_proj.weight"].float(), hf.get(p + f"self_attn.{n}_proj.bias")) for n in "qkv"]
    gate_up = [(hf[p + f"mlp.{n}_proj.weight"].float(), None) for n in ("gate", "up")]
    torch.manual_seed(0)
    with torch.inference_mode():
        for rows in (1, 2, 3, 5, 8, 40):
            x = torch.randn(rows, model.arch.hidden_size)
            for fused, parts in ((attn.qkv_proj, qkv), (mlp.gate_up_proj, gate_up)):
                separate = [
                    linear(x, w, None if b is None else b.float(), UpcastWeight() if armed else None) for w, b in parts
                ]
                assert torch.equal(fused(x), torch.cat(separate, dim=-1))


@needs_packing
def test_packed_linear_is_f_linear_within_fp32_rounding(without_c_kernel):
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48)
    for bias in (None, b):
        holder = UpcastWeight()
        for shape in [(1, 32), (2, 32), (3, 32), (8, 32), (17, 32), (300, 32), (2, 5, 32), (0, 32)]:
            x = torch.randn(*shape)
            y = linear(x, w, bias, holder)
            assert y.shape == (*shape[:-1], 48) and y.is_contiguous() and y.dtype == torch.float32
            torch.testing.assert_close(y, F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
        assert holder.packed is not None and holder.weight is None  # no dense copy of an fp32 weight
    with torch.no_grad():  # a weight changed in place is packed again
        w.mul_(-1)
    x = torch.randn(4, 32)
    torch.testing.assert_close(linear(x, w, b, holder), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_packing
@pytest.mark.parametrize("in_features", [576, 1536])  # SmolLM2's two reduction lengths
def test_packed_rows_do_not_depend_on_how_many_rows_there_are(in_features, without_c_kernel):
    torch.manual_seed(0)
    w = torch.randn(96, in_features) * 0.05
    x = torch.randn(16, in_features)
    holder = UpcastWeight()
    alone = torch.cat([linear(x[i : i + 1], w, None, holder) for i in range(16)])  # [16, 96]
    for rows in range(2, 17):
        assert torch.equal(linear(x[:rows], w, None, holder), alone[:rows])


def _attention_inputs(context_slots: torch.Tensor, query_len: int):
    torch.manual_seed(0)
    num_slots, heads, kv_heads, head_dim = 64, 6, 2, 8
    k_cache, v_cache = torch.randn(num_slots, kv_heads, head_dim), torch.randn(num_slots, kv_heads, head_dim)
    context_len = context_slots.shape[1]
    slot_mapping = context_slots[0, context_len - query_len :]
    meta = AttentionMetadata.build([query_len], [context_len], slot_mapping, context_slots)
    q = torch.randn(query_len, heads, head_dim)
    k, v = torch.randn(query_len, kv_heads, head_dim), torch.randn(query_len, kv_heads, head_dim)
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.parametrize("query_len", [1, 3, 8])
def test_attention_reads_a_run_of_slots_as_a_view_and_folds_query_groups(query_len):
    run = torch.arange(8, 8 + 20)[None]  # [1, 20]: one request, its slots in order
    q, k, v, k_cache, v_cache, meta = _attention_inputs(run, query_len)
    assert meta.context_start == 8
    out = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.3)
    gathered = AttentionMetadata(**{**vars(meta), "context_start": None})
    assert torch.equal(paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), gathered, 0.3), out)
    # the reference: written pool, gathered context, enable_gqa
    k_cache[meta.slot_mapping], v_cache[meta.slot_mapping] = k, v
    keys, values = k_cache[run].transpose(1, 2), v_cache[run].transpose(1, 2)
    ref = F.scaled_dot_product_attention(
        q[None].transpose(1, 2), keys, values, attn_mask=meta.mask, scale=0.3, enable_gqa=True
    )  # [1, heads, query_len, head_dim]
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(query_len, -1), rtol=1e-6, atol=1e-6)
    shuffled = torch.cat([run[:, 4:8], run[:, :4], run[:, 8:]], dim=1)
    assert _attention_inputs(shuffled, query_len)[-1].context_start is None


def test_a_verification_pass_scores_what_decode_steps_score_fp32(tiny):
    model = load_model(tiny["llama"], "float32")
    enable_upcast(model)
    runner = ModelRunner(model, 16, 4)
    blocks = list(range(16))
    prompt, drafts = list(range(3, 30)), [40, 41, 42, 43, 44]
    runner.forward([TokenRun(prompt, 0, blocks, 1)])
    verify = runner.forward([TokenRun(drafts, len(prompt), blocks, len(drafts))])
    steps = torch.cat([runner.forward([TokenRun([t], len(prompt) + i, blocks, 1)]) for i, t in enumerate(drafts)])
    torch.testing.assert_close(verify, steps, rtol=1e-5, atol=1e-5)
    assert torch.equal(verify.argmax(-1), steps.argmax(-1))
