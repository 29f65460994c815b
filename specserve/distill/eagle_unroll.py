"""The EAGLE head unrolled on its own features during training (EAGLE-3's "training-time test").

When the engine drafts k tokens, the head's first step reads the verifier's true feature f_{t-1};
every later step reads the feature the head itself predicted one position earlier, and attends over
a KV cache whose verified prefix was computed from true features while the chain's own positions were
computed from predicted ones. Training only on true features (teacher forcing) never shows the head
that situation. Here step s = 1..S runs over every position of a packed batch in parallel:

    step 1:  position i reads (x_i, f_{i-1})                      -> g1_i
    step s:  position i reads (x_i, g(s-1)_{i-1})                 -> gs_i   (a chain that began at t = i - s + 1)

and the query of step s at position i attends exactly what it would see while drafting: the step-1 keys
of positions <= t (the verified prefix, true features) and the step-r key of position t + r - 1 for
r = 2..s (the chain so far). The KV of all steps lies step-major in one scratch pool of S * tokens slots;
the mask says which of them each query reads. Rows with i < s - 1 have no such chain and are not scored.
Step 1 alone is exactly the teacher-forced forward of `eagle_trainer.head_forward`.

Every step is scored against the same targets (f_i and the verifier's top-m at i), weighted decay^(s-1).
Evaluation chains the steps: a draft at depth s is accepted only if depths 1..s were.

Knows nothing about data files, the optimiser or checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specserve.model.attention import AttentionMetadata
from specserve.model.eagle import EagleHead


def step_metadata(seq_lens: list[int], step: int, device) -> AttentionMetadata:
    """Attention of unrolled step `step` (1-based) over the KV of steps 1..step, pooled step-major."""
    n, b, longest = sum(seq_lens), len(seq_lens), max(seq_lens)
    lens = torch.tensor(seq_lens, device=device)  # [batch]
    starts = lens.cumsum(0) - lens  # [batch]
    j = torch.arange(longest, device=device)  # [longest] key position
    i = j[:, None]  # [longest, 1] query position
    own = (starts[:, None] + j[None, :]).clamp(max=n - 1)  # [batch, longest] slot of each position in step 1
    context_slots = torch.cat([own + r * n for r in range(step)], dim=1)  # [batch, step * longest]
    key_exists = (j[None, :] < lens[:, None])[:, None, :]  # [batch, 1, longest]
    blocks = [(j[None, :] <= i - step + 1)[None] & key_exists]  # step 1: the verified prefix up to t
    for r in range(2, step + 1):  # step r: the chain's own position t + r - 1 only
        blocks.append((j[None, :] == i - step + r)[None] & key_exists)
    mask = torch.cat(blocks, dim=2)  # [batch, longest, step * longest]
    pad = j[None, :] >= lens[:, None]  # [batch, longest] padding query rows
    mask[:, :, 0] |= pad  # attend to something, so softmax never sees an empty row
    token_index = None
    if min(seq_lens) != longest:
        token_index = torch.cat([k * longest + torch.arange(q, device=device) for k, q in enumerate(seq_lens)])
    slot_mapping = (step - 1) * n + torch.arange(n, device=device)  # [tokens]
    return AttentionMetadata(slot_mapping, context_slots, mask[:, None], token_index, b, longest)


def shift_features(
    predicted: torch.Tensor,  # [tokens, hidden]: a step's prediction at each position
    positions: torch.Tensor,  # [tokens]
) -> torch.Tensor:  # [tokens, hidden]: the next step's input, the prediction one position earlier
    shifted = torch.cat([predicted.new_zeros(1, predicted.shape[1]), predicted[:-1]])
    return torch.where((positions == 0)[:, None], torch.zeros_like(shifted), shifted)


class UnrolledHead(nn.Module):
    """The head run `steps` times over one packed batch, each step on the previous step's predictions.

    One module, so DistributedDataParallel sees one forward per optimizer step.
    """

    def __init__(self, head: EagleHead, steps: int) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.head = head
        self.steps = steps

    def forward(
        self,
        input_ids: torch.Tensor,  # [tokens] x_i
        positions: torch.Tensor,  # [tokens]
        features: torch.Tensor,  # [tokens, hidden] f_{i-1} (zeros at i = 0), noise already added
        seq_lens: list[int],
    ) -> torch.Tensor:  # [steps, tokens, hidden]: step s's predicted features
        a = self.head.arch
        n = input_ids.numel()
        kv = torch.zeros(1, 2, self.steps * n, a.num_kv_heads, a.head_dim, device=input_ids.device)
        if torch.is_grad_enabled():  # a non-leaf, so attention may write keys/values into it in place under autograd
            kv = kv.requires_grad_().clone()
        out = []
        for s in range(1, self.steps + 1):
            meta = step_metadata(seq_lens, s, input_ids.device)
            predicted = self.head(input_ids, positions, kv, meta, features)  # [tokens, hidden]
            out.append(predicted)
            features = shift_features(predicted, positions)
        return torch.stack(out)


def noisy(features: torch.Tensor, noise: float) -> torch.Tensor:
    """Uniform noise relative to each row's RMS: the head must tolerate imperfect input features."""
    if noise <= 0:
        return features
    rms = features.pow(2).mean(-1, keepdim=True).sqrt()
    return features + (torch.rand_like(features) * 2 - 1) * noise * rms


