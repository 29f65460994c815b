"""Batch-invariant mode: kernels whose rows do not depend on the launch, and a model and engine built on them.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (conftest sets it without a GPU); the same
properties on real hardware, compiled, are in test_gpu.py. Invariance is asserted bit for bit
(torch.equal), correctness against the PyTorch references with a tolerance.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import PROMPTS, greedy

import specserve.kernels.batch_invariant as bi
from specserve import LLM, SamplingParams
from specserve.config import CacheConfig, EngineConfig
from specserve.engine.model_runner import ModelRunner, TokenRun
from specserve.kernels.batch_invariant import (
    batch_invariant_linear,
    batch_invariant_rms_norm,
    linear_reference,
    rms_norm_reference,
)
from specserve.model.batch_invariant import BatchInvariantLinear, enable_batch_invariant, is_batch_invariant
from specserve.model.loader import load_model
from specserve.model.upcast import enable_upcast

pytestmark = pytest.mark.skipif(
    bi.triton is None or not (torch.cuda.is_available() or bi._INTERPRETED),
    reason="needs triton on CUDA or under TRITON_INTERPRET=1",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---- kernels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_linear_rows_are_the_same_bits_in_any_launch(bias):
    torch.manual_seed(0)
    # K not a multiple of BLOCK_K, N not a multiple of BLOCK_N, M spanning two row tiles
    w = torch.randn(150, 100, device=DEVICE)
    b = torch.randn(150, device=DEVICE) if bias else None
    x = torch.randn(90, 100, device=DEVICE)
    full = batch_invariant_linear(x, w, b)
    torch.testing.assert_close(full, linear_reference(x, w, b), rtol=1e-5, atol=1e-4)
    for rows in (slice(0, 1), slice(3, 4), slice(5, 9), slice(60, 90), slice(63, 66)):
        assert torch.equal(batch_invariant_linear(x[rows], w, b), full[rows]), rows
    # leading dimensions are flattened rows
    assert torch.equal(batch_invariant_linear(x[:12].view(3, 4, 100), w, b), full[:12].view(3, 4, 150))


@pytest.mark.integration
def test_a_library_matmul_is_not_invariant_here_which_is_why_the_kernel_exists():
    """The motivation, measured: F.linear of one row alone and inside a larger product differ in the last bits
    (if some build of torch ever made them equal, the kernel would still be right, so this only reports)."""
    torch.manual_seed(0)
    w, x = torch.randn(1536, 576), torch.randn(8, 576)
    differs = not all(torch.equal(torch.nn.functional.linear(x[:n], w)[0], torch.nn.functional.linear(x[:1], w)[0])
                      for n in range(2, 9))  # fmt: skip
    kernel_same = all(torch.equal(batch_invariant_linear(x[:n], w)[0], batch_invariant_linear(x[:1], w)[0])
                      for n in (2, 5, 8))  # fmt: skip
    assert kernel_same
    print(f"F.linear row 0 depends on the row count: {differs}")


def test_rms_norm_rows_are_the_same_bits_in_any_launch():
    torch.manual_seed(1)
    x, w = torch.randn(40, 96, device=DEVICE), torch.randn(96, device=DEVICE)
    full = batch_invariant_rms_norm(x, w, 1e-5)
    torch.testing.assert_close(full, rms_norm_reference(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    for rows in (slice(0, 1), slice(7, 8), slice(10, 33)):
        assert torch.equal(batch_invariant_rms_norm(x[rows], w, 1e-5), full[rows])


def test_kernels_reject_mixed_dtypes_and_bad_shapes():
    with pytest.raises(ValueError, match="features"):
        batch_invariant_linear(torch.randn(2, 8, device=DEVICE), torch.randn(4, 9, device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        batch_invariant_linear(torch.randn(2, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE).double())


# ---- the model -----------------------------------------------------------------------------------


def armed(path: str, dtype: str) -> torch.nn.Module:
    model = load_model(path, dtype, DEVICE)
    enable_batch_invariant(model)
    return model


@pytest.mark.integration
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_tokens_logits_are_the_same_bits_alone_in_verification_and_in_a_batch(tiny, dtype):
    """Position p of a sequence: decoded alone (1 row), verified among k + 1 rows, and in a step shared with a
    prefill and another decode. The three forwards must give identical logits for it."""
    model = armed(tiny["llama"], dtype)
    assert is_batch_invariant(model) and isinstance(model.layers[0].mlp.down_proj, BatchInvariantLinear)
    seq = list(range(5, 45))  # 40 tokens; position 35 is compared
    other = list(range(100, 160))

    def logits_at_35(runs_before: list[TokenRun], run: TokenRun, runs_after: list[TokenRun]) -> torch.Tensor:
        runner = ModelRunner(model, 64, 4)
        blocks = list(range(10))  # 40 positions in blocks 0..9; the other runs use blocks 20..
        runner.forward([TokenRun(seq[:30], 0, blocks, 0)])  # the same prefix KV in every case
        for r in runs_before + runs_after:
            runner.forward([TokenRun(r.token_ids[:10], 0, r.block_ids, 0)])
        out = runner.forward([*runs_before, run, *runs_after])  # logits of every run's last num_logits rows
        before = sum(r.num_logits for r in runs_before)
        return out[before : before + run.num_logits]

    # alone: prefill up to 35, then decode token 35 (1 row)
    runner = ModelRunner(model, 64, 4)
    runner.forward([TokenRun(seq[:35], 0, list(range(10)), 0)])
    alone = runner.forward([TokenRun(seq[35:36], 35, list(range(10)), 1)])[0]
    # verification: positions 30..37 in one pass (8 rows), position 35 is row 5
    verify = logits_at_35([], TokenRun(seq[30:38], 30, list(range(10)), 8), [])[5]
    # batched: a prefill chunk before it and a decode after it in the same step
    prefill = TokenRun(other[10:40], 10, list(range(20, 35)), 1)
    decode = TokenRun(other[10:11], 10, list(range(40, 55)), 1)
    batched = logits_at_35([prefill], TokenRun(seq[30:38], 30, list(range(10)), 8), [decode])[5]
    assert torch.equal(alone, verify)
    assert torch.equal(alone, batched)
    # and the model still computes the right function: against fp32, no further off than the default kernels
    def default_kernels(dtype: str) -> torch.Tensor:
        plain = load_model(tiny["llama"], dtype, DEVICE)
        return ModelRunner(plain, 64, 4).forward([TokenRun(seq[:36], 0, list(range(10)), 1)])[0]

    exact = default_kernels("float32")
    if dtype == "float32":
        torch.testing.assert_close(alone, exact, rtol=1e-4, atol=1e-4)
    else:
        assert (alone - exact).abs().max() <= 2 * (default_kernels(dtype) - exact).abs().max()


def test_batch_invariance_and_upcast_matmuls_do_not_mix(tiny):
    model = load_model(tiny["llama"], "bfloat16", DEVICE)
    enable_upcast(model)
    with pytest.raises(ValueError, match="upcast"):
        enable_batch_invariant(model)


# ---- the engine ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_greedy_speculation_in_bf16_equals_plain_with_batch_invariance(tiny):
    """bf16, where the default kernels round a 1-row and a (k + 1)-row pass differently: with batch-invariant
    kernels speculation (fixed and adaptive k) reproduces plain greedy decoding, batched or alone."""
    cache = CacheConfig(num_blocks=256, block_size=4)
    plain = LLM(tiny["llama"], dtype="bfloat16", cache=cache, device=DEVICE, batch_invariant=True)
    assert plain.engine.upcast is False
    expected = [plain.generate([p], greedy(12))[0].token_ids for p in PROMPTS[:3]]
    for k in (3, None):
        spec = LLM(tiny["llama"], draft=tiny["draft"], dtype="bfloat16", num_speculative_tokens=k, cache=cache,
                   device=DEVICE, batch_invariant=True)  # fmt: skip
        got = spec.generate(PROMPTS[:3], greedy(12))
        assert [c.token_ids for c in got] == expected, k
        assert spec.engine.metrics.total_speculation().drafted_tokens > 0


@pytest.mark.integration
def test_seeded_sampling_alone_equals_batched_with_batch_invariance(tiny):
    cache = CacheConfig(num_blocks=256, block_size=4)
    spec = LLM(tiny["llama"], draft=tiny["draft"], dtype="bfloat16", num_speculative_tokens=2, cache=cache,
               device=DEVICE, batch_invariant=True)  # fmt: skip
    sampled = SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)
    alone = spec.generate([PROMPTS[1]], sampled)[0].token_ids
    batched = spec.generate(PROMPTS[:3], [greedy(14), sampled, SamplingParams(max_tokens=4, temperature=1.0)])
    assert batched[1].token_ids == alone


def test_batch_invariant_needs_cuda_or_the_interpreter(tiny, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        EngineConfig(verifier=tiny["llama"], device="cpu", batch_invariant=True)
