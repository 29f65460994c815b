"""Load an HF checkpoint directory (config.json + safetensors) into our LlamaModel.

HF transformers reads the config and computes scaled RoPE frequencies; the forward pass is ours.
Architectures outside the Llama family get a clear error naming them.
"""

from __future__ import annotations

import glob
import os

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from specserve.model.llama import LlamaModel, ModelArchitecture

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
"""What a dtype option accepts: 'auto' (see `auto_dtype`) or one of DTYPES."""


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """float32 on the CPU, bfloat16 on CUDA.

    Only fp32 keeps greedy speculative output token for token the verifier's plain greedy output: bf16
    rounds a 1-row and a (k + 1)-row forward differently (the matmul library picks its kernel by shape),
    and near-ties flip (10 of 20 held-out prompts drifted on SmolLM2). A CPU without native bf16
    (AVX2 only) emulates it, so fp32 costs nothing there; a CPU with AVX512-BF16 or AMX runs bf16
    faster, and still gets fp32, because exactness is the default promise: `--dtype bfloat16` trades
    it for speed (README, "Determinism"). On CUDA bf16 is the default, and `--batch-invariant` makes it
    exact.
    """
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def resolve_dtype(name: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype option ('auto', a name in DTYPES or a torch.dtype) as the torch.dtype it means on `device`."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {name!r}")
    return DTYPES[name]


def read_architecture(config: PretrainedConfig) -> ModelArchitecture:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported architecture {model_type!r} ({getattr(config, 'architectures', None)}); "
            f"specserve runs {', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
        )
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: only SwiGLU ('silu') MLPs are supported")
    if getattr(config, "mlp_bias", False):
        raise ValueError("unsupported: mlp_bias=True")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    max_pos = config.max_position_embeddings
    window = getattr(config, "sliding_window", None)
    if window and (model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        # full attention equals sliding-window attention while the context fits the window
        max_pos = min(max_pos, window)
    return ModelArchitecture(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        rms_norm_eps=config.rms_norm_eps,
        qkv_bias=qkv_bias,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=max_pos,
    )


def rope_frequencies(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq, float(scaling)


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path!r}; expected an HF checkpoint directory")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as fh:
                for name in fh.keys():
                    tensors[name] = fh.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{f!r} is not a readable safetensors file ({e}): the checkpoint is truncated or "
                             "corrupted; re-export or re-copy it") from e
    return tensors


def _to_our_names(hf: dict[str, torch.Tensor], arch: ModelArchitecture) -> dict[str, torch.Tensor]:
    """Map HF parameter names onto ours, fusing q/k/v and gate/up."""
    prefix = "model."
    out = {
        "embed_tokens.weight": hf[prefix + "embed_tokens.weight"],
        "norm.weight": hf[prefix + "norm.weight"],
    }
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = hf["lm_head.weight"]
    for i in range(arch.num_layers):
        p = f"{prefix}layers.{i}."
        q = f"layers.{i}."
        attn = p + "self_attn."
        out[q + "self_attn.qkv_proj.weight"] = torch.cat(
            [hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"]]
        )
        if arch.qkv_bias:
            out[q + "self_attn.qkv_proj.bias"] = torch.cat(
                [hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"]]
            )
        out[q + "self_attn.o_proj.weight"] = hf[attn + "o_proj.weight"]
        out[q + "mlp.gate_up_proj.weight"] = torch.cat([hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"]])
        out[q + "mlp.down_proj.weight"] = hf[p + "mlp.down_proj.weight"]
        out[q + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
    return out


def load_config(path: str) -> PretrainedConfig:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path!r} is not a directory (expected an HF checkpoint directory)")
    return AutoConfig.from_pretrained(path)


def load_model(path: str, dtype: str | torch.dtype = "auto", device: str = "cpu") -> LlamaModel:
    """Build our LlamaModel from an HF checkpoint directory; weights cast to `dtype` (see `resolve_dtype`)."""
    config = load_config(path)
    arch = read_architecture(config)
    inv_freq, scaling = rope_frequencies(config, arch.head_dim)
    torch_dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = LlamaModel(arch, inv_freq, scaling)
    state = {k: v.to(torch_dtype) for k, v in _to_our_names(_read_checkpoint(path), arch).items()}
    model.load_state_dict(state, strict=False, assign=True)
    # non-persistent buffers were built on meta: rebuild them for real
    model.rotary = type(model.rotary)(inv_freq, scaling)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks parameters {missing[:5]}")
    return model.to(device).eval().requires_grad_(False)
