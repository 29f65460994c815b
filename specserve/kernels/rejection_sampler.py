"""Rejection sampling for speculative decoding: decide which draft tokens to keep and emit one more.

Vocabulary used throughout this module (and its tests):

* **draft** -- the up-to-``k`` tokens proposed by the small model for one request, together
  with the draft model's probabilities ``q`` at each drafted position. ``q`` may be omitted
  (``draft_probs=None``): the proposer is then treated as deterministic, i.e. ``q`` is one-hot
  at the drafted token (greedy draft models, n-gram / prompt-lookup proposals).
* **target** -- the verifier model's probabilities ``p`` at the ``k + 1`` positions of the same
  forward pass: row ``j`` (``j < k``) is the distribution that draft token ``j`` is checked
  against, row ``k`` is the distribution of the token after the last draft token.
* **accepted** -- the draft tokens that are kept. They always form a prefix of the draft:
  checking stops at the first rejection.
* **recovered** -- the token emitted at the first rejected position ``j``. For a sampled request
  it is drawn from ``normalise(max(p_j - q_j, 0))`` (the residual distribution); for a greedy
  request it is ``argmax(p_j)``.
* **bonus** -- the token emitted when all ``k_i`` draft tokens are accepted: drawn from the last
  target row ``p[k_i]`` (``argmax(p[k_i])`` for a greedy request).

So each request emits ``num_accepted`` accepted tokens followed by exactly one recovered-or-bonus
token; the rest of its output row is padded with ``-1`` (:data:`PLACEHOLDER_TOKEN_ID`). The
draft token ids use the same ``-1`` padding beyond each request's ``k_i``.

Acceptance rule (sampled requests): draft token ``x`` at position ``j`` is accepted iff
``p_j(x) > 0 and uniform[j] * q_j(x) <= p_j(x)``, which accepts with probability
``min(1, p_j(x) / q_j(x))``. The explicit ``p_j(x) > 0`` guard matters in two corner cases:
a ``uniform`` draw of exactly 0 (``torch.rand`` can produce it) would otherwise accept a token
the target gives zero probability, and ``q_j(x) == 0`` (impossible for a token actually sampled
from ``q``, but possible with stale or filtered draft probabilities) would otherwise accept
anything; with the guard such a token is accepted iff the target could have produced it.
If the residual ``max(p_j - q_j, 0)`` is all zeros (``p_j == q_j`` up to rounding, so a
rejection "cannot" happen), the recovered token falls back to a sample from ``p_j``.

Randomness is supplied by the caller so that the CPU reference and the Triton kernel are
bit-for-bit comparable: ``uniform`` holds the U(0, 1) acceptance draws and ``exp_noise`` holds
Exp(1) draws. A token is sampled from unnormalised weights ``w`` as ``argmax_v w_v / exp_noise_v``
(the "exponential race", an exact categorical sample that needs no normalisation); entries with
``w_v == 0`` never win unless every weight is zero. ``exp_noise`` should be strictly positive: a
draw of exactly 0 hands its token the race whatever its weight, and float32
``Tensor.exponential_`` can return 0 (roughly once per 2**24 draws), so clamp it, e.g.
``exp_noise.clamp_min_(torch.finfo(torch.float32).tiny)``. One noise row per request is enough because
a request draws either a recovered or a bonus token, never both. Argmax ties resolve to the
lowest token id, as ``torch.argmax`` does.

Example (request 0 is greedy, request 1 is sampled; the randomness is fixed by hand)::

    >>> import torch
    >>> from specserve.kernels import rejection_sample
    >>> target_probs = torch.tensor([  # [batch=2, max_k + 1=3, vocab=4]
    ...     [[0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.1, 0.1, 0.1, 0.7]],
    ...     [[0.1, 0.6, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.1, 0.1, 0.1, 0.7]],
    ... ])
    >>> draft_probs = torch.tensor([  # [batch=2, max_k=2, vocab=4]
    ...     [[0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]],
    ...     [[0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]],
    ... ])
    >>> draft_token_ids = torch.tensor([[1, 0], [1, 2]])  # [batch, max_k]
    >>> num_draft_tokens = torch.tensor([2, 2])  # [batch]
    >>> uniform = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # [batch, max_k]
    >>> exp_noise = torch.ones(2, 4)  # [batch, vocab]
    >>> is_greedy = torch.tensor([True, False])  # [batch]
    >>> output_token_ids, num_accepted = rejection_sample(
    ...     draft_token_ids, draft_probs, target_probs, num_draft_tokens,
    ...     uniform, exp_noise, is_greedy)
    >>> output_token_ids
    tensor([[ 1,  0,  3],
            [ 1,  0, -1]])
    >>> num_accepted
    tensor([2, 1])

Request 0 (greedy) drafts the argmax at both positions, so both are accepted and the bonus
token is ``argmax(p[2]) = 3``. Request 1 (sampled) accepts token 1 (``0.5 * 0.7 <= 0.6``),
rejects token 2 (``0.5 * 0.7 > 0.3``) and recovers from ``max(p_1 - q_1, 0) = [0.4, 0, 0, 0]``,
which is token 0 whatever the noise.

Entry points: :func:`rejection_sample_reference` (pure PyTorch; the specification, the CPU
serving path and the test oracle), :func:`rejection_sample_triton` (one Triton program per
request; CUDA, or CPU under ``TRITON_INTERPRET=1``) and :func:`rejection_sample`, which picks
Triton for CUDA tensors and the reference otherwise. Triton is optional: without it the module
still imports and :func:`rejection_sample` always uses the reference.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional; the reference path needs only PyTorch.
    triton = None
    tl = None

__all__ = [
    "PLACEHOLDER_TOKEN_ID",
    "rejection_sample",
    "rejection_sample_reference",
    "rejection_sample_triton",
]

PLACEHOLDER_TOKEN_ID = -1
"""Pads draft token ids beyond ``k_i`` and output slots after the recovered/bonus token."""

# Largest vocab chunk one Triton program loads at a time. 4096 fp32 values is 16 KiB, which
# stays in registers for 8 warps and keeps the number of loop trips over a 128k vocab small.
_MAX_BLOCK_V = 4096


def _check_inputs(
    draft_token_ids: torch.Tensor,  # [batch, max_k]
    draft_probs: torch.Tensor | None,  # [batch, max_k, vocab]
    target_probs: torch.Tensor,  # [batch, max_k + 1, vocab]
    num_draft_tokens: torch.Tensor,  # [batch]
    uniform: torch.Tensor,  # [batch, max_k]
    exp_noise: torch.Tensor,  # [batch, vocab]
    is_greedy: torch.Tensor,  # [batch]
) -> tuple[int, int, int]:
    """Check shapes, dtypes and devices (metadata only, no device sync); return (batch, max_k, vocab)."""
    if draft_token_ids.dim() != 2:
        raise ValueError(f"draft_token_ids must be [batch, max_k], got shape {tuple(draft_token_ids.shape)}")
    batch, max_k = draft_token_ids.shape
    if target_probs.dim() != 3 or target_probs.shape[:2] != (batch, max_k + 1):
        raise ValueError(
            f"target_probs must be [batch={batch}, max_k + 1={max_k + 1}, vocab], got shape {tuple(target_probs.shape)}"
        )
    vocab = target_probs.shape[2]
    if vocab < 1:
        raise ValueError(f"vocab must be at least 1, got target_probs shape {tuple(target_probs.shape)}")

    expected_shapes = {
        "num_draft_tokens": (num_draft_tokens, (batch,)),
        "uniform": (uniform, (batch, max_k)),
        "exp_noise": (exp_noise, (batch, vocab)),
        "is_greedy": (is_greedy, (batch,)),
    }
    if draft_probs is not None:
        expected_shapes["draft_probs"] = (draft_probs, (batch, max_k, vocab))
    for name, (tensor, shape) in expected_shapes.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")

    expected_dtypes = {
        "draft_token_ids": (draft_token_ids, torch.int64),
        "target_probs": (target_probs, torch.float32),
        "num_draft_tokens": (num_draft_tokens, torch.int64),
        "uniform": (uniform, torch.float32),
        "exp_noise": (exp_noise, torch.float32),
        "is_greedy": (is_greedy, torch.bool),
    }
    if draft_probs is not None:
        expected_dtypes["draft_probs"] = (draft_probs, torch.float32)
    for name, (tensor, dtype) in expected_dtypes.items():
        if tensor.dtype != dtype:
            raise ValueError(f"{name} must be {dtype}, got {tensor.dtype}")
        if tensor.device != target_probs.device:
            raise ValueError(f"{name} is on {tensor.device} but target_probs is on {target_probs.device}")
    return batch, max_k, vocab


def _race_scores(
    weights: torch.Tensor,  # [batch, vocab], unnormalised, >= 0
    exp_noise: torch.Tensor,  # [batch, vocab], Exp(1)
) -> torch.Tensor:  # [batch, vocab]
    """Exponential-race scores: ``argmax`` of the result samples one token per row from ``weights``."""
    # Zero weights are pinned to score 0 rather than divided: 0 / 0 (a zero noise draw) would be
    # NaN, and torch.argmax treats NaN as the maximum.
    return torch.where(weights > 0, weights / exp_noise, 0.0)


def rejection_sample_reference(
    draft_token_ids: torch.Tensor,  # [batch, max_k] int64, -1 beyond num_draft_tokens
    draft_probs: torch.Tensor | None,  # [batch, max_k, vocab] float32; None = one-hot drafts
    target_probs: torch.Tensor,  # [batch, max_k + 1, vocab] float32
    num_draft_tokens: torch.Tensor,  # [batch] int64, each in [0, max_k]
    uniform: torch.Tensor,  # [batch, max_k] float32, U(0, 1)
    exp_noise: torch.Tensor,  # [batch, vocab] float32, Exp(1)
    is_greedy: torch.Tensor,  # [batch] bool
) -> tuple[torch.Tensor, torch.Tensor]:  # ([batch, max_k + 1] int64, [batch] int64)
    """Pure-PyTorch rejection sampler; the specification the Triton kernel is tested against.

    Returns ``(output_token_ids, num_accepted)``: row ``b`` of ``output_token_ids`` holds the
    ``num_accepted[b]`` accepted draft tokens, then one recovered or bonus token, then ``-1``.
    Vectorised over the batch (no per-request Python loop), so it is also the CPU serving path.
    Unlike the Triton path it validates token ids and ``num_draft_tokens`` values, which costs a
    device sync when called on CUDA tensors.
    """
    batch, max_k, vocab = _check_inputs(
        draft_token_ids, draft_probs, target_probs, num_draft_tokens, uniform, exp_noise, is_greedy
    )
    device = target_probs.device
    if batch > 0:
        lo, hi = int(num_draft_tokens.min()), int(num_draft_tokens.max())
        if lo < 0 or hi > max_k:
            raise ValueError(f"num_draft_tokens must lie in [0, max_k={max_k}], got range [{lo}, {hi}]")

    rows = torch.arange(batch, device=device)  # [batch]
    positions = torch.arange(max_k, device=device)  # [max_k]
    is_draft = positions[None, :] < num_draft_tokens[:, None]  # [batch, max_k]
    if bool(((draft_token_ids < 0) | (draft_token_ids >= vocab))[is_draft].any()):
        raise ValueError(f"draft_token_ids within num_draft_tokens must lie in [0, vocab={vocab})")
    # Padding slots hold -1, which gather cannot index; park them on token 0. Their verdicts are
    # discarded by `is_draft` below.
    safe_draft = torch.where(is_draft, draft_token_ids, 0)  # [batch, max_k]

    # 1. Verdict for every draft position at once. Only the prefix before the first rejection
    #    counts, which the cumulative product below extracts.
    p_draft = target_probs[:, :max_k].gather(2, safe_draft[:, :, None])[:, :, 0]  # [batch, max_k]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)  # one-hot drafts: q(x) = 1
    else:
        q_draft = draft_probs.gather(2, safe_draft[:, :, None])[:, :, 0]  # [batch, max_k]
    accept = (p_draft > 0) & (uniform * q_draft <= p_draft)  # [batch, max_k]
    if bool(is_greedy.any()):
        # The full-vocab argmax is the expensive part, so skip it for all-sampled batches.
        target_argmax = target_probs[:, :max_k].argmax(dim=2)  # [batch, max_k]
        accept = torch.where(is_greedy[:, None], safe_draft == target_argmax, accept)
    accept &= is_draft
    num_accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [batch]

    # 2. One more token from the target row right after the accepted prefix: recovered if that
    #    row is a rejected draft position, bonus if the whole draft was accepted.
    recovered = num_accepted < num_draft_tokens  # [batch]
    p_row = target_probs[rows, num_accepted]  # [batch, vocab]
    q_row = torch.zeros_like(p_row)  # [batch, vocab]; stays 0 for bonus rows, so residual = p
    if max_k > 0:
        # Bonus rows may have num_accepted == max_k; clamp so the gather stays in bounds, their
        # q is zeroed right after.
        rejected_pos = num_accepted.clamp(max=max_k - 1)  # [batch]
        if draft_probs is None:
            q_row.scatter_(1, safe_draft[rows, rejected_pos][:, None], 1.0)
        else:
            q_row = draft_probs[rows, rejected_pos]  # [batch, vocab]
        q_row = torch.where(recovered[:, None], q_row, 0.0)
    residual = (p_row - q_row).clamp_min_(0.0)  # [batch, vocab]
    # p == q up to rounding leaves no residual mass; sample from p so the draw is still valid.
    has_mass = residual.amax(dim=1, keepdim=True) > 0  # [batch, 1]
    weights = torch.where(has_mass, residual, p_row)  # [batch, vocab]
    # Greedy requests take the plain argmax of p, sampled ones the exponential race over their
    # weights; selecting the scores first lets one argmax serve both.
    scores = torch.where(is_greedy[:, None], p_row, _race_scores(weights, exp_noise))  # [batch, vocab]
    emitted = scores.argmax(dim=1)  # [batch]

    output_token_ids = torch.full((batch, max_k + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=device)
    output_token_ids[:, :max_k] = torch.where(
        positions[None, :] < num_accepted[:, None], draft_token_ids, PLACEHOLDER_TOKEN_ID
    )
    output_token_ids[rows, num_accepted] = emitted
    return output_token_ids, num_accepted


if triton is not None:

    @triton.jit
    def _row_argmax(row_ptr, vocab, BLOCK_V: tl.constexpr):
        """Index of the largest value in one vocab row, lowest index on ties."""
        best_val = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.full((), 0, tl.int32)
        for start in range(0, vocab, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            vals = tl.load(row_ptr + offs, mask=offs < vocab, other=float("-inf"))
            block_val, block_idx = tl.max(vals, axis=0, return_indices=True)
            # Strictly greater: an equal maximum in a later chunk has a higher index and loses.
            better = block_val > best_val
            best_val = tl.where(better, block_val, best_val)
            best_idx = tl.where(better, start + block_idx, best_idx)
        return best_idx

    @triton.jit
    def _sample_row(
        p_row_ptr,
        q_row_ptr,
        noise_row_ptr,
        rejected_token,
        recovered,
        vocab,
        HAS_DRAFT_PROBS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        """Exponential-race sample from max(p - q, 0) (q = 0 unless recovered), falling back to p.

        Both races run in the same pass over the row, so the rare fallback needs no second pass.
        """
        best_res = tl.full((), float("-inf"), tl.float32)
        idx_res = tl.full((), 0, tl.int32)
        best_p = tl.full((), float("-inf"), tl.float32)
        idx_p = tl.full((), 0, tl.int32)
        res_mass = tl.full((), 0.0, tl.float32)
        # Only a recovered row has a q to subtract; a bonus row reads no q at all (its q pointer
        # may be one row past the draft), so its q loads are masked off via a zero length.
        q_len = tl.where(recovered, vocab, 0)
        for start in range(0, vocab, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            in_vocab = offs < vocab
            p = tl.load(p_row_ptr + offs, mask=in_vocab, other=0.0)
            noise = tl.load(noise_row_ptr + offs, mask=in_vocab, other=1.0)
            if HAS_DRAFT_PROBS:
                q = tl.load(q_row_ptr + offs, mask=offs < q_len, other=0.0)
            else:
                # rejected_token is -1 for a bonus row, so the one-hot is empty there.
                q = tl.where(offs == rejected_token, 1.0, 0.0)
            res = tl.maximum(p - q, 0.0)
            res_mass = tl.maximum(res_mass, tl.max(res, axis=0))
            # div_rn: plain `/` lowers to an approximate divide on NVIDIA GPUs, and the race must
            # round exactly like the PyTorch reference to pick the same winner.
            score_res = tl.where(res > 0, tl.math.div_rn(res, noise), 0.0)
            score_p = tl.where(p > 0, tl.math.div_rn(p, noise), 0.0)
            # Lanes past the vocab must never win, not even a race among all-zero weights.
            score_res = tl.where(in_vocab, score_res, float("-inf"))
            score_p = tl.where(in_vocab, score_p, float("-inf"))
            block_res, block_idx_res = tl.max(score_res, axis=0, return_indices=True)
            block_p, block_idx_p = tl.max(score_p, axis=0, return_indices=True)
            better_res = block_res > best_res
            best_res = tl.where(better_res, block_res, best_res)
            idx_res = tl.where(better_res, start + block_idx_res, idx_res)
            better_p = block_p > best_p
            best_p = tl.where(better_p, block_p, best_p)
            idx_p = tl.where(better_p, start + block_idx_p, idx_p)
        return tl.where(res_mass > 0, idx_res, idx_p)

    @triton.jit
    def _rejection_sample_kernel(
        draft_token_ids_ptr,  # [batch, max_k] int64
        draft_probs_ptr,  # [batch, max_k, vocab] float32; any float32 tensor if not HAS_DRAFT_PROBS
        target_probs_ptr,  # [batch, max_k + 1, vocab] float32
        num_draft_tokens_ptr,  # [batch] int64
        uniform_ptr,  # [batch, max_k] float32
        exp_noise_ptr,  # [batch, vocab] float32
        is_greedy_ptr,  # [batch] uint8 (bool storage)
        output_token_ids_ptr,  # [batch, max_k + 1] int64, fully written here
        num_accepted_ptr,  # [batch] int64
        max_k,
        vocab,
        HAS_DRAFT_PROBS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        BLOCK_K: tl.constexpr,  # next power of two >= max_k + 1
    ):
        # One program per request; int64 offsets because batch * (max_k + 1) * vocab can pass 2**31.
        req = tl.program_id(0).to(tl.int64)
        num_draft = tl.load(num_draft_tokens_ptr + req)
        greedy = tl.load(is_greedy_ptr + req) != 0
        draft_row = draft_token_ids_ptr + req * max_k
        target_req = target_probs_ptr + req * (max_k + 1) * vocab
        draft_probs_req = draft_probs_ptr + req * max_k * vocab

        # Walk the draft until the first rejection; `while` rather than `for` so a rejection at
        # position 0 costs one check, not k.
        num_accepted = tl.full((), 0, tl.int64)
        rejected_token = tl.full((), -1, tl.int64)
        checking = num_draft > 0
        while checking:
            token = tl.load(draft_row + num_accepted)
            if greedy:
                best = _row_argmax(target_req + num_accepted * vocab, vocab, BLOCK_V)
                accept = token == best
            else:
                p_tok = tl.load(target_req + num_accepted * vocab + token)
                if HAS_DRAFT_PROBS:
                    q_tok = tl.load(draft_probs_req + num_accepted * vocab + token)
                else:
                    q_tok = 1.0
                u = tl.load(uniform_ptr + req * max_k + num_accepted)
                accept = (p_tok > 0) & (u * q_tok <= p_tok)
            rejected_token = tl.where(accept, rejected_token, token)
            num_accepted = tl.where(accept, num_accepted + 1, num_accepted)
            checking = accept & (num_accepted < num_draft)

        recovered = num_accepted < num_draft
        emit_row = target_req + num_accepted * vocab
        if greedy:
            emitted = _row_argmax(emit_row, vocab, BLOCK_V).to(tl.int64)
        else:
            emitted = _sample_row(
                emit_row,
                draft_probs_req + num_accepted * vocab,
                exp_noise_ptr + req * vocab,
                rejected_token,
                recovered,
                vocab,
                HAS_DRAFT_PROBS,
                BLOCK_V,
            ).to(tl.int64)

        # Accepted prefix, then the emitted token, then -1 padding, in one masked store.
        offs_k = tl.arange(0, BLOCK_K)
        kept = tl.load(draft_row + offs_k, mask=offs_k < num_accepted, other=-1)
        out = tl.where(offs_k == num_accepted, emitted, kept)
        tl.store(output_token_ids_ptr + req * (max_k + 1) + offs_k, out, mask=offs_k < max_k + 1)
        tl.store(num_accepted_ptr + req, num_accepted)

    # The interpreter runs the kernel on host memory; compiled Triton needs CUDA tensors.
    _KERNEL_INTERPRETED = not isinstance(_rejection_sample_kernel, triton.runtime.JITFunction)


def rejection_sample_triton(
    draft_token_ids: torch.Tensor,  # [batch, max_k] int64, -1 beyond num_draft_tokens
    draft_probs: torch.Tensor | None,  # [batch, max_k, vocab] float32; None = one-hot drafts
    target_probs: torch.Tensor,  # [batch, max_k + 1, vocab] float32
    num_draft_tokens: torch.Tensor,  # [batch] int64, each in [0, max_k]
    uniform: torch.Tensor,  # [batch, max_k] float32, U(0, 1)
    exp_noise: torch.Tensor,  # [batch, vocab] float32, Exp(1)
    is_greedy: torch.Tensor,  # [batch] bool
    *,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # ([batch, max_k + 1] int64, [batch] int64)
    """Triton rejection sampler, same contract as :func:`rejection_sample_reference`.

    One program per request walks its draft positions and reduces over the vocab in chunks of
    ``block_v`` (default: the vocab rounded up to a power of two, capped at 4096; tests pass a
    small value to exercise the chunking). Token ids and ``num_draft_tokens`` values are not
    validated here (that would need a device sync); out-of-range values read out of bounds.
    """
    if triton is None:
        raise RuntimeError("rejection_sample_triton needs triton, which is not installed")
    batch, max_k, vocab = _check_inputs(
        draft_token_ids, draft_probs, target_probs, num_draft_tokens, uniform, exp_noise, is_greedy
    )
    if not target_probs.is_cuda and not _KERNEL_INTERPRETED:
        raise ValueError(
            f"rejection_sample_triton got tensors on {target_probs.device}; it needs CUDA tensors "
            "or TRITON_INTERPRET=1 set before triton is imported"
        )
    # The kernel computes row offsets from the shapes, so every buffer must be dense row-major.
    named = {
        "draft_token_ids": draft_token_ids,
        "target_probs": target_probs,
        "num_draft_tokens": num_draft_tokens,
        "uniform": uniform,
        "exp_noise": exp_noise,
        "is_greedy": is_greedy,
    }
    if draft_probs is not None:
        named["draft_probs"] = draft_probs
    for name, tensor in named.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")
    if block_v is None:
        block_v = min(triton.next_power_of_2(vocab), _MAX_BLOCK_V)
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")

    device = target_probs.device
    output_token_ids = torch.empty((batch, max_k + 1), dtype=torch.int64, device=device)
    num_accepted = torch.empty((batch,), dtype=torch.int64, device=device)
    if batch == 0:
        return output_token_ids, num_accepted

    # Never-dereferenced stand-ins (same dtype) for buffers that are empty or absent: with
    # max_k == 0 the draft loop does not run, and without draft_probs the one-hot branch is
    # compiled instead of the load.
    draft_ids_arg = draft_token_ids if max_k > 0 else num_draft_tokens
    uniform_arg = uniform if max_k > 0 else target_probs
    draft_probs_arg = draft_probs if draft_probs is not None and max_k > 0 else target_probs
    _rejection_sample_kernel[(batch,)](
        draft_ids_arg,
        draft_probs_arg,
        target_probs,
        num_draft_tokens,
        uniform_arg,
        exp_noise,
        is_greedy.view(torch.uint8),  # bool pointers are awkward in Triton; same bytes
        output_token_ids,
        num_accepted,
        max_k,
        vocab,
        HAS_DRAFT_PROBS=draft_probs is not None,
        BLOCK_V=block_v,
        BLOCK_K=triton.next_power_of_2(max_k + 1),
        num_warps=8 if block_v >= 2048 else 4,
    )
    return output_token_ids, num_accepted


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [batch, max_k] int64, -1 beyond num_draft_tokens
    draft_probs: torch.Tensor | None,  # [batch, max_k, vocab] float32; None = one-hot drafts
    target_probs: torch.Tensor,  # [batch, max_k + 1, vocab] float32
    num_draft_tokens: torch.Tensor,  # [batch] int64, each in [0, max_k]
    uniform: torch.Tensor,  # [batch, max_k] float32, U(0, 1)
    exp_noise: torch.Tensor,  # [batch, vocab] float32, Exp(1)
    is_greedy: torch.Tensor,  # [batch] bool
) -> tuple[torch.Tensor, torch.Tensor]:  # ([batch, max_k + 1] int64, [batch] int64)
    """Rejection-sample with Triton for CUDA tensors, the PyTorch reference otherwise."""
    args = (draft_token_ids, draft_probs, target_probs, num_draft_tokens, uniform, exp_noise, is_greedy)
    if target_probs.is_cuda and triton is not None:
        return rejection_sample_triton(*args)
    return rejection_sample_reference(*args)
