"""Copy an EAGLE head checkpoint with its weights stored in bf16 (half the bytes): how the shipped head is kept.

    .venv/bin/python bench/figures/2026-12-03-draft/round_head_to_bf16.py SRC_DIR DST_DIR

The engine rounds a draft's weights to bf16 numbers anyway when it serves one beside a verifier of bf16 numbers
(specserve/engine/drafts.py `round_to_bf16`: the C kernel then streams bf16 copies), so storing them in bf16
changes nothing the server computes; the shipped head's Spec-Bench acceptance was the same to two decimals
either way (stage 5, `specserve distill --eval-only`). The vocabulary map and every other file are copied as
they are. Training checkpoints stay fp32 (a resumed run needs the full precision).
"""

import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

src, dst = sys.argv[1], sys.argv[2]
shutil.copytree(src, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns("training_state.pt", "teacher_data.pt"))
state = load_file(os.path.join(src, "model.safetensors"))
rounded = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}
save_file(rounded, os.path.join(dst, "model.safetensors"))
print(f"wrote {dst}: {os.path.getsize(os.path.join(dst, 'model.safetensors')) / 1e6:.1f} MB of weights")
