"""The systems a benchmark times: our engine (plain or speculative) and HF transformers (plain or assisted).

Each system loads its models once, then generates for one prompt at a time with `run()`, which
times generation only: the prompt arrives as token ids, so tokenizing lies outside the clock,
and model loading happens in the constructor. It also times the first output token (TTFT), so that a report
can tell prefill from decoding. Knows nothing about prompt sets or reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from specserve.llm import LLM
from specserve.model.loader import resolve_dtype
from specserve.sampling_params import SamplingParams


@dataclass
class Run:
    token_ids: list[int]
    """Output tokens (an EOS that ended the output included)."""
    seconds: float
    """Wall seconds of the whole run."""
    ttft: float
    """Seconds from the start of the run until the first output token was available (the whole run if none came)."""
    steps: list[tuple[int, int, int]] = field(default_factory=list)
    """Our engine only: (draft tokens k, accepted, tokens emitted) per engine step of this request."""


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def kv_blocks_for(num_tokens: int, block_size: int, batch: int = 1) -> int:
    """KV blocks for `batch` sequences of up to `num_tokens` tokens each (the pool is sized for the job)."""
    return batch * (-(-num_tokens // block_size) + 1)


class OursSystem:
    """Our engine via its step loop, so each step's (k, accepted) can be logged without touching the engine."""

    def __init__(
        self,
        name: str,
        verifier: str,
        draft: str | None,
        num_speculative_tokens: int | None,
        dtype: str,
        device: str,
        max_seq_len: int,  # longest prompt + output + draft tokens of one request: sizes KV pool and prefill chunk
        max_batch: int = 1,
        block_size: int = 16,
        method: str | None = None,
        upcast_matmuls: str = "auto",
    ) -> None:
        self.name = name
        self.device = device
        # Prefix caching off: a prompt met again (warm-up, another temperature) must cost what it cost the
        # first time, as it does for HF. One chunk holds the longest prompt, as HF prefills in one pass.
        self.llm = LLM(
            verifier=verifier,
            dtype=dtype,
            device=device,
            upcast_matmuls=upcast_matmuls,
            cache=CacheConfig(
                block_size=block_size,
                num_blocks=kv_blocks_for(max_seq_len, block_size, max_batch),
                enable_prefix_caching=False,
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=max(max_batch, 1),
                max_num_batched_tokens=max(512, max_seq_len),
            ),
            speculative=SpeculativeConfig(
                draft=draft, num_speculative_tokens=num_speculative_tokens, method=method if draft or method else None
            ),
        )
        self.engine = self.llm.engine

    def _counters(self) -> tuple[int, int]:
        stats = self.engine.metrics.total_speculation()  # every proposer source together
        return stats.drafted_tokens, stats.accepted_tokens

    def run(
        self, prompt_ids: list[int], temperature: float, max_tokens: int, seed: int, ignore_eos: bool = False
    ) -> Run:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, ignore_eos=ignore_eos)
        engine = self.engine
        steps: list[tuple[int, int, int]] = []
        done = None
        first_token_at = None
        t0 = time.perf_counter()
        rid = engine.add_request(prompt_ids, params)
        try:
            while done is None:
                drafted0, accepted0 = self._counters()
                outputs = engine.step()
                stepped_at = time.perf_counter()
                drafted1, accepted1 = self._counters()
                emitted = 0
                for out in outputs:
                    if out.request_id == rid:
                        emitted = len(out.delta_token_ids)
                        if emitted and first_token_at is None:
                            first_token_at = stepped_at
                        if out.finished:
                            done = out
                steps.append((drafted1 - drafted0, accepted1 - accepted0, emitted))
        finally:
            if done is None:
                engine.abort_request(rid)
        seconds = time.perf_counter() - t0
        ttft = seconds if first_token_at is None else first_token_at - t0
        return Run(list(done.token_ids), seconds, ttft, steps)

    def run_batch(self, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
        """Greedy, fixed length (ignore_eos), all prompts in one continuous batch: (outputs, wall seconds)."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        seconds = time.perf_counter() - t0
        return [o.token_ids for o in outs], seconds


class FirstTokenClock:
    """A `generate` streamer that notes when the first new token is on the host.

    HF puts the prompt ids first, then each step's new tokens, already copied to the CPU (under assisted
    generation several at once: the first of them is what counts).
    """

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put after the prompt's
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        """Nothing to flush: only the first token's time is kept."""


