"""Is the EAGLE head served as it was trained, and does its trimmed vocabulary cost acceptance?

On Spec-Bench prompts (held out: evaluation only), the verifier's greedy answers are generated with plain
decoding; one verifier pass over prompt + answer gives its features (as wide as the head reads them), and the
head, teacher-forced over them as in training (`eagle_trainer.head_forward`), predicts every answer token from
the true features. Per category it reports:
- how often the verifier's token lies in the head's draft vocabulary, or outside it but earlier in the context;
- the head's top-1 agreement with the verifier over its draft vocabulary (what it can propose), over the draft
  vocabulary plus every token of the context so far, and over the whole vocabulary (its output layer is rows of
  the verifier's, so any token can be scored);
- a check of the serving path: greedy speculative decoding with k = 1 through the engine (the head catching up
  on true features after every verification) against a replay of the same process on the teacher-forced
  agreements. Equal rates mean no train/serve skew; the outputs must also equal plain decoding.

    .venv/bin/python bench/figures/2026-12-03-served/served_vs_teacher_forced.py [PER_CATEGORY] [DRAFT] [OUT.json]
"""

import collections
import json
import sys

import torch
from transformers import AutoTokenizer

from specserve import LLM
from specserve.config import SpeculativeConfig
from specserve.distill.eagle_data import TeacherSequence, verifier_batches
from specserve.distill.eagle_trainer import head_forward, make_batch
from specserve.evaluation.prompts import load_prompts
from specserve.model.default_models import default_verifier
from specserve.model.eagle import load_eagle
from specserve.sampling_params import SamplingParams

MAX_TOKENS = 64


def main() -> None:
    per_category = int(sys.argv[1]) if len(sys.argv) > 1 else 12
    draft = sys.argv[2] if len(sys.argv) > 2 else "specserve/drafts/smollm2-135m-eagle"
    out_path = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(2)
    verifier_dir = default_verifier()
    prompts = load_prompts(AutoTokenizer.from_pretrained(verifier_dir), per_category)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    plain = LLM(verifier_dir)
    answers = [c.token_ids for c in plain.generate([p.token_ids for p in prompts], greedy)]
    verifier = plain.engine.runner.model
    head = load_eagle(draft, verifier, verifier_dir)
    verifier.feature_layers = head.feature_layers
    seqs = [p.token_ids + a for p, a in zip(prompts, answers)]
    features = {}
    for indices, f, _ in verifier_batches(verifier, seqs, logits=False):
        row = 0
        for i in indices:
            features[i] = f[row : row + len(seqs[i])]
            row += len(seqs[i])
    weight = verifier.output_weight.float()
    vocab = weight.shape[0]
    in_draft = torch.zeros(vocab, dtype=torch.bool)
    in_draft[head.draft_vocab] = True
    to_draft = torch.full((vocab,), -1, dtype=torch.long)
    to_draft[head.draft_vocab] = torch.arange(head.draft_vocab.numel())
    stats: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids, n, first = seqs[i], len(seqs[i]), len(p.token_ids)
            if n - first < 2:
                continue
            t = torch.tensor(ids)
            empty = torch.zeros(n, 1)
            seq = TeacherSequence(t, features[i].bfloat16(), empty.int(), empty.half(), first)
            predicted = head_forward(head, head, make_batch([seq], to_draft, "cpu"), 0.0)  # [n, hidden]
            logits = torch.nn.functional.linear(verifier.norm(predicted), weight)  # position i predicts i + 1
            c = stats[p.category]
            agree = {}
            for pos in range(first, n - 1):  # the first answer token comes from the prefill, not a draft
                target, row = ids[pos + 1], logits[pos]
                seen = torch.tensor(sorted(set(ids[: pos + 1])))
                union = torch.unique(torch.cat([head.draft_vocab, seen]))
                agree[pos] = int(head.draft_vocab[row[head.draft_vocab].argmax()]) == target
                c["positions"] += 1
                c["in_draft_vocab"] += bool(in_draft[target])
                c["in_context_only"] += (not in_draft[target]) and target in ids[: pos + 1]
                c["agree_draft_vocab"] += agree[pos]
                c["agree_draft_vocab_and_context"] += int(union[row[union].argmax()]) == target
                c["agree_full_vocab"] += int(row.argmax()) == target
            pos = first  # greedy k = 1 replayed: an accepted draft adds a bonus token, a rejected one the fix
            while pos + 1 < n - 1:
                c["replay_drafted"] += 1
                c["replay_accepted"] += agree[pos]
                pos += 2 if agree[pos] else 1
    spec = LLM(verifier_dir, speculative=SpeculativeConfig(draft=draft, num_speculative_tokens=1, method="draft"))
    served = [c.token_ids for c in spec.generate([p.token_ids for p in prompts], greedy)]
    total = spec.engine.metrics.total_speculation()
    rates = {}
    for name, c in [*sorted(stats.items()), ("overall", sum(stats.values(), collections.Counter()))]:
        n = c["positions"]
        rates[name] = {k: round(v / n, 4) for k, v in c.items() if k not in ("positions", "replay_drafted")}
        rates[name]["replay_accepted"] = round(c["replay_accepted"] / c["replay_drafted"], 4)
        rates[name]["positions"] = n
    result = {
        "command": " ".join(["python", *sys.argv]),
        "draft": draft,
        "per_category": per_category,
        "max_tokens": MAX_TOKENS,
        "rates": rates,
        "served_k1": {
            "drafted": total.drafted_tokens,
            "accepted": total.accepted_tokens,
            "rate": round(total.accepted_tokens / max(1, total.drafted_tokens), 4),
            "outputs_equal_plain": sum(a == b for a, b in zip(answers, served)),
            "prompts": len(prompts),
        },
    }
    for name, r in rates.items():
        print(
            f"{name:15s} n={r['positions']:5d} in draft vocab {r['in_draft_vocab']:.3f} (context only "
            f"{r['in_context_only']:.3f}); top-1 agreement: draft vocab {r['agree_draft_vocab']:.3f}, + context "
            f"{r['agree_draft_vocab_and_context']:.3f}, full vocab {r['agree_full_vocab']:.3f}; k=1 replay "
            f"{r['replay_accepted']:.3f}"
        )
    s = result["served_k1"]
    print(f"served k=1: {s['accepted']}/{s['drafted']} = {s['rate']:.3f}; outputs = plain: {s['outputs_equal_plain']}/"
          f"{s['prompts']}")
    if out_path:
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
