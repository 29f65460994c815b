"""EagleStudent: what the online trainer does with an EAGLE head (`specserve.model.eagle`) as its draft.

Log or recompute. The traffic log holds no verifier features, deliberately: bf16 hidden states would cost
2 x hidden bytes per generated token (~1.1 KB on SmolLM2, about 9x a whole record's ~120 bytes at m = 20), paid on
every request whether or not a head is ever trained. The trainer recomputes them instead: for each page of records it
reads, one batched, teacher-forced verifier forward (`eagle_data.verifier_batches`, output layer skipped) over every
example's tokens (prompt + output, the same left-truncated window the head trains on), kept beside the example in
memory as bf16 (2 x hidden bytes per token of the replay window and held-out slice; a restarted trainer recomputes
its window). The verifier's logits are not recomputed: the logged top-m stays the distribution target. The price: an
fp32 copy of the verifier in the trainer process and one verifier forward per record read.

Training and evaluation follow `eagle_trainer`: teacher-forced, at position i the head reads x_i and the true
f_{i-1} (zeros at the window's first position, as the server hands it where a feature is unknown; uniform noise of
`feature_noise` x RMS while training), predicts f_i and is scored, at the output positions only, by
    feature_weight * smooth_l1(norm(f^_i), norm(f_i)) + cross-entropy vs the logged top-m restricted to the head's
    draft vocabulary and renormalised there (its forward KL up to the teacher's entropy),
each position weighted as on the standalone path (`w_rejected` where the draft was rejected). Held-out expected
acceptance is evaluation's sum_{x in S} min(p(x), q(x)), one step ahead from true features, q being 0 outside the
draft vocabulary. The head keeps the draft vocabulary of the version it starts from. Versions are EAGLE checkpoints
(`EagleHead.save`, the verifier's tokenizer files beside) that `load_eagle` loads. Holds the verifier, never a head:
the trainer owns the student and the current draft. Knows nothing about the store, the registry or the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from specserve.distill.eagle_data import verifier_batches
from specserve.distill.eagle_trainer import HeadBatch, head_forward, pack_batch, row_losses
from specserve.distill.eagle_trainer import evaluate as evaluate_head
from specserve.distill.student import copy_tokenizer_files
from specserve.model.eagle import EagleHead, load_eagle
from specserve.model.loader import load_model
from specserve.online.examples import Example, chunks, prepare

if TYPE_CHECKING:
    from specserve.online.trainer_config import OnlineTrainerConfig
    from specserve.traffic.record import TrafficRecord


@dataclass
class EagleExample(Example):
    features: torch.Tensor  # [seq, width] bf16: the verifier's feature f_i at each position (EagleHead.feature_width)


class EagleStudent:
    draft_type = "eagle"

    def __init__(self, config: OnlineTrainerConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        # fp32, as eagle_trainer: the features' source, and the frozen embedding / norm / output layer heads use
        self.verifier = load_model(config.verifier, torch.float32, str(device))

    def load(self, path: str) -> EagleHead:
        """The head at `path` on the fp32 verifier, in training mode (load_eagle checks it fits this verifier); the
        verifier's features are recomputed as wide as the head reads them (its feature_layers)."""
        head = load_eagle(path, self.verifier, self.config.verifier).requires_grad_(True).train()
        self.verifier.feature_layers = head.feature_layers
        return head

    def frozen_copy(self, head: EagleHead) -> EagleHead:
        # not deepcopy: that would copy the verifier the head reads too
        twin = EagleHead(self.verifier, head.draft_vocab if head.trimmed else None, head.feature_layers)
        twin.load_state_dict(head.state_dict())
        return twin.to(self.device).eval().requires_grad_(False)

    def examples(self, records: list[TrafficRecord]) -> list[EagleExample | None]:
        """One example per record (None: nothing to learn from it), with the verifier's features recomputed."""
        c = self.config
        prepared = [prepare(r, c.max_seq_tokens, c.w_rejected) for r in records]
        kept = [e for e in prepared if e is not None]
        sequences = [e.input_ids.tolist() for e in kept]
        features: list[torch.Tensor | None] = [None] * len(kept)
        if kept:
            for indices, feats, _ in verifier_batches(self.verifier, sequences, logits=False):
                rows = feats.to(torch.bfloat16).cpu()  # [tokens of this batch, hidden]
                for i, f in zip(indices, rows.split([len(sequences[i]) for i in indices])):
                    features[i] = f.clone()  # its own storage: the example may outlive the rest of the batch
        found = iter(features)
        return [
            None if e is None else EagleExample(**{f.name: getattr(e, f.name) for f in fields(e)}, features=next(found))
            for e in prepared
        ]

    def batch(self, head: EagleHead, examples: list[EagleExample]) -> tuple[HeadBatch, torch.Tensor]:
        """The examples packed for the head (scored: their output rows only) and the rows' [rows] loss weights."""
        to_draft = torch.full((head.arch.vocab_size,), -1, dtype=torch.int64)  # token id -> draft-vocabulary index
        to_draft[head.draft_vocab.cpu()] = torch.arange(head.draft_vocab_size)
        m = min(e.topm_ids.shape[1] for e in examples)
        topm_ids, topm_logprobs, masks = [], [], []
        for e in examples:
            n, rows = e.input_ids.numel(), slice(e.first_row, e.first_row + e.rows)
            ids = torch.full((n, m), -1, dtype=torch.int64)  # [seq, m]: -1 (no target) off the output rows
            ids[rows] = to_draft[e.topm_ids[:, :m]]
            logprobs = torch.zeros(n, m)  # [seq, m]
            logprobs[rows] = e.topm_logprobs[:, :m]
            mask = torch.zeros(n, dtype=torch.bool)  # [seq]
            mask[rows] = True
            topm_ids.append(ids)
            topm_logprobs.append(logprobs)
            masks.append(mask)
        batch = pack_batch(
            [e.input_ids for e in examples], [e.features for e in examples], topm_ids, topm_logprobs, masks,
            self.device, head.arch.hidden_size,
        )
        return batch, torch.cat([e.weights for e in examples]).to(self.device)

    def loss(self, head: EagleHead, examples: list[EagleExample]) -> torch.Tensor:
        c = self.config
        batch, weights = self.batch(head, examples)
        predicted = head_forward(head, head, batch, c.feature_noise)  # [tokens, hidden]
        feature, distribution = row_losses(head, batch, predicted)  # [rows] each
        return (weights * (c.feature_weight * feature + distribution)).sum() / weights.sum()

    @torch.no_grad()
    def evaluate(self, head: EagleHead, examples: list[EagleExample]) -> dict:
        """acceptance, greedy_agreement, positions: as evaluation.evaluate, one step ahead from true features."""
        was_training = head.training
        head.eval()
        acceptance = agree = positions = 0.0
        for group in chunks(examples, self.config.max_batch_rows):
            batch, _ = self.batch(head, group)
            rows = int(batch.loss_mask.sum())
            measured = evaluate_head(head, [batch])  # means over this batch's rows
            acceptance += measured["expected_acceptance"] * rows
            agree += measured["agreement"] * rows
            positions += rows
        head.train(was_training)
        return {
            "acceptance": acceptance / max(positions, 1),
            "greedy_agreement": agree / max(positions, 1),
            "positions": int(positions),
        }

    def save(self, head: EagleHead, out: str) -> str:
        """Write the head as a flat EAGLE checkpoint directory `out` (load_eagle reads it); returns it."""
        head.save(out, self.config.verifier)
        copy_tokenizer_files(self.config.verifier, out)
        return out

    def manifest_fields(self, head: EagleHead) -> dict:
        c = self.config
        return {
            "loss": "fkl",
            "feature_weight": c.feature_weight,
            "feature_noise": c.feature_noise,
            "draft_vocab_size": head.draft_vocab_size,
        }
