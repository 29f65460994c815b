"""Does a verification pass compute the same bits as the decode steps it replaces? (SmolLM2, fp32, CPU default)

    OMP_NUM_THREADS=1 .venv/bin/python bench/figures/2026-12-02-exact/verify_equals_decode.py

Scores 8 tokens after 290 tokens of context in one forward, alone and batched beside another request's decode
step, and compares the logits with 8 single-token forwards. On the 2-core Xeon (AVX-512, AMX) of 2026-12-02 all
three are bit-identical: the packed oneDNN linear layers give every row the same bits whatever the row count,
and the attention reads each request's own context. On the tiny test models (hidden 64) they are not
bit-identical (within 1e-5), so the tests assert closeness and equal argmax, not bits.
"""

import torch

from specserve.engine.model_runner import ModelRunner, TokenRun
from specserve.model.default_models import default_verifier
from specserve.model.loader import load_model
from specserve.model.upcast import enable_upcast

torch.set_num_threads(1)
model = load_model(default_verifier(), torch.float32, "cpu")
enable_upcast(model)
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.arch.vocab_size, (300,), generator=gen).tolist()
other_ids = torch.randint(0, model.arch.vocab_size, (200,), generator=gen).tolist()
drafts = ids[290:298]
with torch.inference_mode():
    runner = ModelRunner(model, 64, 16)
    mine, other = list(range(32)), list(range(32, 64))
    runner.forward([TokenRun(ids[:290], 0, mine, 1)])
    runner.forward([TokenRun(other_ids[:150], 0, other, 1)])
    alone = runner.forward([TokenRun(drafts, 290, mine, len(drafts))])  # [8, vocab]
    batched = runner.forward([TokenRun(drafts, 290, mine, len(drafts)), TokenRun(other_ids[150:151], 150, other, 1)])
    steps = torch.cat([runner.forward([TokenRun([t], 290 + i, mine, 1)]) for i, t in enumerate(drafts)])
print("verification alone == decode steps, bit for bit:", torch.equal(alone, steps))
print("verification batched with a decode == decode steps, bit for bit:", torch.equal(batched[:8], steps))
print("largest difference:", (alone - steps).abs().max().item(), (batched[:8] - steps).abs().max().item())
