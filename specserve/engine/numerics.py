"""Numerics: what an engine configuration promises about its outputs' determinism, and how it says so.

Two promises matter to a user of a speculative server:

* **greedy equals plain**: greedy speculative output is token for token the verifier's plain greedy
  output, alone or batched. Speculation changes how many rows a forward computes (1 for a decode
  step, k + 1 for a verification pass, more when batched), and a library matmul rounds a row
  differently by the number of rows beside it. In bf16 that difference (~1e-2 of a logit) flips
  near-ties often: about half of 20 held-out prompts drifted from plain decoding. In fp32 it is
  ~1e-6 of a logit: no flip in 42 held-out Spec-Bench prompts (bench/figures/2026-12-02-exact).
  Batch-invariant kernels (`EngineConfig.batch_invariant`, CUDA) remove the difference itself.
* **seeded reproducible**: a request with a seed gives the same tokens every time, alone or in any
  batch. Speculative sampling consumes random numbers per proposed token, so the path depends on k;
  adaptive k follows measured step times, which vary run to run. Only a fixed k (or no speculation)
  with the numerics above can promise it.

`Numerics.of(config, dtype)` works both out; `/v1/models` reports them and every completion response
carries them in the `X-Specserve-Numerics` header (README: "Determinism").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from specserve.config import EngineConfig

HEADER = "X-Specserve-Numerics"


@dataclass(frozen=True)
class Numerics:
    dtype: str
    """The resolved dtype of weights and activations ('float32', 'bfloat16', 'float16')."""
    batch_invariant: bool
    speculation_length: str
    """'fixed' (--num-speculative-tokens), 'adaptive', or 'none' (plain decoding)."""
    greedy_equals_plain: bool
    seeded_reproducible: bool

    @classmethod
    def of(cls, config: EngineConfig, dtype: torch.dtype) -> Numerics:
        spec = config.speculative
        if spec.resolved_method is None:
            length = "none"
        else:
            length = "adaptive" if spec.num_speculative_tokens is None else "fixed"
        exact = config.batch_invariant or dtype == torch.float32
        return cls(
            dtype=str(dtype).removeprefix("torch."),
            batch_invariant=config.batch_invariant,
            speculation_length=length,
            greedy_equals_plain=exact,
            seeded_reproducible=exact and length != "adaptive",
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def header(self) -> str:
        """One line for the response header, e.g. 'dtype=float32; batch-invariant=no; greedy-equals-plain=yes;
        seeded-reproducible=no; speculation-length=adaptive'."""

        def yes(flag: bool) -> str:
            return "yes" if flag else "no"

        return (
            f"dtype={self.dtype}; batch-invariant={yes(self.batch_invariant)}; "
            f"greedy-equals-plain={yes(self.greedy_equals_plain)}; "
            f"seeded-reproducible={yes(self.seeded_reproducible)}; speculation-length={self.speculation_length}"
        )
