"""Upcast matmuls: a bf16/fp16 model's multi-row matmuls run in fp32 on an fp32 copy of the weights.

A CPU without native bf16 arithmetic (no AVX512-BF16, no AMX: AVX2-only x86, for one) converts the
weights to fp32 on the fly, once per input row: a bf16 matmul's time grows with its rows. On this
project's 2-core AVX2 machine (2 threads, 512 tokens of context) a verifier forward over 8 tokens
costs 3.0x one token, and a 512-token prefill 6.4 s. With an fp32 copy of the weights a multi-row
matmul is an ordinary fp32 GEMM, bound by memory traffic instead: 8 tokens cost 2.1x one token,
the prefill 1.0 s. Matmuls of fewer than MIN_ROWS rows (a decode step, a draft step) keep the bf16
weights: half the bytes to stream, the faster path there. The price is the fp32 copy: 2 bytes more
per weight (540 MB for a 135M-parameter model).

fp32 weights need no copy, but the skinny-product form of few-row matmuls (below) pays for them
too, from a single row (padded to two): on the AVX2 machine an fp32 verifier forward over 1, 2, 4, 8
tokens takes 54, 92, 95, 98 ms through F.linear and 46, 69, 69, 88 ms this way, so `auto` arms fp32
models on any CPU (measured on this one only; `off` restores F.linear).

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

MIN_ROWS = 3  # on the AVX2 machine 2 rows are faster in bf16, 3 or more (padded to 4) in fp32
SKINNY_ROWS = 16  # up to this many rows (verification), the skinny-product form below
UPCAST_MODES = ("auto", "on", "off")


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
    """Resolve an upcast mode: 'auto' is on for bf16/fp16 weights on a CPU without native bf16, and for fp32
    weights on any CPU (the skinny-product form alone: no copy)."""
    if mode not in UPCAST_MODES:
        raise ValueError(f"upcast mode must be one of {UPCAST_MODES}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    if torch.device(device).type != "cpu":
        return False
    return dtype == torch.float32 or (dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16())


def _identity(t: torch.Tensor) -> tuple:
    """Where a tensor's data lives and how often it was changed in place (an inference tensor, such as a head
    weight derived under inference mode, keeps no version counter: its data pointer must do)."""
    return (t.data_ptr(), None if t.is_inference() else t._version)


class UpcastWeight:
    """The fp32 copy of one weight (and bias), rebuilt when the weight is replaced or changed in place."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: torch.Tensor | None = None  # [out, in] fp32
        self.bias: torch.Tensor | None = None  # [out] fp32

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        key = (_identity(weight), None if bias is None else _identity(bias))
        if key != self.key:
            with torch.no_grad():
                self.weight = weight.detach().float()
                self.bias = None if bias is None else bias.detach().float()
            self.key = key


def linear(
    x: torch.Tensor,  # [..., in]
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None = None,  # [out]
    upcast: UpcastWeight | None = None,
) -> torch.Tensor:  # [..., out] in x's dtype
    """F.linear, on `upcast`'s fp32 copy when it is armed and x has at least MIN_ROWS rows (any rows for fp32
    weights, which are used as they are)."""
    rows = x.numel() // max(x.shape[-1], 1)
    trains = torch.is_grad_enabled() and weight.requires_grad
    fp32 = weight.dtype == torch.float32  # nothing to upcast; only the skinny form below pays (from one row)
    if upcast is None or trains or (rows < MIN_ROWS and not fp32):
        return F.linear(x, weight, bias)
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
