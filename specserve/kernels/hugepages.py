"""CPU tensors on 2 MB pages, for what the CPU kernels stream every step (weights' bf16 copies, the KV cache).

Why: a decode step reads ~270 MB of weights. On 4 KB pages that is ~70,000 page translations a step, more than
the TLB holds, and a page walk stalls each stream; on 2 MB pages, ~140. Linux hands out 2 MB pages to memory
that asks for them (`madvise(MADV_HUGEPAGE)`) when transparent huge pages are in `madvise` mode, the usual
default: SmolLM2-135M's linear layers over one row take 7.5 ms instead of 9.2 on this project's Xeon. Where the
call is refused (not Linux, huge pages off) the tensor is an ordinary one: the same numbers, the same bits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MIN_BYTES = HUGE_PAGE  # smaller tensors cannot fill one


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor whose memory asked for 2 MB pages before its first touch (a view
    into a buffer one huge page longer, aligned to one); an ordinary `torch.empty` where that cannot be had."""
    n = 1
    for s in shape:
        n *= s
    nbytes = n * torch.empty(0, dtype=dtype).element_size()
    madvise = _madvise()
    if madvise is None or nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # large: fresh pages from mmap, not yet touched
    offset = (-raw.data_ptr()) % HUGE_PAGE
    length = (nbytes + HUGE_PAGE - offset) // HUGE_PAGE * HUGE_PAGE
    madvise(raw.data_ptr() + offset, length, MADV_HUGEPAGE)  # advice: refused or ignored, pages stay 4 KB
    return raw[offset : offset + nbytes].view(dtype).view(shape)


def pack(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of CPU tensors, one after another (each 4 KB aligned) in one buffer on 2 MB pages: a
    model's weight copies packed so (most are under 2 MB apiece) are streamed in the order they were given."""
    if not tensors:
        return []
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 4096) * 4096
    arena = empty((total,), torch.uint8)
    out = []
    for t, start in zip(tensors, offsets, strict=True):
        view = arena[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out


def zeros(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    out = empty(shape, dtype)
    out.zero_()
    return out
