"""SamplingParams: what one request asks of the sampler, validated on construction.

Knows nothing about models, tokenizers or batches; the engine turns these fields into
per-request tensors (temperature, top-k, top-p rows) and a per-request generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate (>= 1)."""
    temperature: float = 1.0
    """0 means greedy (argmax); > 0 scales the logits before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p; in (0, 1]."""
    top_k: int = -1
    """Keep the top_k most likely tokens; -1 (or 0) keeps all."""
    seed: int | None = None
    """Seed of this request's own generator: the same seed gives the same output."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; the matched string is not returned."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end generation, in addition to the tokenizer's EOS."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use it to fix the output length)."""
    logprobs: int | None = None
    """Report each generated token's logprob and the n = logprobs most likely alternatives (0: the token's
    own only); None reports none and costs nothing. Raw logprobs: the verifier's log_softmax at temperature 1,
    before temperature / top-k / top-p (vLLM's default), the same under speculation as in plain decoding."""
    prompt_logprobs: int | None = None
    """The same for every prompt token but the first (which has no context to be scored in); None: none.
    Such a request computes logits over its whole prompt and skips the prefix cache until it has them."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0):  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or an integer >= 0, got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {n!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
