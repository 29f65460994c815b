"""The row-invariant fp32 CPU linear kernel (specserve/kernels/cpu_linear.c) and its place in `upcast.linear`.

The property the kernel exists for: a row's output is the same bits whatever the number of rows beside it, so
a verification pass computes its linear layers exactly as the decode steps it replaces. Its accuracy is checked
against float64 (it is at least as close as F.linear), and the engine's fp32 default is shown to take it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specserve.kernels import cpu_build, cpu_linear, cpu_norm
from specserve.model import upcast
from specserve.model.upcast import UpcastWeight, linear

pytestmark = pytest.mark.skipif(not cpu_linear.available(), reason="no C compiler built the CPU linear kernel")

# SmolLM2's reduction lengths, a tiny model's, and lengths that leave a tail after the 16-wide lanes
SHAPES = [(576, 96), (1536, 40), (64, 192), (37, 11), (15, 7), (1, 3)]


@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_rows_do_not_depend_on_how_many_rows_there_are(in_features, out_features):
    torch.manual_seed(0)
    w, b = torch.randn(out_features, in_features) * 0.05, torch.randn(out_features)
    x = torch.randn(140, in_features)  # more than one 64-row block of the kernel
    for bias in (None, b):
        every = cpu_linear.linear_f32(x, w, bias)
        alone = torch.cat([cpu_linear.linear_f32(x[i : i + 1], w, bias) for i in range(20)])
        assert torch.equal(alone, every[:20])
        for start, rows in [(0, 2), (0, 3), (1, 4), (5, 5), (3, 8), (7, 9), (0, 17), (60, 70)]:
            assert torch.equal(cpu_linear.linear_f32(x[start : start + rows], w, bias), every[start : start + rows])


@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_it_is_at_least_as_accurate_as_f_linear(in_features, out_features):
    torch.manual_seed(1)
    w, b, x = torch.randn(out_features, in_features), torch.randn(out_features), torch.randn(33, in_features)
    exact = F.linear(x.double(), w.double(), b.double())
    ours, theirs = cpu_linear.linear_f32(x, w, b), F.linear(x, w, b)
    assert ours.dtype == torch.float32 and ours.shape == (33, out_features)
    # a sum of in_features fp32 products: within a few ulps of the largest partial sum
    bound = 4 * in_features * torch.finfo(torch.float32).eps * (x.abs() @ w.abs().t() + b.abs()).double()
    assert ((ours.double() - exact).abs() <= bound).all()
    assert (ours.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max() + 1e-6


def test_leading_dims_empty_input_and_bad_arguments():
    torch.manual_seed(2)
    w = torch.randn(24, 32)
    x = torch.randn(2, 5, 32)
    y = cpu_linear.linear_f32(x, w)
    assert y.shape == (2, 5, 24) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert cpu_linear.linear_f32(torch.zeros(0, 32), w).shape == (0, 24)
    strided = torch.randn(32, 10).t()  # a non-contiguous input is copied
    torch.testing.assert_close(cpu_linear.linear_f32(strided, w), F.linear(strided, w), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        cpu_linear.linear_f32(torch.randn(3, 31), w)
    with pytest.raises(TypeError):
        cpu_linear.linear_f32(torch.randn(3, 32).double(), w)
    with pytest.raises(ValueError, match="contiguous"):
        cpu_linear.linear_f32(torch.randn(3, 32), torch.randn(32, 24).t())


@pytest.fixture(params=[False, True], ids=["outer-product", "amx"])
def packed_kernel(request):
    """Each packed-kernel test runs on the outer-product kernel and, where the CPU has AMX, on the tile unit."""
    was = cpu_linear.amx_on()
    if cpu_linear.set_amx(request.param) != request.param:
        cpu_linear.set_amx(was)
        pytest.skip("this CPU (or its kernel, or compiler) has no AMX")
    yield request.param
    cpu_linear.set_amx(was)


@pytest.mark.parametrize("in_features,out_features", [(64, 40), (37, 9), (576, 24), (1536, 130), (7, 1)])
def test_a_packed_copy_of_bf16_numbers_keeps_every_row_invariant(in_features, out_features, packed_kernel):
    """A weight of bf16 numbers is read from its packed bf16 copy (cpu_linear.pack_bf16) by every row count: each
    output is one fixed sum (one multiply-add chain in input order; on AMX three chains over x's three bf16
    pieces), so a row's bits are the same alone, among 8 (a verification pass) or among 70 (a prefill chunk, past
    one 64-row block), on one thread or two; as accurate as fp32 sums."""
    torch.manual_seed(in_features + out_features)
    w = torch.randn(out_features, in_features).bfloat16().float()
    b = torch.randn(out_features)
    packed = cpu_linear.pack_bf16(w)
    group = cpu_linear.packed_group()
    assert packed is not None and packed.dtype == torch.bfloat16
    assert packed.shape == cpu_linear.packed_shape(out_features, in_features) and group > 0
    assert torch.equal(cpu_linear.unpack_bf16(packed, out_features, in_features).float(), w)
    x = torch.randn(70, in_features)
    exact = x.double() @ w.double().T + b.double()
    scale = x.double().abs() @ w.double().abs().T + b.double().abs()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            every = cpu_linear.linear_f32(x, w, b, packed)
            assert ((every.double() - exact).abs() / scale).max() < in_features * 2**-23
            for rows in [1, 2, 3, 5, 6, 7, 8, 9, 13, 64, 65]:
                assert torch.equal(cpu_linear.linear_f32(x[:rows], w, b, packed), every[:rows]), rows
            for i in range(0, len(x), 7):
                assert torch.equal(cpu_linear.linear_f32(x[i : i + 1], w, b, packed)[0], every[i])
    finally:
        torch.set_num_threads(threads)


def test_the_amx_kernel_keeps_infinities_and_is_closer_to_float64(packed_kernel):
    """x's split into bf16 pieces leaves an infinity whole (inf - inf is not taken), and NaN stays NaN; the three
    piece sums are at least as close to float64 as one fp32 chain (the outer-product kernel's)."""
    torch.manual_seed(5)
    w = torch.randn(40, 96).bfloat16().float()
    x = torch.randn(5, 96)
    x[1, 7], x[2, 30], x[3, 3] = float("inf"), float("-inf"), float("nan")
    x[4, 90] = torch.tensor([0x7F800001], dtype=torch.int32).view(torch.float32)[0]  # a NaN in the low bits only
    got = cpu_linear.linear_f32(x, w, None, cpu_linear.pack_bf16(w))
    want = x.double() @ w.double().T  # inf * w[n, 7] is +-inf for every n (no weight is 0)
    assert torch.equal(got[0], got[0]) and torch.equal(torch.isinf(got[1:3]), torch.isinf(want[1:3]))
    assert torch.equal(torch.sign(got[1:3]), torch.sign(want[1:3])) and torch.isnan(got[3:]).all()
    x = torch.randn(64, 1536)
    w = torch.randn(48, 1536).bfloat16().float()
    exact = x.double() @ w.double().T
    err = (cpu_linear.linear_f32(x, w, None, cpu_linear.pack_bf16(w)).double() - exact).abs().mean()
    chain = (F.linear(x, w).double() - exact).abs().mean()  # any fp32 summation order, for scale
    assert err < 2 * chain


def test_a_switch_of_kernel_repacks_the_holders_copy():
    """cpu_linear.set_amx changes the packed layout; a holder packed before packs again instead of handing the
    kernel a copy in the other layout."""
    was = cpu_linear.amx_on()
    if cpu_linear.set_amx(not was) == was:
        pytest.skip("one packed kernel only (no AMX)")
    cpu_linear.set_amx(was)
    torch.manual_seed(6)
    w, b, x = torch.randn(40, 37).bfloat16().float(), torch.randn(40), torch.randn(3, 37)
    holder = UpcastWeight()
    try:
        for amx in (was, not was, was):
            cpu_linear.set_amx(amx)
            got = linear(x, w, b, holder)
            assert holder.compact.shape == cpu_linear.packed_shape(40, 37)
            assert torch.equal(got, cpu_linear.linear_f32(x, w, b, cpu_linear.pack_bf16(w)))
    finally:
        cpu_linear.set_amx(was)


def test_exact_bf16_refuses_numbers_bf16_cannot_hold():
    w = torch.randn(8, 16).bfloat16().float()
    assert cpu_linear.exact_bf16(w) is not None
    w[3, 5] += 2.0**-20 * w[3, 5].abs()  # one number off the bf16 grid
    assert cpu_linear.exact_bf16(w) is None
    assert cpu_linear.exact_bf16(torch.randn(4, 4).double()) is None
    nan = torch.zeros(2, 2)
    nan[0, 0] = float("nan")
    assert cpu_linear.exact_bf16(nan) is None  # a NaN is never equal: the fp32 weight is kept
    assert cpu_linear.exact_bf16(torch.tensor([[1.0, float("inf")]])) is None  # not finite: not packed
    with pytest.raises(ValueError, match="pack_bf16"):
        cpu_linear.linear_f32(torch.randn(2, 16), w, None, torch.zeros(8, 16))  # fp32, not a packed copy


def test_upcast_linear_reads_the_bf16_copy_of_a_bf16_checkpoint():
    """The default verifier's case: a bf16 checkpoint run in fp32. The holder keeps a packed bf16 copy; a change
    of the weight in place makes a fresh one."""
    torch.manual_seed(4)
    w, b = torch.randn(48, 32).bfloat16().float(), torch.randn(48)
    holder = UpcastWeight()
    x = torch.randn(5, 32)
    assert torch.equal(linear(x, w, b, holder), cpu_linear.linear_f32(x, w, b, cpu_linear.pack_bf16(w)))
    assert holder.compact is not None and torch.equal(cpu_linear.unpack_bf16(holder.compact, 48, 32).float(), w)
    w.mul_(2)  # in place: still bf16 numbers, a new copy
    assert torch.equal(linear(x, w, b, holder), cpu_linear.linear_f32(x, w, b, cpu_linear.pack_bf16(w)))
    assert torch.equal(cpu_linear.unpack_bf16(holder.compact, 48, 32).float(), w)
    w.add_(1e-4)  # now off the bf16 grid: no copy, the fp32 weight itself
    assert torch.equal(linear(x, w, b, holder), cpu_linear.linear_f32(x, w, b))
    assert holder.compact is None


def test_upcast_linear_takes_it_for_fp32_weights_without_a_copy():
    torch.manual_seed(3)
    w, b = torch.randn(48, 32), torch.randn(48)
    holder = UpcastWeight()
    x = torch.randn(9, 32)
    assert upcast.runs_cpu_kernel(w) and not upcast.packs(w)
    assert torch.equal(linear(x, w, b, holder), cpu_linear.linear_f32(x, w, b))
    assert holder.packed is None and holder.weight is None  # no copy: the weight as it is
    assert holder.compact is None  # random fp32 numbers: no bf16 copy either
    assert torch.equal(linear(x, w, b, None), F.linear(x, w, b))  # not armed (--upcast-matmuls off): F.linear
    wg = w.clone().requires_grad_(True)
    linear(x, wg, b, holder).sum().backward()  # under training: F.linear, so the gradient flows
    assert wg.grad is not None and wg.grad.abs().sum() > 0


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SPECSERVE_CPU_LINEAR", "0")
    caches = [cpu_build.library, cpu_linear._library, cpu_linear._kernel, cpu_linear._kernel_packed, cpu_norm._library]
    caches += [cpu_linear.packed_group, cpu_linear.amx_on, cpu_linear._amx_kc]
    for cache in caches:
        cache.cache_clear()
    try:
        assert not cpu_linear.available()
        with pytest.raises(RuntimeError, match="not available"):
            cpu_linear.linear_f32(torch.randn(2, 4), torch.randn(3, 4))
    finally:
        assert not cpu_norm.available() and not cpu_norm.applies(torch.randn(2, 4), torch.randn(4))
        monkeypatch.delenv("SPECSERVE_CPU_LINEAR")
        for cache in caches:
            cache.cache_clear()
    assert cpu_linear.available()
