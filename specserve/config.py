"""Engine configuration: a few frozen dataclasses, validated on construction; the CLI is built from them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from specserve.model.loader import DTYPE_CHOICES
from specserve.model.upcast import UPCAST_MODES


def default_device() -> str:
    """The CLI's default device: cuda when a CUDA GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory: int = 1 << 30
    """Bytes for the KV pools of both models together; sets the number of blocks. 1 GiB: what `specserve serve`
    has always reserved (about 20k tokens of SmolLM2-135M in float32, verifier and draft), within the CPU
    deployment's memory limit; a GPU server sets more (--kv-cache-memory)."""
    num_blocks: int | None = None
    """Exact number of KV blocks (overrides kv_cache_memory; tests use tiny pools)."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks whose tokens (and everything before them) match an earlier request."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {self.kv_cache_memory}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    """Most requests running at once (continuous batching)."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: decode tokens, speculative tokens and prefill chunks together."""
    max_model_len: int | None = None
    """Longest prompt + output; defaults to the verifier's max_position_embeddings."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class SpeculativeConfig:
    draft: str | None = None
    """HF checkpoint directory of the draft model (same vocabulary as the verifier); None: no speculation."""
    num_speculative_tokens: int | None = None
    """Fixed k; None picks k per request from its acceptance rate and the draft/verifier cost ratio."""
    max_speculative_tokens: int = 8
    """Upper bound of the adaptive k."""
    max_batch_speculative_tokens: int = 64
    """Cap on draft tokens verified per step over the whole batch: verifying is only free while small."""
    method: str | None = None
    """'draft' (the draft model), 'ngram' (prompt lookup, no model), 'hybrid' (n-gram when it matches,
    else the draft model). None: 'hybrid' with a draft model, no speculation without one."""
    ngram_min: int = 2
    """Shortest context tail the n-gram proposer matches."""
    ngram_max: int = 4
    """Longest context tail the n-gram proposer tries first."""

    @property
    def resolved_method(self) -> str | None:
        if self.method is not None:
            return self.method
        return "hybrid" if self.draft is not None else None

    def __post_init__(self) -> None:
        if self.method not in (None, "draft", "ngram", "hybrid"):
            raise ValueError(f"method must be 'draft', 'ngram' or 'hybrid', got {self.method!r}")
        if self.method in ("draft", "hybrid") and self.draft is None:
            raise ValueError(f"speculative method {self.method!r} needs a draft model")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min}, {self.ngram_max}")
        if self.num_speculative_tokens is not None and not (0 <= self.num_speculative_tokens <= 32):
            raise ValueError(f"num_speculative_tokens must be in [0, 32], got {self.num_speculative_tokens}")
        if not (1 <= self.max_speculative_tokens <= 32):
            raise ValueError(f"max_speculative_tokens must be in [1, 32], got {self.max_speculative_tokens}")
        if self.max_batch_speculative_tokens < 1:
            raise ValueError(f"max_batch_speculative_tokens must be >= 1, got {self.max_batch_speculative_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    verifier: str
    """HF checkpoint directory of the verifier (the model whose output distribution is served)."""
    dtype: str = "auto"
    """Weights and activations: 'auto' (default: float32 on the CPU, where greedy speculation is exact;
    bfloat16 on CUDA, exact with batch_invariant; see model/loader.py auto_dtype), bfloat16, float32, float16."""
    device: str = "cpu"
    """torch device of both models: 'cpu', 'cuda' or 'cuda:N' (the CLI defaults to cuda when one is visible)."""
    cuda_graphs: bool = True
    """On CUDA: capture the verifier's and the draft's small decode/verification passes as CUDA graphs at
    start and replay them, so a decode step launches no kernels from Python. Ignored on the CPU."""
    upcast_matmuls: str = "auto"
    """CPU matmul paths (specserve/model/upcast.py). 'on': bf16/fp16 matmuls over 3+ rows (prefill,
    verification) run in fp32 on an fp32 copy of the weights on a CPU without native bf16; fp32 weights, and
    bf16 ones on a CPU with native bf16 (AVX512-BF16/AMX), run every matmul on a oneDNN-packed copy, from one
    row. 'auto': on wherever one of these applies (every CPU but fp16 on one with native bf16). 'off': never."""
    batch_invariant: bool = False
    """Batch-invariant numerics (CUDA): every matmul, RMSNorm and attention call computes a row the same way
    whatever its batch (fixed-tile Triton kernels, specserve/kernels/batch_invariant.py), so a request's tokens do
    not depend on k or on the other requests it was batched with, in bf16 too. Slower than cuBLAS; replaces
    upcast matmuls. On the CPU only under TRITON_INTERPRET=1 (tests): use float32 there instead."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    trace_topm: int = 0
    """Keep the verifier's top-m log-probs of every generated position and each verification step's
    counts, and hand them out with the finished request (for the traffic log). 0: keep nothing."""

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(
                f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {self.device!r}"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} needs a CUDA GPU, and torch sees none")
        if not 0 <= self.trace_topm <= 1000:
            raise ValueError(f"trace_topm must be in [0, 1000], got {self.trace_topm}")
        if self.upcast_matmuls not in UPCAST_MODES:
            raise ValueError(f"upcast_matmuls must be one of {UPCAST_MODES}, got {self.upcast_matmuls!r}")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.batch_invariant and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "batch_invariant needs CUDA (its Triton kernels run on the CPU only under TRITON_INTERPRET=1, "
                "far too slowly to serve); on the CPU, dtype float32 (the 'auto' default there) keeps greedy "
                "speculation equal to plain decoding"
            )
