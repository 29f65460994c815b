"""A row-invariant fp32 linear layer for the CPU (`cpu_linear.c`, and `cpu_packed.c` for weights of bf16 numbers),
built with the system's C compiler at first use.

Why: a decode step multiplies one row by every weight, a verification pass k + 1 rows. Speculation is exact only
if each row's output is the same bits in both, and a verification pass nearly free only if k + 1 rows cost about
what one does. Neither of torch's CPU kernels gives both on a small model: MKL's sgemm (F.linear) streams a
weight fastest for one or two rows but takes another summation order for one row than for two or more, and a
compute-bound one from four rows (2.5x one row at eight); oneDNN's packed kernel is row-invariant and flat up to
eight rows but streams a weight at half MKL's speed for one row (SmolLM2-135M's layers on this project's 2-core
Xeon: `specserve bench profile`). The C kernel sums each output in one fixed order (see its header) and streams
each weight once for up to eight rows at a time, prefetching the next tile. A weight whose numbers are all bf16
(the default verifier: a bf16 checkpoint run in fp32) is read from a packed bf16 copy (`pack_bf16`) by an
outer-product kernel, for every row count: half the bytes, and the FMA units kept busier (cpu_packed.c); on a
CPU with AMX by its tile unit instead (cpu_amx.c: x split into three bf16 pieces that sum to it exactly), so a
verification pass of up to ~8 rows costs about what one row does. SPECSERVE_AMX=0 keeps the outer-product kernel.

The shared library is built by `cpu_build` (compiled once per source, compiler and CPU, loaded with ctypes); it
shares torch's OpenMP runtime, and its thread count follows `torch.get_num_threads()`. Where there is no compiler
(or SPECSERVE_CPU_LINEAR=0) `available()` is False and callers keep torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from specserve.kernels import cpu_build

_F32 = torch.float32


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, n = ctypes.c_void_p, ctypes.c_long
    signature = [p, n, n, p, n, p, p, ctypes.c_int]
    lib = cpu_build.functions(
        {
            "specserve_linear_f32": (None, signature),
            "specserve_linear_f32_packed": (None, signature),
            "specserve_packed_group": (ctypes.c_long, []),
            "specserve_amx_enable": (ctypes.c_int, [ctypes.c_int]),
            "specserve_amx_on": (ctypes.c_int, []),
            "specserve_amx_kc": (ctypes.c_long, []),
        }
    )
    if lib is not None:
        lib.specserve_amx_enable(int(os.environ.get("SPECSERVE_AMX", "1") != "0"))
    return lib


@functools.cache
def amx_on() -> bool:
    """Whether weights of bf16 numbers are packed for, and multiplied by, the AMX tile unit (cpu_amx.c): a CPU
    with AMX, a compiler that knows it, Linux granting the tile registers, and SPECSERVE_AMX not 0."""
    lib = _library()
    return lib is not None and bool(lib.specserve_amx_on())


def set_amx(on: bool) -> bool:
    """Turn the AMX kernel on or off (tests and benchmarks compare the two); returns whether it is on. The
    layers' copies (`UpcastWeight`) pack again at their next use; a copy held elsewhere keeps the layout it was
    packed in: pack it again."""
    lib = _library()
    if lib is None:
        return False
    lib.specserve_amx_enable(int(on))
    for cache in (amx_on, packed_group, _amx_kc):
        cache.cache_clear()
    return amx_on()


@functools.cache
def _kernel_packed():
    lib = _library()
    return None if lib is None else lib.specserve_linear_f32_packed


@functools.cache
def _amx_kc() -> int:
    return int(_library().specserve_amx_kc())


def _padded_in(in_features: int) -> int:
    """The input length a packed copy holds: the AMX layout pads it to its tiles' 32, the other keeps it."""
    if not amx_on():
        return in_features
    kc = _amx_kc()
    return -(-in_features // kc) * kc


def packed_shape(out_features: int, in_features: int) -> tuple[int, ...]:
    """The shape of a weight's `pack_bf16` copy in the layout in use."""
    group = packed_group()
    groups = -(-out_features // group)
    if amx_on():
        return (groups, _padded_in(in_features) // 2, group, 2)
    return (groups, in_features, group)


@functools.cache
def packed_group() -> int:
    """Outputs per group of a packed weight (`pack_bf16`): 32 for the AMX kernel, 48 with AVX-512, else 32; 0
    without the kernels."""
    lib = _library()
    return 0 if lib is None else int(lib.specserve_packed_group())


@functools.cache
def _kernel():
    lib = _library()
    return None if lib is None else lib.specserve_linear_f32


def exact_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """A bf16 copy of an fp32 weight whose every number bf16 holds exactly (a checkpoint stored in bf16 and
    upcast, as the default verifier is), else None: `linear_f32` reads such a copy for a few rows, the same
    numbers from half the bytes."""
    if weight.dtype != _F32 or weight.numel() == 0:
        return None
    with torch.no_grad():
        compact = weight.detach().to(torch.bfloat16).contiguous()
        # finite too: the AMX kernel multiplies a weight by x's zero pieces, and inf * 0 is NaN
        return compact if torch.equal(compact.float(), weight) and bool(torch.isfinite(compact).all()) else None


def pack_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """A weight of bf16 numbers (`exact_bf16`) packed for the kernel in use, group g holding outputs g * G ..
    g * G + G - 1 (G = `packed_group()`, zeros past the last): for the outer-product kernel [groups, in, G], each
    input index one contiguous run of G numbers; for the AMX kernel [groups, in / 2, G, 2] (in padded with zeros
    to 32), each pair of inputs of G outputs side by side, as its B tiles hold them. None where the weight is not
    all bf16 numbers or the kernels are off. Every row count reads it (a decode step, a verification pass, a
    prefill): one summation order per weight."""
    group = packed_group()
    compact = exact_bf16(weight) if group else None
    if compact is None:
        return None
    n, k = compact.shape
    shape = packed_shape(n, k)
    padded = torch.zeros(shape[0] * group, _padded_in(k), dtype=torch.bfloat16)
    padded[:n, :k] = compact
    if len(shape) == 4:
        return padded.view(shape[0], group, shape[1], 2).permute(0, 2, 1, 3).contiguous()
    return padded.view(shape[0], group, k).transpose(1, 2).contiguous()


def unpack_bf16(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:  # [out, in] bf16
    """The weight a `pack_bf16` copy holds, in its usual [out, in] layout (for tests and checks)."""
    if packed.dim() == 4:
        groups, pairs, group, _ = packed.shape
        return packed.permute(0, 2, 1, 3).reshape(groups * group, pairs * 2)[:out_features, :in_features]
    groups, k, group = packed.shape
    return packed.transpose(1, 2).reshape(groups * group, k)[:out_features, :in_features]


def available() -> bool:
    """Whether the kernel is built and loaded (compiling it on the first call)."""
    return _kernel() is not None


def linear_f32(
    x: torch.Tensor,  # [..., in] fp32, CPU
    weight: torch.Tensor,  # [out, in] fp32, CPU, contiguous
    bias: torch.Tensor | None = None,  # [out] fp32, contiguous
    packed: torch.Tensor | None = None,  # `pack_bf16(weight)`
) -> torch.Tensor:  # [..., out] fp32
    """x @ weight.T + bias, each row's output the same bits whatever the number of rows (needs `available()`).
    With `packed` (the same numbers in bf16, laid out for the outer-product kernel) every row count reads it:
    half the bytes to stream, and one multiply-add chain per output in input order; without, the fp32 weight
    in the dot-product kernel. Called ~120 times a forward on the layer-by-layer path: a few microseconds of
    Python."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the CPU linear kernel is not available (see the log)")
    if x.dtype != _F32 or weight.dtype != _F32 or x.device.type != "cpu" or weight.device.type != "cpu":
        raise TypeError("linear_f32 takes fp32 CPU tensors")
    if not weight.is_contiguous() or (bias is not None and (bias.dtype != _F32 or not bias.is_contiguous())):
        raise ValueError("linear_f32 needs a contiguous weight and bias")
    n, k = weight.shape
    shape = x.shape
    if shape[-1] != k:
        raise ValueError(f"input has {shape[-1]} features, the weight {k}")
    x2 = x.reshape(-1, k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, n)  # the default dtype is fp32 unless changed: checked below
    if out.dtype != _F32:
        out = out.float()
    if packed is not None:
        if packed.dtype != torch.bfloat16 or packed.shape != packed_shape(n, k) or not packed.is_contiguous():
            raise ValueError("packed must be the weight's pack_bf16 copy")
        if rows:
            _kernel_packed()(x2.data_ptr(), rows, k, packed.data_ptr(), n, None if bias is None else bias.data_ptr(),
                             out.data_ptr(), torch.get_num_threads())
    elif rows:
        kernel(x2.data_ptr(), rows, k, weight.data_ptr(), n, None if bias is None else bias.data_ptr(),
               out.data_ptr(), torch.get_num_threads())
    return out if len(shape) == 2 else out.view(*shape[:-1], n)
