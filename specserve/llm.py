"""LLM: the synchronous Python API. `LLM(verifier=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from specserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from specserve.engine.engine import LLMEngine
from specserve.engine.logprobs import TokenLogprobs
from specserve.sampling_params import SamplingParams


@dataclass
class Completion:
    prompt: str | list[int]
    text: str
    token_ids: list[int]
    finish_reason: str
    num_prompt_tokens: int
    logprobs: list[TokenLogprobs] | None = None
    """One per generated token, with SamplingParams.logprobs: the verifier's raw logprobs (engine/logprobs.py)."""
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """One per prompt token (None for the first), with SamplingParams.prompt_logprobs."""


class LLM:
    def __init__(
        self,
        verifier: str | None = None,
        draft: str | None = None,
        dtype: str = "auto",
        num_speculative_tokens: int | None = None,
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        speculative: SpeculativeConfig | None = None,
        device: str = "cpu",
        draft_model=None,
        cuda_graphs: bool = True,
        upcast_matmuls: str = "auto",
        batch_invariant: bool = False,
    ) -> None:
        if verifier is None:
            from specserve.model.default_models import default_verifier

            verifier = default_verifier()
        speculative = speculative or SpeculativeConfig(draft=draft, num_speculative_tokens=num_speculative_tokens)
        self.config = EngineConfig(
            verifier=verifier,
            dtype=dtype,
            device=device,
            cuda_graphs=cuda_graphs,
            upcast_matmuls=upcast_matmuls,
            batch_invariant=batch_invariant,
            cache=cache or CacheConfig(),
            scheduler=scheduler or SchedulerConfig(),
            speculative=speculative,
        )
        self.engine = LLMEngine(self.config, draft_model=draft_model)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        progress: bool = False,
    ) -> list[Completion]:
        """Generate for every prompt (text or token ids), batched continuously; results in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params_list):
                ids.append(self.engine.add_request(p, sp))
        except ValueError:
            for rid in ids:  # all or nothing: a bad prompt leaves no request behind
                self.engine.abort_request(rid)
            raise
        finished = {}
        bar = tqdm(total=len(ids), desc="generate", disable=not progress)
        try:
            while len(finished) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
                failed = self.engine.take_failed()
                if failed:
                    rid, error = failed[0]
                    raise RuntimeError(f"request {rid} failed: {error!r}") from error
        finally:
            bar.close()
            for rid in ids:
                if rid not in finished:
                    self.engine.abort_request(rid)
        return [
            Completion(
                p,
                (out := finished[r]).text,
                out.token_ids,
                out.finish_reason,
                out.num_prompt_tokens,
                out.logprobs,
                out.prompt_logprobs,
            )
            for p, r in zip(prompts, ids)
        ]
