"""StandaloneStudent: what the online trainer does with a standalone draft (an HF LlamaForCausalLM of its own).

Loads it in fp32, turns records into examples (`examples.prepare`), scores a batch with `distill_loss` against the
logged top-m (config.loss at config.temperature, the rows weighted), measures it on held-out examples
(`evaluation.evaluate`) and writes it as an HF checkpoint with the verifier's tokenizer files. Holds no weights: the
trainer owns the student and the current draft. Knows nothing about the store, the registry or the training loop.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, LlamaForCausalLM

from specserve.distill.losses import distill_loss
from specserve.distill.student import save_student
from specserve.distill.trainer import RowLogits
from specserve.online.evaluation import evaluate
from specserve.online.examples import Example, collate, prepare

if TYPE_CHECKING:
    from specserve.online.trainer_config import OnlineTrainerConfig
    from specserve.traffic.record import TrafficRecord


def load_draft(path: str, vocab_size: int, device: torch.device) -> LlamaForCausalLM:
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "llama":
        raise ValueError(f"the online trainer trains Llama-architecture drafts; {path!r} is a {config.model_type!r}")
    if config.vocab_size != vocab_size:
        raise ValueError(f"draft {path!r} has vocab_size {config.vocab_size}, the verifier {vocab_size}")
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()


class StandaloneStudent:
    draft_type = "standalone"

    def __init__(self, config: OnlineTrainerConfig, vocab_size: int, device: torch.device) -> None:
        self.config = config
        self.vocab_size = vocab_size
        self.device = device

    def load(self, path: str) -> LlamaForCausalLM:
        """The checkpoint at `path`, fp32, in training mode."""
        return load_draft(path, self.vocab_size, self.device)

    def frozen_copy(self, model: LlamaForCausalLM) -> LlamaForCausalLM:
        return copy.deepcopy(model).eval().requires_grad_(False)

    def examples(self, records: list[TrafficRecord]) -> list[Example | None]:
        """One example per record (None: nothing to learn from it)."""
        c = self.config
        return [prepare(r, c.max_seq_tokens, c.w_rejected) for r in records]

    def loss(self, model: LlamaForCausalLM, examples: list[Example]) -> torch.Tensor:
        c = self.config
        b = collate(examples, self.device)
        logits = RowLogits(model)(b.input_ids, b.attention_mask, b.rows)  # [rows, vocab]
        return distill_loss(logits, b.teacher, c.loss, c.temperature, c.jsd_beta, weights=b.weights)

    def evaluate(self, model: LlamaForCausalLM, examples: list[Example]) -> dict:
        """acceptance, greedy_agreement, positions (evaluation.evaluate)."""
        return evaluate(model, examples, self.config.max_batch_rows, self.device)

    def save(self, model: LlamaForCausalLM, out: str) -> str:
        """Write the draft as a flat HF checkpoint directory `out`; returns it."""
        return save_student(model, self.config.verifier, out)

    def manifest_fields(self, model: LlamaForCausalLM) -> dict:
        return {"loss": self.config.loss}
