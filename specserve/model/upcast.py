"""Upcast matmuls: a bf16/fp16 model's multi-row matmuls run in fp32 on an fp32 copy of the weights.

A CPU without native bf16 arithmetic (no AVX512-BF16, no AMX: AVX2-only x86, for one) converts the
weights to fp32 on the fly, once per input row: a bf16 matmul's time grows with its rows. On this
project's 2-core AVX2 machine (2 threads, 512 tokens of context) a verifier forward over 8 tokens
costs 3.0x one token, and a 512-token prefill 6.4 s. With an fp32 copy of the weights a multi-row
matmul is an ordinary fp32 GEMM, bound by memory traffic instead: 8 tokens cost 2.1x one token,
the prefill 1.0 s. Matmuls of fewer than MIN_ROWS rows (a decode step, a draft step) keep the bf16
weights: half the bytes to stream, the faster path there. The price is the fp32 copy: 2 bytes more
per weight (540 MB for a 135M-parameter model).

fp32 weights need no fp32 copy, but they are not streamed through F.linear: `auto` arms fp32 models on any CPU,
and their matmuls run our own C kernel (specserve/kernels/cpu_linear.c, compiled at first use), which sums
every output in one fixed order whatever the number of rows: a verification pass computes its linear layers
exactly as the decode steps it replaces, and a prefill chunk its rows exactly as a decode step would. torch's
kernels give one or the other: MKL's sgemm (what F.linear calls) sums a single row in another order than two or
more, and from four rows picks a compute-bound kernel; oneDNN's packed kernel (`torch.ops.mkldnn.
_reorder_linear_weight`) is row-invariant but streams a weight at half MKL's speed for one row. On this
project's 2-core AVX-512 Xeon (2 threads, every linear layer of SmolLM2-135M, 590 MB, output layer included)
over 1, 2, 4, 8, 16, 64 rows: F.linear 13.3, 13.5, 24.2, 33.1, 32.6, 73.0 ms; packed oneDNN 27.8, 28.3, 28.3,
32.2, 39.1, 81.0 ms; the C kernel 14.5, 15.9, 17.5, 21.2, 30.6, 84.3 ms (2026-12-02), and 15.8, 16.1, 16.7,
18.2, 27.4, 83.6 ms since it prefetches the next tile (a separate harness, same layers). The default verifier
is a bf16 checkpoint run in fp32: every weight is a bf16 number, so the holder keeps a packed bf16 copy
(`cpu_linear.pack_bf16`, 295 MB for SmolLM2, on 2 MB pages) that an outer-product kernel (cpu_packed.c) widens
as it reads, for every row count: SmolLM2's layers without the output layer over 1, 8, 64 rows in 6.7, 9.9,
51 ms (2026-12-03; each output one multiply-add chain in input order). Where no C compiler is found the packed
oneDNN copy is the fallback (4 bytes more per weight; one row padded to two: oneDNN splits a 1536-long reduction
differently for a single row), and without oneDNN (or off the CPU) fp32 weights take the skinny form below.

bf16 weights on a CPU that computes bf16 natively (AVX512-BF16/AMX) are packed the same way, in bf16 (no fp32
copy): on the 2-core Xeon a SmolLM2 forward over 1, 2, 4, 8 new tokens after 512 of context takes 36, 38, 38,
39 ms this way against 50, 51, 54, 60 ms in packed fp32 (`specserve bench profile --dtype bfloat16`). Its
linear layers are row-invariant too, but bf16 attention (`enable_gqa`, which keeps HF's rounding) is not, so a
bf16 verification pass still differs from the decode steps in the last bits of some logits: bf16 stays the
fast, inexact opt-in; fp32 is the exact default.

Numerics: like the bf16 kernel, the fp32 GEMM reads the same bf16 values (upcast exactly),
accumulates in fp32 and rounds its output to the activation dtype; only the summation order
differs, as it already does between a 1-row and a (k + 1)-row bf16 matmul.

`enable_upcast(model)` arms every `Linear` of a model (and its output layer); `upcast_default`
decides when that pays. A weight that requires grad under autograd (a draft being trained) always
takes the plain path, so its gradient flows; a weight changed in place gets a fresh copy.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from specserve.kernels import cpu_linear, hugepages

MIN_ROWS = 3  # on the AVX2 machine 2 rows are faster in bf16, 3 or more (padded to 4) in fp32
SKINNY_ROWS = 16  # up to this many rows (verification), the skinny-product form below
UPCAST_MODES = ("auto", "on", "off")
PACK_ROWS = 16  # the row count oneDNN lays a packed weight out for (8 or more: every row count 2-40 as fast)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU computes bf16 natively (AVX512-BF16 or AMX-BF16), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def upcast_default(mode: str, dtype: torch.dtype, device: str | torch.device) -> bool:
    """Resolve an upcast mode: 'auto' is on for bf16/fp16 weights on a CPU without native bf16, for fp32 weights
    on any CPU (packed, or the skinny-product form: no copy), and for bf16 weights on a CPU with native bf16
    (packed in bf16 where oneDNN is present)."""
    if mode not in UPCAST_MODES:
        raise ValueError(f"upcast mode must be one of {UPCAST_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if torch.device(device).type != "cpu":
        return False
    if dtype == torch.bfloat16 and cpu_has_native_bf16():
        return packing_available()
    return dtype == torch.float32 or (dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16())


def _identity(t: torch.Tensor) -> tuple:
    """Where a tensor's data lives and how often it was changed in place (an inference tensor, such as a head
    weight derived under inference mode, keeps no version counter: its data pointer must do)."""
    return (t.data_ptr(), None if t.is_inference() else t._version)


@functools.cache
def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (CPU builds with mkldnn)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def runs_cpu_kernel(weight: torch.Tensor) -> bool:
    """Whether `linear` runs this weight through our row-invariant C kernel (specserve/kernels/cpu_linear.c): fp32
    on the CPU, where a C compiler built it."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu" and cpu_linear.available()


