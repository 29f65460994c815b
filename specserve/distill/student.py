"""The student (the draft being distilled): built from the verifier, trained in HF transformers, saved for the engine.

Two ways to build it:

- fresh (`StudentSpec(layers, hidden, heads, ...)`): a small Llama with the verifier's vocabulary,
  tokenizer, RoPE, norm epsilon, context length and embedding tying. Its embedding matrix starts from the
  verifier's: copied when the widths match, otherwise projected onto the verifier embeddings' top
  `hidden` principal directions (E V_d, from the eigenvectors of E^T E) and rescaled to the verifier's
  per-element RMS, so that similar tokens start close together (zero-padded if the student is wider).
  An untied output layer is projected the same way on its own principal directions. Everything else is
  HF's random initialisation.
- from layers (`StudentSpec(init_from_layers=(0, 1, 2, 3))`, DistilBERT-style): the verifier's
  architecture with only those decoder layers (renumbered 0..n-1), its embeddings, final norm and output layer.

The student is an fp32 `LlamaForCausalLM`; `save_student` writes it with `save_pretrained` plus the
verifier's tokenizer files, so our loader (and `--draft`) loads it directly. Knows nothing about data or losses.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

TOKENIZER_FILES_PREFIX = "tokenizer"
EXTRA_FILES = (
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class StudentSpec:
    layers: int | None = None
    """Decoder layers of a fresh student (default 4; with init_from_layers: must equal their number if given)."""
    hidden: int | None = None
    """Hidden width of a fresh student (default 256)."""
    heads: int | None = None
    """Attention heads (default hidden // 64, at least 1); must divide hidden."""
    kv_heads: int | None = None
    """Key/value heads for grouped-query attention (default: heads); must divide heads."""
    intermediate: int | None = None
    """MLP width (default: the verifier's intermediate/hidden ratio times hidden, rounded up to a multiple of 64)."""
    init_from_layers: tuple[int, ...] | None = None
    """Copy these verifier layers (and embeddings, norm, output layer) instead of building a fresh model."""

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"student {name} must be >= 1, got {v}")
        if self.init_from_layers is not None:
            if not self.init_from_layers:
                raise ValueError("init_from_layers must name at least one verifier layer")
            if len(set(self.init_from_layers)) != len(self.init_from_layers):
                raise ValueError(f"init_from_layers names a layer twice: {list(self.init_from_layers)}")
            shape = [n for n in ("hidden", "heads", "kv_heads", "intermediate") if getattr(self, n) is not None]
            if shape:
                raise ValueError(
                    f"init_from_layers copies the verifier's layer shape; drop --student-{shape[0]} "
                    "(or drop --init-from-layers for a fresh student)"
                )
            if self.layers is not None and self.layers != len(self.init_from_layers):
                raise ValueError(
                    f"--student-layers {self.layers} disagrees with the {len(self.init_from_layers)} "
                    f"layers of --init-from-layers {list(self.init_from_layers)}"
                )


def parse_layers(text: str) -> tuple[int, ...]:
    """'0,1,2,3' or '0-3' (or a mix: '0-2,5') -> (0, 1, 2, 3)."""
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError as e:
        raise ValueError(f"--init-from-layers takes layer indices like '0,1,2,3' or '0-3', got {text!r}") from e
    return tuple(out)


