"""LLMEngine: requests in, tokens out; one step is schedule() -> execute(plan) -> update(plan, output).

Owns the tokenizer, the verifier (and optional draft) runners, the KV cache manager and the
scheduler. Not thread-safe: exactly one thread drives `step()` (the server's engine thread);
others talk to it through the server's queues.

Every sampled token goes through the rejection sampler: a decoding request with k draft tokens
verifies k + 1 positions, a plain one is the same call with k = 0.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer, GenerationConfig

from specserve.config import EngineConfig
from specserve.engine import drafts
from specserve.engine.cuda_graphs import graph_shapes
from specserve.engine.detokenizer import IncrementalDetokenizer
from specserve.engine.kv_cache_manager import KVCacheManager
from specserve.engine.logprobs import TokenLogprobs, prompt_rows, token_logprobs
from specserve.engine.metrics import EngineMetrics
from specserve.engine.model_runner import ModelRunner, TokenRun, kv_bytes_per_block
from specserve.engine.ngram_proposer import NgramProposer
from specserve.engine.numerics import Numerics
from specserve.engine.outputs import RequestOutput
from specserve.engine.proposal import Proposer, SpecSource
from specserve.engine.proposer import DraftProposer
from specserve.engine.request import Request, RequestStatus
from specserve.engine.sampler import draw_exponential, draw_uniform, sampling_probs
from specserve.engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from specserve.engine.speculation_length import SpeculationLengthPolicy
from specserve.engine.trace import SpecStep, TraceRecorder
from specserve.kernels import rejection_sample
from specserve.model.batch_invariant import enable_batch_invariant
from specserve.model.llama import LlamaModel
from specserve.model.loader import load_model, resolve_dtype
from specserve.model.upcast import enable_upcast, upcast_default
from specserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """Per scheduled request that sampled: the emitted tokens ([accepted..., recovered or bonus])."""

    emitted: dict[str, list[int]]
    verifier_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per sampling request, its [k + 1, vocab] verifier logits; only while traces are recorded."""
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per scheduled request, the verifier's [new tokens, hidden] features; only for an EAGLE draft."""
    draft_seconds: float = 0.0
    """Time the draft model spent proposing this step."""
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Per sampling request that asks for logprobs, those of its emitted tokens."""
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    """Per request still scoring its prompt, the prompt logprobs this step computed (the next ones it lacks)."""


def eos_token_ids(path: str, tokenizer) -> set[int]:
    """The tokenizer's EOS plus any the checkpoint's generation_config names."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        gen = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        gen = None
    ids |= set(gen) if isinstance(gen, list) else ({gen} if isinstance(gen, int) else set())
    return ids


