"""What each configuration promises (specserve/engine/numerics.py) and what the 'auto' dtype resolves to."""

from __future__ import annotations

import pytest
import torch

from specserve.config import EngineConfig, SpeculativeConfig
from specserve.engine.numerics import Numerics
from specserve.model.loader import auto_dtype, resolve_dtype


@pytest.mark.parametrize(
    ("dtype", "k", "batch_invariant", "greedy", "seeded"),
    [
        (torch.float32, None, False, True, False),  # adaptive k follows timings: a seed may take another path
        (torch.float32, 3, False, True, True),
        (torch.bfloat16, 3, False, False, False),  # bf16 rounds 1-row and (k + 1)-row passes differently
        (torch.bfloat16, None, False, False, False),
        (torch.bfloat16, 3, True, True, True),
        (torch.bfloat16, None, True, True, False),
    ],
)
def test_what_a_configuration_promises(tiny, monkeypatch, dtype, k, batch_invariant, greedy, seeded):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # batch_invariant validates on the CPU only under the interpreter
    spec = SpeculativeConfig(draft=tiny["draft"], num_speculative_tokens=k)
    config = EngineConfig(verifier=tiny["llama"], speculative=spec, batch_invariant=batch_invariant)
    n = Numerics.of(config, dtype)
    assert (n.greedy_equals_plain, n.seeded_reproducible) == (greedy, seeded)
    assert n.speculation_length == ("adaptive" if k is None else "fixed")
    assert n.dtype == str(dtype).removeprefix("torch.")


def test_plain_decoding_promises_reproducible_seeds(tiny):
    n = Numerics.of(EngineConfig(verifier=tiny["llama"]), torch.float32)
    assert n.speculation_length == "none" and n.seeded_reproducible
    assert n.header().startswith("dtype=float32; batch-invariant=no; greedy-equals-plain=yes")


def test_auto_dtype_is_fp32_on_any_cpu_and_bf16_on_cuda():
    assert auto_dtype("cpu") == torch.float32 and resolve_dtype("auto", "cpu") == torch.float32
    assert auto_dtype("cuda") == torch.bfloat16 and resolve_dtype("auto", "cuda:1") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16 and resolve_dtype(torch.float32) == torch.float32
    with pytest.raises(ValueError, match="auto"):
        resolve_dtype("fp8")


def test_the_default_engine_dtype_is_auto(tiny):
    assert EngineConfig(verifier=tiny["llama"]).dtype == "auto"
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(verifier=tiny["llama"], dtype="int8")