def packs(weight: torch.Tensor) -> bool:
    """Whether `linear` runs this weight through a packed oneDNN copy: on the CPU, oneDNN present, fp32 weights
    where our C kernel is not built, or bf16 weights on a CPU that computes bf16 natively (AVX512-BF16/AMX;
    elsewhere bf16 is upcast instead)."""
    if weight.device.type != "cpu" or not packing_available():
        return False
    if weight.dtype == torch.float32:
        return not runs_cpu_kernel(weight)
    return weight.dtype == torch.bfloat16 and cpu_has_native_bf16()


class UpcastWeight:
    """The fp32 copy of one weight (and bias), rebuilt when the weight is replaced or changed in place: a dense
    copy of a bf16/fp16 weight, or oneDNN's packed form of an fp32 one (`packs`)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None  # [out, in] fp32 dense copy (bf16/fp16 weights)
        self.packed: torch.Tensor | None = None  # [out, in] fp32, oneDNN's opaque blocked layout (fp32 weights)
        self.compact: torch.Tensor | None = None  # an fp32 weight of bf16 numbers, packed (cpu_linear.pack_bf16)
        self.bias: torch.Tensor | None = None  # [out] fp32

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        cpu = runs_cpu_kernel(weight)
        # the packed copy's layout follows the kernel in use (cpu_linear.set_amx switches it): a switch repacks
        key = (_identity(weight), None if bias is None else _identity(bias), cpu and cpu_linear.amx_on())
        if key != self.key:
            with torch.no_grad():
                self.compact = None
                if cpu:  # the C kernel reads the weight itself, or its bf16 copy
                    self.compact = cpu_linear.pack_bf16(weight)
                    self.weight = self.packed = None
                elif packs(weight):
                    self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)
                    self.weight = None
                else:
                    self.weight = weight.detach().float()
                    self.packed = None
                bias_dtype = weight.dtype if self.packed is not None else torch.float32  # packed: in the weight's
                self.bias = None if bias is None else bias.detach().to(bias_dtype)
            self.key = key

    @property
    def packed_args(self) -> tuple:
        """The arguments of `torch.ops.mkldnn._linear_pointwise` after the input (no fused activation)."""
        return self.packed, self.bias, "none", [], ""


def linear(
    x: torch.Tensor,  # [..., in]
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None = None,  # [out]
    upcast: UpcastWeight | None = None,
) -> torch.Tensor:  # [..., out] in x's dtype
    """F.linear, on `upcast`'s fp32 copy when it is armed and x has at least MIN_ROWS rows; fp32 weights from one
    row, through our C kernel where it is built, else on their packed copy where oneDNN is present, else as they
    are in the skinny form."""
    rows = x.numel() // max(x.shape[-1], 1)
    trains = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
    fp32 = weight.dtype == torch.float32  # nothing to upcast: only the packed or skinny form pays (from one row)
    if upcast is None or trains:
        return F.linear(x, weight, bias)
    if fp32 and x.dtype == torch.float32 and runs_cpu_kernel(weight):
        upcast.prepare(weight, bias)  # a bf16-exact weight's packed copy (`compact`): half the bytes, any rows
        return cpu_linear.linear_f32(x, weight.contiguous(), None if bias is None else bias.contiguous(),
                                     upcast.compact)
    packed = packs(weight)  # fp32, or bf16 on a CPU with native bf16: packed in its own dtype, from one row
    if rows < MIN_ROWS and not fp32 and not packed:
        return F.linear(x, weight, bias)
    if packed:
        upcast.prepare(weight, bias)
        if rows == 1:  # a single row reduces in another order (see the module docstring): pad it to two
            out = torch.ops.mkldnn._linear_pointwise(F.pad(x.reshape(1, -1), (0, 0, 0, 1)), *upcast.packed_args)
            return out[:1].reshape(*x.shape[:-1], out.shape[-1])
        return torch.ops.mkldnn._linear_pointwise(x, *upcast.packed_args)  # [..., out]: any leading dims
    if fp32:
        w, b = weight, bias
    else:
        upcast.prepare(weight, bias)
        w, b = upcast.weight, upcast.bias
    if rows > SKINNY_ROWS:
        return F.linear(x.float(), w, b).to(x.dtype)
    # a few rows: the weight as the left operand ([out, in] @ [in, rows]) takes MKL's faster path for skinny
    # products (on the AVX2 machine 4 rows: 31 ms against 55 ms per model's worth of layers)
    # (an odd row count takes a slower kernel still: 5 rows cost more than 6, so a zero row pads it)
    x2 = x.reshape(rows, x.shape[-1]).float()
    if rows % 2:
        x2 = F.pad(x2, (0, 0, 0, 1))
    out = torch.mm(w, x2.t())[:, :rows]  # [out, rows]
    if b is not None:
        out += b[:, None]
    return out.t().to(x.dtype).contiguous().reshape(*x.shape[:-1], out.shape[0])


class Linear(nn.Linear):
    """nn.Linear that `enable_upcast` can arm (same parameters, same state_dict keys)."""

    upcast: UpcastWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.upcast)


def enable_upcast(model: nn.Module) -> None:
    """Arm every Linear of `model` and its output layer (`logits_upcast`), and make the fp32 copies now,
    so the memory is taken at start rather than at the first prefill."""
    for module in model.modules():
        if isinstance(module, Linear) and module.upcast is None:
            module.upcast = UpcastWeight()
            module.upcast.prepare(module.weight, module.bias)
    if getattr(model, "logits_upcast", False) is None:
        model.logits_upcast = UpcastWeight()
        output = getattr(model, "output_weight", None)
        # a tied output layer is packed (or copied to bf16) apart from the embedding
        if isinstance(output, torch.Tensor) and (packs(output) or runs_cpu_kernel(output)):
            model.logits_upcast.prepare(output, None)
    # the bf16 copies the C kernel streams every step, in forward order in one buffer on 2 MB pages where the OS
    # grants them (`hugepages`): SmolLM2's layers over one row 18% faster than on 4 KB pages
    holders = [m.upcast for m in model.modules() if isinstance(m, Linear) and m.upcast is not None]
    holders += [model.logits_upcast] if isinstance(getattr(model, "logits_upcast", None), UpcastWeight) else []
    holders = [h for h in holders if h.compact is not None and h.compact.device.type == "cpu"]
    for holder, packed in zip(holders, hugepages.pack([h.compact for h in holders]), strict=True):
        holder.compact = packed