class LLMEngine:
    def __init__(self, config: EngineConfig, draft_model: LlamaModel | None = None) -> None:
        self.config = config
        dtype = self.dtype = resolve_dtype(config.dtype, config.device)
        self.numerics = Numerics.of(config, dtype)  # what this configuration promises (/v1/models says)
        self.tokenizer = AutoTokenizer.from_pretrained(config.verifier)
        self.verifier = load_model(config.verifier, dtype, config.device)
        spec = config.speculative
        self.draft_version = "none"
        if draft_model is None and spec.draft is not None:
            draft_model = drafts.load_draft(
                spec.draft, self.verifier, config.verifier, self.tokenizer, dtype, config.device
            )
            self.draft_version = spec.draft
        elif draft_model is not None:
            drafts.check_same_vocabulary(self.verifier, draft_model, self.tokenizer, None)
            self.draft_version = "in-memory"

        # batch-invariant kernels replace upcast matmuls (each is a different matmul for the same layers)
        self.upcast = not config.batch_invariant and upcast_default(config.upcast_matmuls, dtype, config.device)
        if self.upcast:  # the fp32 weight copies are made now, before the KV pool is sized
            enable_upcast(self.verifier)
        if config.batch_invariant:
            enable_batch_invariant(self.verifier)
        # a verifier of bf16 numbers run in fp32 (the default one) streams bf16 copies: drafts are rounded to match
        self.bf16_drafts = self.upcast and drafts.holds_bf16_numbers(self.verifier)
        if draft_model is not None:
            drafts.arm(draft_model, self.upcast, config.batch_invariant, self.bf16_drafts)

        cache = config.cache
        per_block = kv_bytes_per_block(self.verifier, cache.block_size, dtype)
        self.draft_block_bytes = 0  # a swapped-in draft may need at most this much KV per block
        if draft_model is not None:
            self.draft_block_bytes = kv_bytes_per_block(draft_model, cache.block_size, dtype)
            per_block += self.draft_block_bytes
        num_blocks = cache.num_blocks or max(1, cache.kv_cache_memory // per_block)
        self.num_blocks = num_blocks
        max_len = config.scheduler.max_model_len or self.verifier.arch.max_position_embeddings
        if draft_model is not None:
            max_len = min(max_len, draft_model.arch.max_position_embeddings)
        # one request must always fit the pool on its own, or it could wait forever
        self.max_model_len = min(max_len, num_blocks * cache.block_size)

        self.kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        # an EAGLE head's input at position c is f_{c-1}: after a prefix-cache hit of c tokens the verifier
        # computes nothing before c, so each block keeps the verifier's feature of its last position
        self.block_last_features: dict[int, torch.Tensor] = {}  # block id -> [hidden]
        self.runner = ModelRunner(self.verifier, num_blocks, cache.block_size)
        self.proposer: DraftProposer | None = None  # the draft model's (a standalone draft or an EAGLE head)
        self.spec_policy: SpeculationLengthPolicy | None = None
        method = spec.resolved_method
        if draft_model is not None and method in ("draft", "hybrid"):
            self.proposer = drafts.make_proposer(draft_model, num_blocks, cache.block_size)
            self.verifier.feature_layers = getattr(draft_model, "feature_layers", ())  # what an EAGLE-3 head reads
        if method is not None:
            ngram = NgramProposer(spec.ngram_min, spec.ngram_max) if method in ("ngram", "hybrid") else None
            c0 = 0.0  # until measured: the draft's share of the verifier's parameters
            if draft_model is not None:
                c0 = drafts.num_params(draft_model) / drafts.num_params(self.verifier)
            self.spec_policy = SpeculationLengthPolicy(spec, c0, ngram)
        shapes = graph_shapes(config, self.max_model_len)  # None off CUDA or with cuda_graphs off
        if shapes is not None:  # captured now, before any request, never lazily mid-step
            self.runner.capture_cuda_graphs(shapes)
            if self.proposer is not None and isinstance(self.proposer.runner.model, LlamaModel):
                self.proposer.runner.capture_cuda_graphs(shapes)  # an EAGLE head runs eagerly
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len, self.spec_policy)
        self.scheduler.hit_needs_draft_kv = self.proposer is not None and self.proposer.reads_verifier_features
        self.metrics = EngineMetrics()
        self.requests: dict[str, Request] = {}
        self.eos_token_ids = eos_token_ids(config.verifier, self.tokenizer)
        self._ids = itertools.count()
        self._failed: list[tuple[str, Exception]] = []

    # ---- requests -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.verifier.arch.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        return ids

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt)
        vocab = self.verifier.arch.vocab_size
        for name, n in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if n is not None and n > vocab:
                raise ValueError(f"{name} must be at most the vocabulary size ({vocab}), got {n}")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens; the context holds {self.max_model_len}, "
                "so the prompt must be shorter to leave room for output"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.stop)
        request = Request(request_id, ids, params, detok, self.eos_token_ids)
        if self.config.trace_topm:
            request.trace = TraceRecorder(min(self.config.trace_topm, self.verifier.arch.vocab_size))
        self.requests[request_id] = request
        self.scheduler.add(request)
        self.metrics.prompt_tokens += len(ids)
        return request_id

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None and not request.is_finished:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
            self._count_finished(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- draft hot-swap -----------------------------------------------------------------------

    @property
    def draft_slot(self) -> drafts.DraftSlot:
        """What a draft must fit to be swapped in; made of parts fixed at startup, so any thread may read it."""
        return drafts.DraftSlot(
            self.verifier, self.config.verifier, self.tokenizer, self.dtype, self.config.device,
            self.config.cache.block_size, self.draft_block_bytes, self.max_model_len,
        )  # fmt: skip

    def swap_draft(self, draft_model: LlamaModel, version: str) -> None:
        """Replace the draft model between steps (call it from the thread that drives `step()`).

        Outputs cannot change: the verifier decides every token. The new draft starts with empty KV:
        every unfinished request's draft counter goes back to 0 (it catches up on its next proposal)
        and cached prefix blocks stop vouching for draft KV. Acceptance estimates start again from
        the prior, since they described the old draft.
        """
        if self.proposer is None:
            raise ValueError("this engine runs without a draft model; start it with one to swap drafts")
        drafts.check_fits(draft_model, self.draft_slot, version)
        drafts.arm(draft_model, self.upcast, self.config.batch_invariant, self.bf16_drafts)
        self.proposer = drafts.make_proposer(draft_model, self.num_blocks, self.config.cache.block_size)
        self.scheduler.hit_needs_draft_kv = self.proposer.reads_verifier_features
        self.kv.invalidate_draft()
        self.block_last_features.clear()
        layers = getattr(draft_model, "feature_layers", ())
        reshaped = layers != self.verifier.feature_layers  # the features kept so far are the wrong width
        self.verifier.feature_layers = layers
        for r in self.requests.values():
            r.num_draft_computed_tokens = 0
            if reshaped:
                r.features, r.features_start = None, 0
        if self.spec_policy is not None:  # forgets the old draft's rates, engine-wide and per request
            self.spec_policy.reset_draft(drafts.num_params(draft_model) / drafts.num_params(self.verifier))
        self.draft_version = version

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        self.metrics.preemptions += len(plan.preempted)
        self.metrics.prefix_cache_hit_tokens = self.kv.prefix_hit_blocks * self.kv.block_size
        if plan.empty:
            return []
        t0 = time.perf_counter()
        output = self.execute(plan)
        outputs = self.update(plan, output)
        if self.spec_policy is not None and all(s.num_new_tokens == s.num_draft_tokens + 1 for s in plan.scheduled):
            # a decode step (no prompt chunk in it), timed whole but for the draft's proposals (timed apart): the
            # verifier's forward, and the sampling, acceptance and bookkeeping that also grow with the tokens verified
            self.spec_policy.observe_step(plan.num_batched_tokens, time.perf_counter() - t0 - output.draft_seconds)
        return outputs

    def execute(self, plan: SchedulerOutput) -> StepOutput:
        """Propose, verify and accept: every tensor of the step is made and read here."""
        draft_ids, draft_q, draft_seconds = self._propose(plan)
        runs = []
        num_prompt_rows = []  # per run: rows at the head of its logits that score prompt tokens (prompt logprobs)
        for s in plan.scheduled:
            r = s.request
            num_known = s.num_new_tokens - s.num_draft_tokens
            tokens = r.all_token_ids[r.num_computed_tokens : r.num_computed_tokens + num_known]
            tokens += draft_ids.get(r.request_id, [])
            num_logits = s.num_draft_tokens + 1 if s.samples else 0
            m = prompt_rows(r, r.num_computed_tokens, len(tokens))
            if m:  # the run's logits start at its first unscored prompt token's row
                num_logits = r.num_computed_tokens + len(tokens) - (len(r.prompt_logprobs) - 1)
            num_prompt_rows.append(m)
            runs.append(TokenRun(tokens, r.num_computed_tokens, self.kv.blocks_of(r.request_id), num_logits))
        t0 = time.perf_counter()
        eagle = self.proposer is not None and self.proposer.reads_verifier_features
        out = self.runner.run(runs, keep_features=eagle)
        logits = out.logits  # [sum of num_logits, vocab]
        prompt_logits = {}  # per request scoring its prompt: [rows, vocab]
        if any(num_prompt_rows):  # keep the sampling rows (the last k + 1 of each sampling run) in `logits`
            per_run = logits.split([run.num_logits for run in runs])
            for s, m, rows in zip(plan.scheduled, num_prompt_rows, per_run):
                if m:
                    prompt_logits[s.request.request_id] = rows[:m]
            sample_rows = [rows[-(s.num_draft_tokens + 1) :] for s, rows in zip(plan.scheduled, per_run) if s.samples]
            logits = torch.cat(sample_rows) if sample_rows else logits[:0]
        features = {}
        if eagle:  # [num_tokens, hidden] -> per request
            split = out.features.split([len(run.token_ids) for run in runs])
            features = {s.request.request_id: f for s, f in zip(plan.scheduled, split)}
        self.metrics.verifier_seconds += time.perf_counter() - t0

        sampling = [s for s in plan.scheduled if s.samples]
        emitted = self._accept(sampling, logits, draft_ids, draft_q) if sampling else {}
        rows = {}
        if self.config.trace_topm and sampling:
            rows = dict(
                zip((s.request.request_id for s in sampling), logits.split([s.num_draft_tokens + 1 for s in sampling]))
            )
        logprobs, prompt_logprobs = self._logprobs(sampling, logits, emitted, prompt_logits)
        return StepOutput(emitted, rows, features, draft_seconds, logprobs, prompt_logprobs)

    def _proposer(self, source: SpecSource) -> Proposer:
        return self.proposer if source is SpecSource.DRAFT else self.spec_policy.ngram

    def _propose(self, plan: SchedulerOutput) -> tuple[dict[str, list[int]], dict[str, torch.Tensor], float]:
        """Each drafting request's draft tokens, by the proposer its plan names, and the q of those drawn
        from a distribution (per request: [k, vocab]; absent: one-hot); and the draft model's seconds."""
        draft_ids: dict[str, list[int]] = {}
        draft_q: dict[str, torch.Tensor] = {}
        seconds = 0.0
        for source in SpecSource:
            batch = [s for s in plan.scheduled if s.spec is not None and s.spec.source is source]
            if not batch:
                continue
            proposal = self._proposer(source).propose(
                [(s.request, s.spec, self.kv.blocks_of(s.request.request_id)) for s in batch]
            )
            seconds += proposal.seconds
            for row, s in enumerate(batch):
                rid, k = s.request.request_id, s.num_draft_tokens
                draft_ids[rid] = proposal.token_ids[row, :k].tolist()
                if proposal.probs is not None:
                    draft_q[rid] = proposal.probs[row, :k]  # [k, vocab]
            if self.spec_policy is not None and proposal.step_seconds is not None:
                self.spec_policy.observe_draft_step(proposal.step_seconds)
            if self.spec_policy is not None and proposal.catchup is not None:
                self.spec_policy.observe_draft_catchup(*proposal.catchup)
        self.metrics.draft_seconds += seconds
        return draft_ids, draft_q, seconds

    def _logprobs(
        self,
        sampling: list[ScheduledRequest],
        logits: torch.Tensor,  # [sum(k + 1), vocab]: the sampling rows
        emitted: dict[str, list[int]],
        prompt_logits: dict[str, torch.Tensor],  # per request: [rows, vocab] over prompt positions
    ) -> tuple[dict[str, list[TokenLogprobs]], dict[str, list[TokenLogprobs]]]:
        """The logprobs requests ask for, of emitted tokens and of prompt tokens, in one batched pass.
        Emitted token j was drawn from its request's sampling row j; nothing runs when nobody asks."""
        parts, ids, num_top, owners = [], [], [], []  # owners: (request id, is prompt, rows)
        row = 0
        for s in sampling:
            r = s.request
            if r.params.logprobs is not None:
                tokens = emitted[r.request_id]
                parts.append(logits[row : row + len(tokens)])
                ids += tokens
                num_top += [r.params.logprobs] * len(tokens)
                owners.append((r.request_id, False, len(tokens)))
            row += s.num_draft_tokens + 1
        for rid, rows in prompt_logits.items():
            r = self.requests[rid]
            t = len(r.prompt_logprobs)  # row i scores prompt token t + i
            parts.append(rows)
            ids += r.prompt_token_ids[t : t + rows.shape[0]]
            num_top += [r.params.prompt_logprobs] * rows.shape[0]
            owners.append((rid, True, rows.shape[0]))
        if not parts:
            return {}, {}
        values = token_logprobs(torch.cat(parts), ids, num_top)
        of_emitted, of_prompt = {}, {}
        start = 0
        for rid, is_prompt, n in owners:
            (of_prompt if is_prompt else of_emitted)[rid] = values[start : start + n]
            start += n
        return of_emitted, of_prompt

    def _accept(
        self,
        sampling: list[ScheduledRequest],
        logits: torch.Tensor,  # [sum(k + 1), vocab]
        draft_ids: dict[str, list[int]],  # per drafting request: its k draft tokens
        draft_q: dict[str, torch.Tensor],  # per request drafted from a distribution: [k, vocab]
    ) -> dict[str, list[int]]:
        if all(s.request.params.greedy for s in sampling):
            return self._accept_greedy(sampling, logits, draft_ids)
        batch, vocab = len(sampling), logits.shape[-1]
        ks = [s.num_draft_tokens for s in sampling]
        max_k = max(ks)
        params = [p for s in sampling for p in [s.request.params] * (s.num_draft_tokens + 1)]
        probs = sampling_probs(logits, params)  # [sum(k + 1), vocab]
        # the kernel takes every input on the logits' device; ids and random draws are made on the host
        # (from each request's CPU generator, so a seed means the same on any device) and moved once
        dev = logits.device
        target = torch.zeros(batch, max_k + 1, vocab, device=dev)
        draft_token_ids = torch.full((batch, max_k), -1, dtype=torch.int64)
        q = torch.zeros(batch, max_k, vocab, device=dev) if draft_q and max_k > 0 else None  # [batch, max_k, vocab]
        row = 0
        for i, s in enumerate(sampling):
            k = s.num_draft_tokens
            target[i, : k + 1] = probs[row : row + k + 1]
            row += k + 1
            if k:
                rid = s.request.request_id
                draft_token_ids[i, :k] = torch.tensor(draft_ids[rid])
                if q is not None and rid in draft_q:
                    q[i, :k] = draft_q[rid]
                elif q is not None:  # a prompt-lookup proposal: one-hot, as draft_probs=None means
                    q[i, torch.arange(k), draft_token_ids[i, :k]] = 1.0
        generators = [s.request.generator for s in sampling]
        greedy = [s.request.params.greedy for s in sampling]
        out_ids, num_accepted = rejection_sample(
            draft_token_ids.to(dev),
            q,
            target,
            torch.tensor(ks, dtype=torch.int64, device=dev),
            draw_uniform(generators, ks).to(dev),
            draw_exponential(generators, vocab, greedy).to(dev),
            torch.tensor(greedy, device=dev),
        )
        out_ids, num_accepted = out_ids.tolist(), num_accepted.tolist()  # one device-to-host copy each
        return {s.request.request_id: out_ids[i][: num_accepted[i] + 1] for i, s in enumerate(sampling)}

    @staticmethod
    def _accept_greedy(
        sampling: list[ScheduledRequest],
        logits: torch.Tensor,  # [sum(k + 1), vocab]
        draft_ids: dict[str, list[int]],
    ) -> dict[str, list[int]]:
        """A batch of greedy requests: each row's token is its logits' argmax (the lowest index on a tie, as
        rejection sampling's greedy rule takes it), drafts are kept while they equal it, and the first row that
        differs (or the bonus row) gives the next token. No probabilities, no [batch, k + 1, vocab] tensors: a
        plain decode step's or a verification pass's acceptance in one argmax (rejection sampling's path cost
        ~1 ms a step on the CPU). The argmax of the logits, not of their softmax: exp can round two near-equal
        logits to one probability, never two different logits to one logit."""
        best = logits.argmax(dim=-1).tolist()  # [sum(k + 1)]: one device-to-host copy
        out, row = {}, 0
        for s in sampling:
            k = s.num_draft_tokens
            drafts = draft_ids[s.request.request_id] if k else []
            n = 0
            while n < k and drafts[n] == best[row + n]:
                n += 1
            out[s.request.request_id] = drafts[:n] + [best[row + n]]
            row += k + 1
        return out

    def update(self, plan: SchedulerOutput, output: StepOutput) -> list[RequestOutput]:
        """Commit each request's tokens. A request whose bookkeeping raises (a detokenizer fault, say) is
        aborted and reported by `take_failed()`; the others in the batch carry on."""
        self.metrics.steps += 1
        outputs = []
        for s in plan.scheduled:
            try:
                out = self._update_one(s, output)
            except Exception as e:  # one request's fault must not take its batch down
                logger.exception("request %s failed while committing its tokens", s.request.request_id)
                self._failed.append((s.request.request_id, e))
                self.abort_request(s.request.request_id)
                continue
            if out is not None:
                outputs.append(out)
        return outputs

    def take_failed(self) -> list[tuple[str, Exception]]:
        """Requests that failed on their own since the last call (they are aborted), with the error."""
        failed, self._failed = self._failed, []
        return failed

    def _update_one(self, s: ScheduledRequest, output: StepOutput) -> RequestOutput | None:
        """The engine's side of one request's commit (its tensors, metrics and output); the scheduler
        commits the tokens and counters."""
        r, rid, k = s.request, s.request.request_id, s.num_draft_tokens
        emitted = output.emitted.get(rid)
        if rid in output.prompt_logprobs:
            r.prompt_logprobs.extend(output.prompt_logprobs[rid])
        if rid in output.features:
            num_valid = s.num_new_tokens - (k - (len(emitted) - 1) if emitted is not None else 0)
            self._keep_features(r, output.features[rid][:num_valid])
        if emitted is not None and s.spec is not None:
            label = self.draft_version if s.spec.source is SpecSource.DRAFT else s.spec.source.value
            self.metrics.spec(label).record(k, len(emitted) - 1)
        recompute_accepted = self.proposer is not None and self.proposer.recompute_accepted
        new_ids = self.scheduler.commit(s, emitted, recompute_accepted)
        if new_ids is None:  # a prompt chunk that did not reach the end
            return None
        self.metrics.generation_tokens += len(new_ids)
        if r.logprobs is not None:
            r.logprobs.extend(output.logprobs[rid][: len(new_ids)])
        trace = None
        if r.trace is not None:
            step = SpecStep(s.spec.source.value if s.spec is not None else "none", k, len(emitted) - 1)
            r.trace.add(output.verifier_logits[rid], len(new_ids), step)
            if r.is_finished:
                trace = r.trace.finish(r, self.draft_version)
        if r.is_finished:
            self._count_finished(r)
            self.requests.pop(rid, None)
        return RequestOutput(
            request_id=rid,
            text=r.detokenizer.text,
            token_ids=list(r.output_token_ids),
            delta_text=r.detokenizer.take_delta(r.is_finished),
            delta_token_ids=new_ids,
            finished=r.is_finished,
            finish_reason=r.finish_reason,
            num_prompt_tokens=r.num_prompt_tokens,
            stop_reason=r.stop_reason,
            trace=trace,
            logprobs=None if r.logprobs is None else list(r.logprobs),
            prompt_logprobs=r.prompt_logprobs,
        )

    def _keep_features(self, r: Request, new: torch.Tensor) -> None:  # new: [committed rows, hidden]
        """Append the verifier's features of r's newly committed positions; drop those the head has used.

        Each block also remembers the feature of its last position (`block_last_features`), so a later
        request that hits the block in the prefix cache starts with the head's true input f_{c-1}, as the
        request that computed it did: its proposals (and so a seeded sample) do not depend on the cache."""
        start = r.num_computed_tokens
        bs = self.config.cache.block_size
        blocks = self.kv.req_blocks.get(r.request_id, [])
        for p in range(start + (-(start + 1)) % bs, start + new.shape[0], bs):  # positions that end a block
            if p // bs < len(blocks):
                self.block_last_features[blocks[p // bs]] = new[p - start].clone()
        if r.features is None or r.features_start + r.features.shape[0] != start:
            before = self.block_last_features.get(blocks[(start - 1) // bs]) if start % bs == 0 < start else None
            if before is not None and (start - 1) // bs < len(blocks):
                r.features, r.features_start = torch.cat([before[None].to(new.dtype), new]), start - 1
            else:
                r.features, r.features_start = new, start
        else:
            r.features = torch.cat([r.features, new])
        # the head's next catch-up starts at its counter h and reads f_{h-1} onwards
        drop = max(0, r.num_draft_computed_tokens - 1 - r.features_start)
        if drop:
            r.features, r.features_start = r.features[drop:], r.features_start + drop

    def _count_finished(self, r: Request) -> None:
        reason = r.finish_reason or "abort"
        self.metrics.finished_requests[reason] = self.metrics.finished_requests.get(reason, 0) + 1
