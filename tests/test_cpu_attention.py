"""The fp32 CPU paged-attention kernel (specserve/kernels/cpu_attention.c) and its place in the model.

Each query row reads its own context through the slot table: its output must be the same bits alone, in a
verification pass, or beside other requests of a batch (any slots, any order), and as close to exact attention
as SDPA is.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specserve.kernels import cpu_attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(), reason="no C compiler built the CPU kernels")


def exact(q, k_cache, v_cache, slots, lengths, scale):  # float64, one row at a time
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    rows = []
    for t in range(q.shape[0]):
        keys, values = k_cache[slots[t][: lengths[t]]].double(), v_cache[slots[t][: lengths[t]]].double()
        qt = q[t].double().view(kv_heads, heads // kv_heads, -1)
        p = torch.softmax(torch.einsum("kgd,jkd->kgj", qt, keys) * scale, -1)
        rows.append(torch.einsum("kgj,jkd->kgd", p, values).reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 32), (6, 2, 24), (2, 1, 80)])
def test_close_to_exact_and_rows_alone_equal_rows_together(heads, kv_heads, dim):
    torch.manual_seed(heads * dim)
    k_cache, v_cache = torch.randn(300, kv_heads, dim), torch.randn(300, kv_heads, dim)
    query_lens, context_lens = [7, 1, 33], [40, 18, 230]
    slots = torch.zeros(3, 230, dtype=torch.int64)
    order = torch.randperm(300)
    start = 0
    for b, c in enumerate(context_lens):  # disjoint, shuffled slots: no request's context lies in order
        slots[b, :c] = order[start : start + c]
        start += c
    q = torch.randn(sum(query_lens), heads, dim) * 2
    request, length = cpu_attention.row_layout(query_lens, context_lens)
    out = cpu_attention.paged_attention(q, k_cache, v_cache, slots, request, length, dim**-0.5)
    row_slots = [slots[int(b)] for b in request]
    reference = exact(q, k_cache, v_cache, row_slots, length.tolist(), dim**-0.5)
    assert (out.double() - reference).abs().max() < 2e-6
    for t in range(q.shape[0]):  # each row alone, as its request's single decode step would compute it
        b = int(request[t])
        alone = cpu_attention.paged_attention(
            q[t : t + 1], k_cache, v_cache, slots[b : b + 1].contiguous(), torch.zeros(1, dtype=torch.int64),
            length[t : t + 1].clone(), dim**-0.5,
        )
        assert torch.equal(alone[0], out[t])


def test_as_accurate_as_sdpa_on_a_long_context():
    torch.manual_seed(5)
    k_cache, v_cache = torch.randn(1024, 3, 64), torch.randn(1024, 3, 64)
    slots = torch.arange(1024).view(1, -1)
    q = torch.randn(8, 9, 64) * 3
    request, length = cpu_attention.row_layout([8], [1000])
    ours = cpu_attention.paged_attention(q, k_cache, v_cache, slots, request, length, 0.125)
    reference = exact(q, k_cache, v_cache, [slots[0]] * 8, length.tolist(), 0.125)
    keys, values = k_cache[:1000].permute(1, 0, 2)[None], v_cache[:1000].permute(1, 0, 2)[None]
    mask = torch.ones(8, 1000, dtype=torch.bool).tril(992)
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask, scale=0.125,
                                          enable_gqa=True)[0].transpose(0, 1).reshape(8, -1)
    assert (ours.double() - reference).abs().max() <= 2 * (sdpa.double() - reference).abs().max() + 1e-7


def test_row_layout_and_bad_arguments():
    request, length = cpu_attention.row_layout([2, 1, 3], [5, 1, 3])
    assert request.tolist() == [0, 0, 1, 2, 2, 2] and length.tolist() == [4, 5, 1, 1, 2, 3]
    with pytest.raises(ValueError, match="new tokens"):
        cpu_attention.row_layout([4], [3])
    k = torch.randn(8, 2, 16)
    request, length = cpu_attention.row_layout([1], [4])
    slots = torch.arange(4).view(1, 4)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_attention.paged_attention(torch.randn(1, 3, 16), k, k, slots, request, length, 0.25)  # 3 heads, 2 KV
    with pytest.raises(TypeError):
        cpu_attention.paged_attention(torch.randn(1, 4, 16), k, k, slots.int(), request, length, 0.25)
    with pytest.raises(TypeError):
        cpu_attention.paged_attention(torch.randn(1, 4, 16).double(), k, k, slots, request, length, 0.25)
    empty = cpu_attention.paged_attention(torch.randn(0, 4, 16), k, k, slots, request[:0], length[:0], 0.25)
    assert empty.shape == (0, 64)


def test_the_model_takes_it_for_fp32_on_the_cpu(tiny):
    """A tiny fp32 model's forward goes through the C kernel, and a batch of requests with shuffled KV blocks
    gives each request's rows the bits it gets alone."""
    from specserve.engine.model_runner import ModelRunner, TokenRun
    from specserve.model.loader import load_model

    model = load_model(tiny["llama"], "float32")
    calls = []
    original = cpu_attention.paged_attention

    def spy(*a, **kw):
        calls.append(a[0].shape[0])
        return original(*a, **kw)

    gen = torch.Generator().manual_seed(0)
    a_ids = torch.randint(0, model.arch.vocab_size, (21,), generator=gen).tolist()
    b_ids = torch.randint(0, model.arch.vocab_size, (9,), generator=gen).tolist()
    cpu_attention.paged_attention = spy
    try:
        with torch.inference_mode():
            alone = ModelRunner(model, 16, 4)
            alone.forward([TokenRun(a_ids[:18], 0, [9, 2, 7, 4, 11, 13], 1)])
            expected = alone.forward([TokenRun(a_ids[18:], 18, [9, 2, 7, 4, 11, 13], 3)])
            together = ModelRunner(model, 16, 4)
            together.forward([TokenRun(a_ids[:18], 0, [3, 14, 1, 8, 6, 15], 1), TokenRun(b_ids[:8], 0, [5, 0, 12], 1)])
            both = together.forward(
                [TokenRun(a_ids[18:], 18, [3, 14, 1, 8, 6, 15], 3), TokenRun(b_ids[8:], 8, [5, 0, 12], 1)]
            )
    finally:
        cpu_attention.paged_attention = original
    assert calls and all(n > 0 for n in calls)
    assert torch.equal(both[:3], expected)


