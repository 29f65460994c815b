"""Rerun an EAGLE run's teacher pass with fused features, on the sequences it already generated.

    .venv/bin/python bench/figures/2026-12-03-fused/retap_teacher_data.py SRC_RUN OUT_RUN 2,15

SRC_RUN/teacher_data.pt holds a self-distillation run's sequences (prompts and the verifier's answers) with the
verifier's last-layer features; this writes OUT_RUN/teacher_data.pt over the same sequences with the inputs of
the given layers tapped beside them (`EagleHead.feature_layers`), keyed as `specserve distill --feature-layers`
with SRC_RUN's other settings expects it, so that run reads it instead of generating the answers again.
"""

import os
import sys
import time

import torch

from specserve.distill.eagle_data import load_teacher_data, save_teacher_data, teacher_pass
from specserve.model.default_models import default_verifier
from specserve.model.loader import load_model

src, out, layers = sys.argv[1], sys.argv[2], tuple(int(x) for x in sys.argv[3].split(","))
saved = torch.load(os.path.join(src, "teacher_data.pt"), weights_only=True)
key = saved["key"]
data = load_teacher_data(os.path.join(src, "teacher_data.pt"), key)
del saved
verifier_dir = default_verifier()
verifier = load_model(verifier_dir, key["teacher_dtype"], "cpu")
verifier.feature_layers = layers
started = time.time()
sequences = [s.token_ids.tolist() for s in data]
prompt_lens = [s.num_prompt_tokens for s in data]
top_m = data[0].topm_ids.shape[1]
del data
fused = teacher_pass(verifier, sequences, prompt_lens, top_m)
os.makedirs(out, exist_ok=True)
save_teacher_data(os.path.join(out, "teacher_data.pt"), fused, {**key, "feature_layers": list(layers)})
print(f"{len(fused)} sequences, {sum(map(len, sequences))} tokens, features {fused[0].features.shape[1]} wide, "
      f"{time.time() - started:.0f} s", flush=True)