def _fresh_config(verifier: LlamaConfig, spec: StudentSpec) -> LlamaConfig:
    hidden = spec.hidden or 256
    heads = spec.heads or max(1, hidden // 64)
    kv_heads = spec.kv_heads or heads
    if hidden % heads:
        raise ValueError(f"student heads ({heads}) must divide student hidden ({hidden})")
    if heads % kv_heads:
        raise ValueError(f"student kv heads ({kv_heads}) must divide student heads ({heads})")
    if (hidden // heads) % 2:
        raise ValueError(f"student head_dim {hidden // heads} (hidden / heads) must be even for rotary embeddings")
    ratio = verifier.intermediate_size / verifier.hidden_size
    intermediate = spec.intermediate or -(-round(ratio * hidden) // 64) * 64
    config = LlamaConfig(**verifier.to_dict())
    config.architectures = ["LlamaForCausalLM"]
    config.num_hidden_layers = spec.layers or 4
    config.hidden_size = hidden
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.head_dim = hidden // heads
    config.intermediate_size = intermediate
    config.attention_bias = False
    config.mlp_bias = False
    config.hidden_act = "silu"
    return config


def _project(weight: torch.Tensor, width: int) -> torch.Tensor:  # [vocab, hidden] -> [vocab, width]
    """Rows of `weight` projected onto its top-`width` principal directions, rescaled to the same per-element RMS."""
    w = weight.float()
    if width >= w.shape[1]:
        out = torch.zeros(w.shape[0], width)
        out[:, : w.shape[1]] = w
        return out
    _, vecs = torch.linalg.eigh(w.T @ w)  # ascending eigenvalues; [hidden, hidden]
    out = w @ vecs[:, -width:].flip(-1)  # [vocab, width]
    return out * (w.pow(2).mean().sqrt() / out.pow(2).mean().sqrt().clamp_min(1e-12))


def _load_teacher_state(verifier_path: str) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(verifier_path, dtype=torch.float32)
    return model.state_dict()


def build_student(verifier_path: str, spec: StudentSpec, seed: int = 0) -> LlamaForCausalLM:
    """An fp32 `LlamaForCausalLM` student for the verifier at `verifier_path` (an HF checkpoint directory)."""
    vconfig = AutoConfig.from_pretrained(verifier_path)
    if vconfig.model_type != "llama":
        raise ValueError(
            f"distillation builds Llama students from Llama verifiers; {verifier_path!r} is a "
            f"{vconfig.model_type!r} model"
        )
    teacher = _load_teacher_state(verifier_path)
    torch.manual_seed(seed)
    if spec.init_from_layers is not None:
        layers = spec.init_from_layers
        bad = [i for i in layers if not 0 <= i < vconfig.num_hidden_layers]
        if bad:
            last = vconfig.num_hidden_layers - 1
            raise ValueError(f"--init-from-layers {list(layers)}: the verifier has layers 0..{last}")
        config = LlamaConfig(**vconfig.to_dict())
        config.num_hidden_layers = len(layers)
        student = LlamaForCausalLM(config)
        state = {}
        for name, tensor in teacher.items():
            if name.startswith("model.layers."):
                parts = name.split(".")
                i = int(parts[2])
                if i in layers:
                    parts[2] = str(layers.index(i))
                    state[".".join(parts)] = tensor
            else:
                state[name] = tensor
        student.load_state_dict(state, strict=False)
        missing = set(student.state_dict()) - set(state)
        if missing:
            raise ValueError(f"verifier checkpoint lacks {sorted(missing)[:5]}")
    else:
        config = _fresh_config(vconfig, spec)
        student = LlamaForCausalLM(config)
        with torch.no_grad():
            emb = teacher["model.embed_tokens.weight"]
            student.model.embed_tokens.weight.copy_(_project(emb, config.hidden_size))
            if not config.tie_word_embeddings and "lm_head.weight" in teacher:
                student.lm_head.weight.copy_(_project(teacher["lm_head.weight"], config.hidden_size))
    return student.float()


def copy_tokenizer_files(src: str, dst: str) -> None:
    for name in os.listdir(src):
        if name.startswith(TOKENIZER_FILES_PREFIX) or name in EXTRA_FILES:
            shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def save_student(
    student: LlamaForCausalLM, verifier_path: str, out: str, extra_files: dict[str, str] | None = None
) -> str:
    """Write the student to `out` atomically: save into `out.tmp`, then swap it in with renames.

    `extra_files` maps file names to text written beside the weights (e.g. distill.json).
    """
    out = os.path.normpath(out)
    tmp, old = out + ".tmp", out + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp)
    copy_tokenizer_files(verifier_path, tmp)  # the verifier's generation_config (EOS ids) replaces the student's
    for name, text in (extra_files or {}).items():
        with open(os.path.join(tmp, name), "w") as f:
            f.write(text)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out
