"""Acceptance statistics of speculative runs, and the speedup Leviathan et al.'s formula predicts from them.

Works on plain numbers: a request's step log (k drafted, accepted, emitted per engine step) and the
measured cost ratios. Knows nothing about engines, timing or prompts.
"""

from __future__ import annotations

from specserve.engine.speculation_length import expected_speedup


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is unknown or b is 0."""
    return a / b if a is not None and b else None


def spec_counts(steps: list[tuple[int, int, int]]) -> dict:
    """Acceptance counts of one request from its step log.

    Per draft position j: drafted (steps with k > j), reached (the draft at j was checked: k > j and
    every earlier one accepted) and accepted. `decode_steps_by_k[k]`: steps that emitted tokens with k drafts.
    """
    drafted: list[int] = []
    reached: list[int] = []
    accepted: list[int] = []
    by_k: list[int] = []
    verification_steps = 0
    for k, a, emitted in steps:
        if emitted:
            by_k.extend([0] * (k + 1 - len(by_k)))
            by_k[k] += 1
        if k == 0:
            continue
        verification_steps += 1
        for lst in (drafted, reached, accepted):
            lst.extend([0] * (k - len(lst)))
        for j in range(k):
            drafted[j] += 1
            reached[j] += a >= j
            accepted[j] += a > j
    return {
        "verification_steps": verification_steps,
        "drafted_per_position": drafted,
        "reached_per_position": reached,
        "accepted_per_position": accepted,
        "decode_steps_by_k": by_k,
    }


def add_lists(a: list[int], b: list[int]) -> list[int]:
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n)]


def acceptance_summary(records: list[dict], cost: dict | None) -> dict:
    """Pooled acceptance of some runs of one speculative system, and the speedup the formula predicts.

    alpha is the per-token acceptance probability of Leviathan et al.'s i.i.d. model, estimated by
    maximum likelihood: accepted drafts / drafts checked (a draft after a rejection is never checked).
    `predicted_speedup` is expected tokens / expected cost over the decode steps' actual k, with
    expected_speedup(alpha, k, c) * (1 + k c) tokens and 1 + k c verifier steps for a step drafting k:
    exactly expected_speedup(alpha, K, c) when every step drafts K (k = 0 steps, such as the one
    emitting a prompt's first token, count at speedup 1). `predicted_speedup_verify_cost` charges the
    verifier's measured (k + 1)-token forward instead of a free one: cost t(k + 1) / t(1) + k c.
    """
    total = {
        "verification_steps": 0,
        "drafted_per_position": [],
        "reached_per_position": [],
        "accepted_per_position": [],
        "decode_steps_by_k": [],
    }
    for r in records:
        s = r["spec"]
        total["verification_steps"] += s["verification_steps"]
        for key in ("drafted_per_position", "reached_per_position", "accepted_per_position", "decode_steps_by_k"):
            total[key] = add_lists(total[key], s[key])
    drafted, reached, accepted = (
        sum(total[k]) for k in ("drafted_per_position", "reached_per_position", "accepted_per_position")
    )
    steps = total["verification_steps"]
    alpha = accepted / reached if reached else None
    predicted = predicted_verify = None
    by_k = list(enumerate(total["decode_steps_by_k"]))
    if alpha is not None and cost is not None and by_k:
        c, verify = cost["c"], cost["verify_cost"]
        tokens = sum(n * expected_speedup(alpha, k, c) * (1 + k * c) for k, n in by_k)
        predicted = tokens / sum(n * (1 + k * c) for k, n in by_k)
        if len(verify) >= len(by_k):
            predicted_verify = tokens / sum(n * (verify[k] + k * c) for k, n in by_k)
    return {
        "verification_steps": steps,
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "mean_k": drafted / steps if steps else None,
        "alpha": alpha,
        "acceptance_rate": accepted / drafted if drafted else None,
        "mean_acceptance_length": (accepted + steps) / steps if steps else None,
        "per_position_acceptance": [
            ratio(a, d) for a, d in zip(total["accepted_per_position"], total["drafted_per_position"], strict=True)
        ],
        "per_position_conditional": [
            ratio(a, r) for a, r in zip(total["accepted_per_position"], total["reached_per_position"], strict=True)
        ],
        "decode_steps_by_k": total["decode_steps_by_k"],
        "predicted_speedup": predicted,
        "predicted_speedup_verify_cost": predicted_verify,
    }