class HFSystem:
    """HF transformers `generate`, plain or assisted (`assistant_model=` the draft checkpoint)."""

    def __init__(
        self, name: str, verifier: str, draft: str | None, dtype: str, device: str, eos_token_ids: list[int], pad: int
    ) -> None:
        from transformers import AutoModelForCausalLM

        self.name = name
        self.device = device
        torch_dtype = resolve_dtype(dtype, device)
        self.model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch_dtype).to(device).eval()
        self.assistant = None
        if draft is not None:
            self.assistant = AutoModelForCausalLM.from_pretrained(draft, dtype=torch_dtype).to(device).eval()
        # the same stop set as our engine (tokenizer EOS plus the generation config's)
        self.eos_token_ids = list(eos_token_ids)
        self.pad = pad

    def run(
        self, prompt_ids: list[int], temperature: float, max_tokens: int, seed: int, ignore_eos: bool = False
    ) -> Run:
        input_ids = torch.tensor([prompt_ids], device=self.device)  # [1, prompt]
        kwargs = dict(
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad,
        )
        if temperature > 0:
            # top_k=0: HF's default top-k of 50 would otherwise truncate what our engine samples from in full
            kwargs.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False)
        if ignore_eos:
            kwargs["min_new_tokens"] = max_tokens
        if self.assistant is not None:
            kwargs["assistant_model"] = self.assistant
        clock = FirstTokenClock()
        torch.manual_seed(seed)
        synchronize(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids, streamer=clock, **kwargs)  # [1, prompt + new]
        token_ids = out[0, len(prompt_ids) :].tolist()  # .tolist() waits for the device
        seconds = time.perf_counter() - t0
        ttft = seconds if clock.first_token_at is None else clock.first_token_at - t0
        return Run(token_ids, seconds, ttft)


def llama_cpp_available() -> bool:
    """Whether the optional `llama-cpp-python` package is installed (`pip install llama-cpp-python`)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppSystem:
    """llama.cpp (through `llama-cpp-python`) on a GGUF file: the CPU reference point for plain decoding.

    It runs the GGUF's own weights as llama.cpp stores them (for the default verifier, Q4_1: 4-bit blocks
    multiplied against 8-bit activations), while our engine runs the same weights dequantized to fp32 or bf16;
    so the two compute the same model at different precisions, and their greedy outputs may part at near-ties.
    """

    def __init__(self, name: str, gguf_path: str, max_seq_len: int, eos_token_ids: list[int], threads: int) -> None:
        from llama_cpp import Llama

        self.name = name
        self.gguf_path = gguf_path
        self.llm = Llama(
            model_path=gguf_path,
            n_ctx=max_seq_len + 8,
            n_batch=max(512, max_seq_len + 8),  # the whole prompt in one pass, as our engine and HF prefill it
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=False,
            verbose=False,
        )
        self.eos_token_ids = set(eos_token_ids)

    def run(
        self, prompt_ids: list[int], temperature: float, max_tokens: int, seed: int, ignore_eos: bool = False
    ) -> Run:
        self.llm.set_seed(seed)
        sampling = dict(temp=temperature, top_k=0 if temperature > 0 else 1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        tokens: list[int] = []
        first_token_at = None
        t0 = time.perf_counter()
        for token in self.llm.generate(prompt_ids, reset=True, **sampling):
            if first_token_at is None:
                first_token_at = time.perf_counter()
            tokens.append(int(token))
            if len(tokens) >= max_tokens or (token in self.eos_token_ids and not ignore_eos):
                break
        seconds = time.perf_counter() - t0
        return Run(tokens, seconds, seconds if first_token_at is None else first_token_at - t0)

    def forward_seconds(self, context_ids: list[int], new_ids: list[int]) -> float:
        """Wall seconds of one llama.cpp forward over `new_ids` after `context_ids` (their KV already computed)."""
        if self.llm.n_tokens != len(context_ids) or list(self.llm.input_ids[: len(context_ids)]) != context_ids:
            self.llm.reset()
            self.llm.eval(context_ids)
        t0 = time.perf_counter()
        self.llm.eval(new_ids)  # drops any KV past n_tokens first, then computes the new positions
        seconds = time.perf_counter() - t0
        self.llm.n_tokens = len(context_ids)  # roll back: the next call overwrites these positions
        return seconds
