"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2) over the paged KV cache.

RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP, tied or untied
embeddings, optional q/k/v bias. q/k/v and gate/up projections are fused into one matmul
each (the loader concatenates the checkpoint's weights). Matmuls go through `upcast.linear`, which
can run multi-row ones in fp32 on a CPU without native bf16. The numerics follow HF transformers'
Llama (norms in fp32, cos/sin cast to the activation dtype) so that logits match it.

The model knows nothing about requests or blocks: it takes flat token ids, their positions,
the attention metadata and the KV pool, and returns the last layer's hidden states (the features
an EAGLE draft head reads); `compute_logits` applies the final norm and the output layer to the
rows that need sampling only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specserve.kernels import cpu_decoder, cpu_linear, cpu_norm, cpu_pointwise
from specserve.model.attention import AttentionMetadata, paged_attention
from specserve.model.upcast import Linear, UpcastWeight, linear, runs_cpu_kernel


@dataclass(frozen=True)
class ModelArchitecture:
    """The shape of a Llama-family model, read from an HF config by the loader."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool
    max_position_embeddings: int


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            if cpu_norm.applies(x, self.weight):  # fp32 inference on the CPU: one C call (see cpu_norm.c)
                return cpu_norm.rms_norm(x, self.weight, self.eps)
            # the same ops in the same order inside one aten call: the same bits, 6 Python dispatches fewer
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def add_norm(self, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + h, norm(x + h)): the residual add and the norm after it, one C call for fp32 on the CPU; h None:
        (x, norm(x))."""
        if h is None:
            return x, self(x)
        if cpu_norm.applies(x, self.weight) and h.dtype == torch.float32:
            return cpu_norm.add_rms_norm(x, h, self.weight, self.eps)
        x = x + h
        return x, self(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, from inverse frequencies computed by the loader."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = attention_scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the signed sin that `rotate` reads: sin with its first half negated."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [num_tokens, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [num_tokens, head_dim]
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        half = sin.shape[-1] // 2
        signed_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos[:, None, :], signed_sin[:, None, :]  # [num_tokens, 1, head_dim]


def rotate(
    x: torch.Tensor,  # [num_tokens, heads, head_dim]
    cos: torch.Tensor,  # [num_tokens, 1, head_dim]
    signed_sin: torch.Tensor,  # [num_tokens, 1, head_dim]
) -> torch.Tensor:  # [num_tokens, heads, head_dim]
    """HF's x * cos + rotate_half(x) * sin: rolling x by half a head and multiplying by the signed sin gives
    (-x2 * sin, x1 * sin), the same products bit for bit (negation is exact), in 4 aten calls instead of 6."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, arch: ModelArchitecture) -> None:
        super().__init__()
        self.num_heads = arch.num_heads
        self.num_kv_heads = arch.num_kv_heads
        self.head_dim = arch.head_dim
        self.q_size = arch.num_heads * arch.head_dim
        self.kv_size = arch.num_kv_heads * arch.head_dim
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = Linear(self.q_size, arch.hidden_size, bias=False)
        self.scale = arch.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,  # [num_tokens, 1, head_dim]
        sin: torch.Tensor,  # [num_tokens, 1, head_dim], signed (see RotaryEmbedding)
        k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        n = x.shape[0]
        qkv = self.qkv_proj.forward(x)  # [n, q_size + 2 * kv_size]
        if cpu_pointwise.applies(qkv) and qkv.is_contiguous():  # fp32 on the CPU: one C call, in place, same bits
            cpu_pointwise.rotate_(qkv, self.num_heads + self.num_kv_heads, self.head_dim, cos, sin)
            q = qkv[:, : self.q_size].view(n, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size].view(n, self.num_kv_heads, self.head_dim)
        else:
            qk = qkv[:, : self.q_size + self.kv_size]
            # queries and keys rotate together: one set of elementwise ops instead of two
            qk = rotate(qk.reshape(n, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(n, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)
        return self.o_proj.forward(out)


class MLP(nn.Module):
    def __init__(self, arch: ModelArchitecture) -> None:
        super().__init__()
        self.gate_up_proj = Linear(arch.hidden_size, 2 * arch.intermediate_size, bias=False)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj.forward(x)
        if cpu_pointwise.applies(gate_up) and gate_up.dim() == 2:  # fp32 on the CPU: one C call
            return self.down_proj.forward(cpu_pointwise.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArchitecture) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = MLP(arch)

    def step(self, x, pending, cos, sin, k_cache, v_cache, meta):
        """(x + pending + attention, mlp): the layer with its last residual add left pending, so that the next
        layer's norm takes it in the same call (`RMSNorm.add_norm`); pending None for the first layer. The
        residual stream is summed in the same order as `forward`'s, so the bits are the same.

        Sub-modules are called through `.forward` here and in Attention and MLP: nn.Module.__call__ costs a few
        microseconds (hook bookkeeping; specserve registers no hooks), 180 times a SmolLM2 decode step, 5% of it."""
        x, normed = self.input_layernorm.add_norm(x, pending)
        h = self.self_attn.forward(normed, cos, sin, k_cache, v_cache, meta)
        x, normed = self.post_attention_layernorm.add_norm(x, h)
        return x, self.mlp.forward(normed)

    def forward(self, x, cos, sin, k_cache, v_cache, meta):
        x, h = self.step(x, None, cos, sin, k_cache, v_cache, meta)
        return x + h


def _pointer(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _identities(watched: tuple[list[torch.Tensor], list[torch.Tensor]]) -> tuple[list[int], list[int]]:
    """The data pointers of every watched tensor and the version counters of those that keep one (an inference
    tensor keeps none): 150 tensors in ~25 us, a list comprehension each."""
    every, versioned = watched
    return [t.data_ptr() for t in every], [t._version for t in versioned]


class FusedLayers:
    """Decoder layers run in one C call (`cpu_decoder`) where they can be: fp32 inference on the CPU, every
    linear layer on the C kernel (`enable_upcast`), the kernels built. Anything else (bf16, CUDA, autograd, no
    compiler) gets None from `run` and runs the layers one by one.

    The pointer table the C call reads (weights, their bf16 copies, caches) takes a walk over every layer to
    build (0.8 ms for SmolLM2, 5% of a decode step), so it is kept, with the data pointer and version counter
    of every tensor it points into: a weight changed in place (load_state_dict, an optimizer step) or given new
    storage (`.data =`, `.to()`) makes it anew, bf16 copies included, as the layer-by-layer path would. A
    parameter replaced by another object (`module.weight = nn.Parameter(...)`) is not seen: call `forget()`."""

    def __init__(self) -> None:
        self._kept: tuple | None = None  # ((cache pointer, AMX layout), identities, watched tensors, table)

    def forget(self) -> None:
        self._kept = None

    def run(
        self,
        layers: nn.ModuleList,
        arch: ModelArchitecture,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,  # [num_tokens, 1, head_dim]
        sin: torch.Tensor,  # [num_tokens, 1, head_dim], signed
        kv_cache: torch.Tensor,  # [len(layers), 2, num_slots, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        taps: torch.Tensor | None = None,  # [num_taps] int64: layers whose input to keep (see LlamaModel.forward)
        tapped: torch.Tensor | None = None,  # [num_tokens, num_taps, hidden]: where
    ) -> torch.Tensor | None:  # [num_tokens, hidden]: the last layer's output, or None where it cannot run
        table = self.table(layers, arch, x, kv_cache, meta)
        if table is None:
            return None
        return cpu_decoder.decoder_layers(
            x.contiguous(), table, len(layers), arch.num_heads, arch.num_kv_heads, arch.head_dim,
            arch.intermediate_size, cos.reshape(-1, arch.head_dim).contiguous(),
            sin.reshape(-1, arch.head_dim).contiguous(), meta.slot_mapping, meta.context_slots, meta.row_request,
            meta.row_length, arch.rms_norm_eps, layers[0].self_attn.scale, taps, tapped,
        )

    def table(self, layers, arch, x, kv_cache, meta) -> torch.Tensor | None:
        """The pointer table (`cpu_decoder.WEIGHTS_PER_LAYER` a layer), or None where the C call cannot run."""
        if (
            torch.is_grad_enabled()
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or kv_cache.dtype != torch.float32
            or not kv_cache.is_contiguous()
            or kv_cache.shape[0] < len(layers)
            or meta.row_length is None
            or meta.uses_decode_kernel
            or not cpu_decoder.available()
        ):
            return None
        kept = self._kept
        layout = cpu_linear.amx_on()  # the packed copies' layout (cpu_linear.set_amx switches it)
        if kept is not None and kept[0] == (kv_cache.data_ptr(), layout) and kept[1] == _identities(kept[2]):
            return kept[3]
        self._kept = None
        pointers, watched = [], []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            for n in norms:
                if n.weight.dtype != torch.float32 or not n.weight.is_contiguous() or n.eps != arch.rms_norm_eps:
                    return None
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            for lin in linears:
                if lin.upcast is None or not runs_cpu_kernel(lin.weight) or not lin.weight.is_contiguous():
                    return None
                lin.upcast.prepare(lin.weight, lin.bias)
            qkv, o, gate_up, down = linears
            bias = qkv.bias
            if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
                return None
            pointers += [
                norms[0].weight.data_ptr(),
                qkv.weight.data_ptr(), _pointer(qkv.upcast.compact), 0 if bias is None else bias.data_ptr(),
                o.weight.data_ptr(), _pointer(o.upcast.compact),
                norms[1].weight.data_ptr(),
                gate_up.weight.data_ptr(), _pointer(gate_up.upcast.compact),
                down.weight.data_ptr(), _pointer(down.upcast.compact),
                kv_cache[i, 0].data_ptr(), kv_cache[i, 1].data_ptr(),
            ]
            watched += [n.weight for n in norms] + [lin.weight for lin in linears] + ([] if bias is None else [bias])
        table = torch.tensor(pointers, dtype=torch.int64)
        watched = (watched, [t for t in watched if not t.is_inference()])
        self._kept = ((kv_cache.data_ptr(), layout), _identities(watched), watched, table)
        return table


class LlamaModel(nn.Module):
    def __init__(self, arch: ModelArchitecture, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rotary = RotaryEmbedding(inv_freq, attention_scaling)
        self.lm_head = None if arch.tie_word_embeddings else Linear(arch.hidden_size, arch.vocab_size, bias=False)
        self.logits_upcast: UpcastWeight | None = None  # armed by enable_upcast (see upcast.py)
        self.fused_layers = FusedLayers()
        # layers whose input an EAGLE-3 head reads besides the last layer's output (its low and middle
        # features); the engine sets them from the head it serves. `forward(taps=[])` then returns them.
        self.feature_layers: tuple[int, ...] = ()

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: torch.Tensor,  # [num_layers, 2, num_slots, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        taps: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden]: the last layer's output, before the final norm (the "features")
        """taps: a list to append [num_tokens, len(feature_layers) * hidden] to: the residual stream entering each
        of `feature_layers` (the sum the layer's input norm reads), side by side."""
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        layers = self.feature_layers if taps is not None else ()
        if any(not 0 < i < len(self.layers) for i in layers):
            raise ValueError(f"feature_layers must lie in [1, {len(self.layers)}), got {layers}")
        tapped = x.new_empty(x.shape[0], len(layers), x.shape[1]) if layers else None
        which = torch.tensor(layers, dtype=torch.int64) if layers else None
        out = self.fused_layers.run(self.layers, self.arch, x, cos, sin, kv_cache, meta, which, tapped)
        if out is None:  # the layers one by one (bf16, CUDA, autograd, no compiler)
            pending = None
            for i, layer in enumerate(self.layers):
                if i in layers:
                    tapped[:, layers.index(i)] = x + pending
                x, pending = layer.step(x, pending, cos, sin, kv_cache[i, 0], kv_cache[i, 1], meta)
            out = x + pending
        # else: fp32 inference on the CPU: every layer in one C call, the same bits (cpu_decoder.c)
        if layers:
            taps.append(tapped.reshape(x.shape[0], -1))
        return out

    @property
    def output_weight(self) -> torch.Tensor:  # [vocab, hidden]
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] features -> final norm -> [rows, vocab] fp32 logits."""
        return linear(self.norm(hidden), self.output_weight, None, self.logits_upcast).float()
