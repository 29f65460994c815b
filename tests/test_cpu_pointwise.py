"""The fp32 CPU elementwise kernels (specserve/kernels/cpu_pointwise.c): rotary embedding in place, the same bits
as the torch path, and silu(gate) * up within float rounding of torch's, row-invariant."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specserve.kernels import cpu_pointwise
from specserve.model.llama import RotaryEmbedding, rotate

pytestmark = pytest.mark.skipif(not cpu_pointwise.available(), reason="no C compiler built the CPU kernels")


@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 2, 16), (2, 2, 6)])
def test_rotary_in_place_gives_the_torch_paths_bits(heads, kv_heads, dim):
    torch.manual_seed(dim)
    tokens = 11
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    rotary = RotaryEmbedding(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)), 1.0)
    cos, sin = rotary(torch.arange(40, 40 + tokens), torch.float32)
    width = (heads + kv_heads) * dim
    expected = rotate(qkv[:, :width].reshape(tokens, heads + kv_heads, dim), cos, sin).reshape(tokens, width)
    ours = cpu_pointwise.rotate_(qkv.clone(), heads + kv_heads, dim, cos, sin)
    assert torch.equal(ours[:, :width], expected)
    assert torch.equal(ours[:, width:], qkv[:, width:])  # the values are left alone


def test_silu_mul_close_to_torch_and_rows_alone_equal_rows_together():
    torch.manual_seed(2)
    gate_up = torch.randn(9, 2 * 1536) * 5
    gate_up[0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])  # saturated ends and zeros
    ours = cpu_pointwise.silu_mul(gate_up)
    reference = F.silu(gate_up[:, :1536].double()) * gate_up[:, 1536:].double()
    assert ((ours.double() - reference).abs() <= 4e-7 * reference.abs() + 1e-30).all()
    for i in range(len(gate_up)):
        assert torch.equal(cpu_pointwise.silu_mul(gate_up[i : i + 1])[0], ours[i])
    odd = torch.randn(3, 2 * 37)  # a width that leaves a tail after the 16-wide lanes
    torch.testing.assert_close(cpu_pointwise.silu_mul(odd), F.silu(odd[:, :37]) * odd[:, 37:], rtol=1e-6, atol=1e-7)


def test_bad_arguments():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="do not fit"):
        cpu_pointwise.rotate_(x, 3, 32, torch.randn(2, 32), torch.randn(2, 32))
    with pytest.raises(ValueError, match="rows"):
        cpu_pointwise.rotate_(x, 2, 32, torch.randn(3, 32), torch.randn(3, 32))
    with pytest.raises(TypeError):
        cpu_pointwise.rotate_(x.t(), 1, 2, torch.randn(64, 2), torch.randn(64, 2))  # not contiguous
    with pytest.raises(TypeError):
        cpu_pointwise.silu_mul(torch.randn(2, 7))
    assert not cpu_pointwise.applies(torch.randn(2, 8, requires_grad=True))  # training: torch's path