def step_rows(batch, step: int) -> torch.Tensor:  # [tokens] bool
    """Positions scored at unrolled step `step`: a next token exists and a chain of that depth fits."""
    return batch.loss_mask & (batch.positions >= step - 1)


def masked_row_losses(
    head: EagleHead,
    batch,
    predicted: torch.Tensor,  # [tokens, hidden]
    rows: torch.Tensor,  # [tokens] bool
) -> tuple[torch.Tensor, torch.Tensor]:  # [rows], [rows]
    """Per scored row: smooth-L1 of the normed features and the cross-entropy against the verifier's top-m."""
    norm = head.verifier.norm
    feat = F.smooth_l1_loss(norm(predicted[rows]), norm(batch.target_features[rows]), reduction="none").mean(-1)
    logq = torch.log_softmax(head.draft_logits(predicted[rows]), dim=-1)  # [rows, draft_vocab]
    picked = logq.gather(1, batch.topm_ids[rows].clamp_min(0))
    kl = -(batch.topm_probs[rows] * picked).sum(-1)
    return feat, kl


def unrolled_losses(
    head: EagleHead,
    batch,
    predicted: torch.Tensor,  # [steps, tokens, hidden]
    decay: float,
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """(feature loss, distribution loss) weighted over steps by decay^(s-1) (weights summing to 1), and the
    distribution loss of each step."""
    weights = [decay**s for s in range(predicted.shape[0])]
    total = sum(weights)
    feat = kl = predicted.new_zeros(())
    per_step = []
    for s, w in enumerate(weights, start=1):
        f, k = masked_row_losses(head, batch, predicted[s - 1], step_rows(batch, s))
        feat = feat + (w / total) * f.mean()
        kl = kl + (w / total) * k.mean()
        per_step.append(k.mean().item())
    return feat, kl, per_step


@torch.no_grad()
def evaluate_chained(head: EagleHead, batches: list, depth: int) -> dict:
    """The head unrolled `depth` steps on held-out sequences, no noise.

    * `agreement`, `expected_acceptance`: one step ahead from true features over every position with a
      next token (as `eagle_trainer.evaluate`).
    * `agreement_at[s - 1]`: greedy decoding, the share of chains starting in a response whose first s drafts
      are all accepted: at each depth the head's argmax is the verifier's top-1 and the sequence goes on
      with that token (so the chain's inputs are what drafting would see; exact on the verifier's greedy
      answers, a lower bound elsewhere).
    * `acceptance_at[s - 1]`: the product over depths 1..s of sum_x min(p(x), q(x)) along the sequence
      (p: the verifier's top-m, so each factor is a lower bound): the chance the first s drafts are all
      accepted by speculative sampling at temperature 1, with the sequence's tokens as the path.
    * `accepted_tokens` = sum(acceptance_at), `greedy_accepted_tokens` = sum(agreement_at): the expected
      accepted drafts of a chain of `depth`.
    """
    unrolled = UnrolledHead(head, depth)
    agree = accept = rows = 0.0
    chained_agree = [0.0] * depth
    chained_accept = [0.0] * depth
    chains = [0] * depth
    for b in batches:
        pred = unrolled(b.input_ids, b.positions, b.in_features, b.seq_lens)  # [depth, tokens, hidden]
        n = b.num_tokens
        seq_id = torch.repeat_interleave(torch.arange(len(b.seq_lens)), torch.tensor(b.seq_lens)).to(pred.device)
        top1 = b.topm_ids[:, 0]  # [tokens]
        g_prod = torch.ones(n, device=pred.device)  # chain products by start position t
        a_prod = torch.ones(n, device=pred.device)
        for s in range(1, depth + 1):
            q = torch.softmax(head.draft_logits(pred[s - 1]), dim=-1)  # [tokens, draft_vocab]
            hit = ((q.argmax(-1) == top1) & (top1 >= 0) & b.next_is_top1).float()  # [tokens]
            q_at = q.gather(1, b.topm_ids.clamp_min(0)) * (b.topm_ids >= 0)  # [tokens, m]
            alpha = torch.minimum(b.topm_p, q_at).sum(-1)  # [tokens]
            if s == 1:
                m = b.loss_mask
                agree += ((q.argmax(-1) == top1) & (top1 >= 0) & m).sum().item()
                accept += (alpha * m).sum().item()
                rows += m.sum().item()
            # chain from t reaches depth s at position t + s - 1
            at = torch.arange(n, device=pred.device) + (s - 1)
            inside = at < n
            at = at.clamp(max=n - 1)
            valid = b.chain_start & inside & (seq_id[at] == seq_id) & b.loss_mask[at]  # [tokens]
            g_prod = g_prod * hit[at]
            a_prod = a_prod * alpha[at]
            chained_agree[s - 1] += (g_prod * valid).sum().item()
            chained_accept[s - 1] += (a_prod * valid).sum().item()
            chains[s - 1] += int(valid.sum().item())
    agreement_at = [x / max(c, 1) for x, c in zip(chained_agree, chains)]
    acceptance_at = [x / max(c, 1) for x, c in zip(chained_accept, chains)]
    return {
        "agreement": agree / max(rows, 1),
        "expected_acceptance": accept / max(rows, 1),
        "agreement_at": agreement_at,
        "acceptance_at": acceptance_at,
        "accepted_tokens": sum(acceptance_at),
        "greedy_accepted_tokens": sum(agreement_at),
        "chains": chains,
    }
