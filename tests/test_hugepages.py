"""Tensors on 2 MB pages (specserve/kernels/hugepages.py): the same numbers wherever the OS puts them."""

import torch

from specserve.kernels import hugepages


def test_empty_and_zeros_are_ordinary_tensors():
    for shape, dtype in [((3, 5), torch.float32), ((1024, 1024), torch.bfloat16), ((2, 1 << 20), torch.float32)]:
        t = hugepages.empty(shape, dtype)
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
        assert torch.count_nonzero(hugepages.zeros(shape, dtype)) == 0
        src = torch.randn(shape).to(dtype)
        assert torch.equal(hugepages.empty(shape, dtype).copy_(src), src)
    big = hugepages.empty((1 << 21,), torch.float32)  # 8 MB: aligned to a huge page where the OS is Linux
    if hugepages._madvise() is not None:
        assert big.data_ptr() % hugepages.HUGE_PAGE == 0


def test_pack_lays_copies_out_in_one_buffer_in_order():
    tensors = [torch.randn(300, 7), torch.randn(5).bfloat16(), torch.randn(1000, 1000)]
    packed = hugepages.pack(tensors)
    for src, out in zip(tensors, packed, strict=True):
        assert torch.equal(out, src) and out.is_contiguous() and out.data_ptr() % 4096 == 0
    storage = {t.untyped_storage().data_ptr() for t in packed}
    assert len(storage) == 1  # one buffer
    assert packed[0].data_ptr() < packed[1].data_ptr() < packed[2].data_ptr()
    assert hugepages.pack([]) == []


def test_enable_upcast_packs_the_bf16_copies(tiny):
    from specserve.kernels import cpu_linear
    from specserve.model.loader import load_model
    from specserve.model.upcast import Linear, enable_upcast

    if not cpu_linear.available():
        return
    model = load_model(tiny["llama"], "float32")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    enable_upcast(model)
    copies = [m.upcast.compact for m in model.modules() if isinstance(m, Linear)]
    assert all(c is not None for c in copies)
    assert len({c.untyped_storage().data_ptr() for c in copies}) == 1
    for m in model.modules():
        if isinstance(m, Linear):
            assert torch.equal(cpu_linear.unpack_bf16(m.upcast.compact, *m.weight.shape).float(), m.weight)
