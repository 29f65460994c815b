"""A Llama-family decoder's layers for fp32 on the CPU in one C call (`cpu_decoder.c`): the C kernels llama.py
calls layer by layer (linear, norm, rotary, attention, silu * up), in the same order, without Python between
them; the same bits. The model builds the weight table (`WEIGHTS_PER_LAYER` pointers a layer, in the C file's
order) and keeps the torch path for everything else (bf16, CUDA, autograd, no compiler).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from specserve.kernels import cpu_build

_F32 = torch.float32
WEIGHTS_PER_LAYER = 13  # the C file's enum: input norm, qkv (+ bf16 copy, bias), o (+ copy), post norm,
# gate_up (+ copy), down (+ copy), K cache, V cache


@functools.cache
def _library() -> ctypes.CDLL | None:
    p, n, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
    signature = [p, n, n, n, n, n, n, n, p, p, p, p, p, n, p, p, f, f, p, p, n, p, ctypes.c_int]
    return cpu_build.functions(
        {
            "specserve_decoder_f32": (ctypes.c_int, signature),
            "specserve_decoder_profiling": (None, [ctypes.c_int]),
            "specserve_decoder_profile": (ctypes.c_int, [p]),
        }
    )


def available() -> bool:
    return _library() is not None


# what the C call's own timing splits its time into (the C file's T_* order), as `specserve bench profile` names them
PROFILE_KINDS = (
    "norms",
    "linear: qkv_proj",
    "rotary + reshapes",
    "attention: KV write",
    "attention: softmax(QK)V",
    "linear: o_proj",
    "linear: gate_up_proj",
    "mlp: silu * up",
    "linear: down_proj",
)


def set_profiling(on: bool) -> None:
    """Time every step inside the C call (clock reads around each; off by default), clearing the sums."""
    lib = _library()
    if lib is not None:
        lib.specserve_decoder_profiling(int(on))


def profile() -> dict[str, float]:
    """Seconds per kind of step summed over the calls since `set_profiling(True)`."""
    lib = _library()
    if lib is None:
        return {}
    out = (ctypes.c_double * len(PROFILE_KINDS))()
    lib.specserve_decoder_profile(out)
    return dict(zip(PROFILE_KINDS, out, strict=True))


def decoder_layers(
    x: torch.Tensor,  # [num_tokens, hidden] fp32: the embedded tokens
    table: torch.Tensor,  # [layers * WEIGHTS_PER_LAYER] int64: pointers (0 for none), kept alive by the caller
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    cos: torch.Tensor,  # [num_tokens, head_dim] fp32
    signed_sin: torch.Tensor,  # [num_tokens, head_dim] fp32: sin with its first half negated
    slot_mapping: torch.Tensor,  # [num_tokens] int64
    context_slots: torch.Tensor,  # [batch, max_context] int64
    row_request: torch.Tensor,  # [num_tokens] int64
    row_length: torch.Tensor,  # [num_tokens] int64
    eps: float,
    scale: float,
    taps: torch.Tensor | None = None,  # [num_taps] int64: layers (1 .. layers - 1) whose input to keep
    tapped: torch.Tensor | None = None,  # [num_tokens, num_taps, hidden] fp32: filled with those inputs
) -> torch.Tensor:  # [num_tokens, hidden]: the last layer's output, before the final norm
    """Every layer of the model on x, writing each layer's new keys and values into its cache (and, with taps,
    the residual stream entering each tapped layer into `tapped`)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU decoder kernel is not available (see the log)")
    tokens, hidden = x.shape
    for t in (x, cos, signed_sin):
        if t.dtype != _F32 or not t.is_contiguous():
            raise TypeError("x, cos and sin must be contiguous fp32")
    for t in (table, slot_mapping, context_slots, row_request, row_length):
        if t.dtype != torch.int64 or not t.is_contiguous():
            raise TypeError("the weight table, slots and row tables must be contiguous int64")
    if table.numel() != layers * WEIGHTS_PER_LAYER or cos.shape != (tokens, head_dim) or cos.shape != signed_sin.shape:
        raise ValueError("the weight table or the rotary tables do not fit")
    if slot_mapping.shape != (tokens,) or row_request.shape != (tokens,) or row_length.shape != (tokens,):
        raise ValueError("slot_mapping, row_request and row_length need one entry per token")
    num_taps = 0 if taps is None else taps.numel()
    if num_taps:
        if taps.dtype != torch.int64 or not taps.is_contiguous() or int(taps.min()) < 1 or int(taps.max()) >= layers:
            raise ValueError(f"taps must be contiguous int64 layers in [1, {layers}), got {taps.tolist()}")
        if tapped is None or tapped.dtype != _F32 or not tapped.is_contiguous() or tapped.shape != (
            tokens, num_taps, hidden,
        ):
            raise ValueError(f"tapped must be contiguous fp32 [{tokens}, {num_taps}, {hidden}]")
    out = torch.empty(tokens, hidden, dtype=_F32)
    if tokens:
        status = lib.specserve_decoder_f32(
            x.data_ptr(), tokens, hidden, layers, heads, kv_heads, head_dim, intermediate, table.data_ptr(),
            cos.data_ptr(), signed_sin.data_ptr(), slot_mapping.data_ptr(), context_slots.data_ptr(),
            context_slots.shape[1], row_request.data_ptr(), row_length.data_ptr(), eps, scale,
            out.data_ptr(), taps.data_ptr() if num_taps else None, num_taps, tapped.data_ptr() if num_taps else None,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("cpu_decoder: no memory for the scratch")
    return out