def test_without_any_c_kernel_the_torch_path_gives_the_same_model(tiny, monkeypatch):
    """Where no C compiler is found every fp32 step falls back to torch (SDPA, F.rms_norm, oneDNN or F.linear):
    the same logits within fp32 rounding and the same greedy tokens."""
    from specserve.engine.model_runner import ModelRunner, TokenRun
    from specserve.kernels import cpu_norm, cpu_pointwise
    from specserve.model import upcast
    from specserve.model.loader import load_model

    ids = torch.randint(0, 250, (30,), generator=torch.Generator().manual_seed(3)).tolist()

    def logits():
        model = load_model(tiny["llama"], "float32")
        upcast.enable_upcast(model)
        with torch.inference_mode():
            runner = ModelRunner(model, 16, 4)
            runner.forward([TokenRun(ids[:24], 0, list(range(8)), 1)])
            return runner.forward([TokenRun(ids[24:], 24, list(range(8)), 6)])

    ours = logits()
    for module in (cpu_attention, cpu_norm, cpu_pointwise):
        monkeypatch.setattr(module, "applies", lambda *a: False)
    monkeypatch.setattr(upcast, "runs_cpu_kernel", lambda weight: False)
    torchs = logits()
    torch.testing.assert_close(torchs, ours, rtol=1e-4, atol=1e-4)
    assert torch.equal(torchs.argmax(-1), ours.argmax(-1))
