"""EagleHead: a feature-conditioned draft (EAGLE, Li et al. 2024) that reads the verifier's features.

At position i the head takes the embedding of token x_i and the verifier's feature f_{i-1} (its last
layer's output at the previous position, before the final norm), mixes them with one linear layer
(2 * hidden -> hidden), runs one decoder layer of the verifier's shape over its own paged KV cache, and
predicts f_i. The verifier's frozen final norm and output layer turn the prediction into logits for
x_{i+1}. When drafting several tokens the head feeds its own predicted feature back in.

The head owns only `fc` and its decoder layer. Embedding, final norm and output layer are the
verifier's, used in place (not copied, not saved). With a trimmed draft vocabulary (the N token ids
in `draft_vocab`) the output layer's rows for those ids are gathered once into a derived buffer, so
the head's logit matmul costs N / vocab of the verifier's; every other token gets logit -inf, so the
draft's probability outside its vocabulary is exactly 0 and the rejection sampler stays lossless.

With `feature_layers` (EAGLE-3's fused features, Li et al. 2025) the verifier's feature f_{i-1} is wider: the
residual stream entering each of those layers (low and middle features) beside the last layer's output, side by
side; a linear layer `fuse` ((len(feature_layers) + 1) * hidden -> hidden) maps it to the head's width before
`fc`. The head's own predicted features stay hidden wide and skip `fuse`. Initialised to pass the last layer's
output through unchanged, `fuse` makes a fused head start as the plain head it was warm-started from.

Checkpoint: a directory with config.json (`draft_type: "eagle"`, the shape, `draft_vocab_size`, the
verifier's fingerprint) and model.safetensors (fc, the layer, `draft_vocab`). Knows nothing about
requests, sampling or training.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from specserve.model.attention import AttentionMetadata
from specserve.model.llama import DecoderLayer, FusedLayers, LlamaModel, RotaryEmbedding
from specserve.model.upcast import Linear, UpcastWeight, linear

DRAFT_TYPE = "eagle"


def verifier_fingerprint(verifier_dir: str) -> str:
    """sha256 over the verifier's config.json and its output layer's shape: what the head was trained on."""
    with open(os.path.join(verifier_dir, "config.json"), "rb") as f:
        config = json.loads(f.read())
    keys = (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rope_theta",
        "tie_word_embeddings",
    )
    core = {k: config.get(k) for k in keys}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]


def is_eagle_checkpoint(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f).get("draft_type") == DRAFT_TYPE
    except (OSError, ValueError):
        return False


class EagleHead(nn.Module):
    def __init__(
        self, verifier: LlamaModel, draft_vocab: torch.Tensor | None = None, feature_layers: tuple[int, ...] = ()
    ) -> None:
        super().__init__()
        varch = verifier.arch
        # the shape the model runner allocates KV for: one layer of the verifier's attention
        self.arch = replace(varch, num_layers=1)
        h = varch.hidden_size
        self.feature_layers = tuple(int(i) for i in feature_layers)
        if any(not 0 < i < varch.num_layers for i in self.feature_layers) or len(set(self.feature_layers)) != len(
            self.feature_layers
        ):
            raise ValueError(f"feature_layers must be distinct layers in [1, {varch.num_layers}), got {feature_layers}")
        if self.feature_layers:
            self.fuse = Linear(self.feature_width, h, bias=False)
            with torch.no_grad():  # start as the plain head: the last layer's output passes through
                self.fuse.weight.zero_()
                self.fuse.weight[:, -h:] = torch.eye(h)
        self.fc = Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList([DecoderLayer(self.arch)])
        self.rotary = RotaryEmbedding(verifier.rotary.inv_freq, verifier.rotary.attention_scaling)
        vocab = varch.vocab_size
        ids = torch.arange(vocab) if draft_vocab is None else draft_vocab.to(torch.int64)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab or ids.unique().numel() != ids.numel():
            raise ValueError(f"draft_vocab must hold distinct token ids in [0, {vocab}), got {ids.numel()} ids")
        self.register_buffer("draft_vocab", ids)  # [draft_vocab]
        self.trimmed = draft_vocab is not None and ids.numel() < vocab
        # the verifier is used, not owned: a plain attribute keeps it out of state_dict and parameters()
        object.__setattr__(self, "verifier", verifier)
        self._head_weight: torch.Tensor | None = None  # [draft_vocab, hidden], derived, rebuilt on demand
        self.logits_upcast: UpcastWeight | None = None  # armed by enable_upcast (see upcast.py)
        self.fused_layers = FusedLayers()  # fp32 inference on the CPU: the layer in one C call (cpu_decoder.c)

    @property
    def feature_width(self) -> int:
        """Width of the verifier features the head reads: hidden, times len(feature_layers) + 1."""
        return (len(self.feature_layers) + 1) * self.arch.hidden_size

    @property
    def draft_vocab_size(self) -> int:
        return self.draft_vocab.numel()

    @property
    def output_weight(self) -> torch.Tensor:  # [draft_vocab, hidden]: what `draft_logits` multiplies by
        """The output layer as `enable_upcast` reads it (so its bf16 copy is made, and packed, at start)."""
        return self.head_weight()

    def head_weight(self) -> torch.Tensor:  # [draft_vocab, hidden]
        weight = self.verifier.output_weight
        if not self.trimmed:
            return weight
        if self._head_weight is None or self._head_weight.dtype != weight.dtype:
            self._head_weight = weight[self.draft_vocab.to(weight.device)].detach().clone()
        return self._head_weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_cache: torch.Tensor,  # [1, 2, num_slots, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        features: torch.Tensor,  # [num_tokens, feature_width or hidden]: the verifier's (or the head's) of position - 1
    ) -> torch.Tensor:  # [num_tokens, hidden]: predicted features of these positions
        emb = self.verifier.embed_tokens(input_ids)
        features = features.to(emb.dtype)
        if features.shape[-1] != emb.shape[-1]:  # the verifier's fused features (the head's own are hidden wide)
            if not self.feature_layers or features.shape[-1] != self.feature_width:
                raise ValueError(f"features {features.shape[-1]} wide: the head reads {self.feature_width}")
            features = self.fuse(features)
        x = self.fc(torch.cat([emb, features], dim=-1))
        cos, sin = self.rotary(positions, x.dtype)
        out = self.fused_layers.run(self.layers, self.arch, x, cos, sin, kv_cache, meta)
        if out is not None:
            return out
        return self.layers[0](x, cos, sin, kv_cache[0, 0], kv_cache[0, 1], meta)

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] predicted features -> [rows, draft_vocab] fp32 logits over the draft vocabulary."""
        return linear(self.verifier.norm(hidden), self.head_weight(), None, self.logits_upcast).float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab] fp32 logits; -inf outside the draft vocabulary."""
        small = self.draft_logits(hidden)
        if not self.trimmed:
            return small
        full = small.new_full((small.shape[0], self.arch.vocab_size), float("-inf"))
        full[:, self.draft_vocab.to(full.device)] = small
        return full

    # ---- checkpoint -------------------------------------------------------------------------------

    def save(self, path: str, verifier_dir: str, extra: dict | None = None) -> None:
        os.makedirs(path, exist_ok=True)
        a = self.arch
        config = {
            "draft_type": DRAFT_TYPE,
            "hidden_size": a.hidden_size,
            "intermediate_size": a.intermediate_size,
            "num_attention_heads": a.num_heads,
            "num_key_value_heads": a.num_kv_heads,
            "head_dim": a.head_dim,
            "vocab_size": a.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            **({"feature_layers": list(self.feature_layers)} if self.feature_layers else {}),
            "verifier_fingerprint": verifier_fingerprint(verifier_dir),
            **(extra or {}),
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, "model.safetensors"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def load_eagle(path: str, verifier: LlamaModel, verifier_dir: str) -> EagleHead:
    """Load a head checkpoint for this verifier (same dtype and device); a mismatch is a clear error."""
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    if config.get("draft_type") != DRAFT_TYPE:
        raise ValueError(f"{path!r} is not an EAGLE head checkpoint (draft_type={config.get('draft_type')!r})")
    want = verifier_fingerprint(verifier_dir)
    if config.get("verifier_fingerprint") != want:
        raise ValueError(
            f"EAGLE head {path!r} was trained for verifier {config.get('verifier_fingerprint')}, "
            f"this verifier is {want}: a head only works with the verifier whose features it learned"
        )
    a = verifier.arch
    for key, ours in (("hidden_size", a.hidden_size), ("vocab_size", a.vocab_size), ("head_dim", a.head_dim)):
        if config.get(key) != ours:
            raise ValueError(f"EAGLE head {path!r} has {key}={config.get(key)}, the verifier {ours}")
    state = load_file(os.path.join(path, "model.safetensors"))
    if "draft_vocab" not in state:
        raise ValueError(f"EAGLE head {path!r} lacks its draft_vocab tensor")
    param = next(verifier.parameters())
    vocab = state["draft_vocab"] if config["draft_vocab_size"] < a.vocab_size else None
    head = EagleHead(verifier, vocab, tuple(config.get("feature_layers", ())))
    head.load_state_dict(state, strict=True)
    head.fc.to(param.dtype)
    if head.feature_layers:
        head.fuse.to(param.dtype)
    head.layers.to(param.dtype)  # the rotary frequencies stay fp32, as in the verifier
    return head.to(param.device).eval().requires_grad_(False)
