"""On a CUDA GPU (`pytest -m gpu`): the compiled kernels, exact greedy speculation, CUDA graphs, the server.

Everything here is skipped cleanly without CUDA. Tiny random-weight models in fp32, whose logits are
peaked, so that exact token equality is a fair test across kernels and devices.
"""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from test_paged_attention import TOLERANCE, paged_case
from tiny_models import PROMPTS, greedy

from specserve import LLM, SamplingParams
from specserve.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from specserve.engine.cuda_graphs import GraphShapes, graph_shapes
from specserve.engine.engine import LLMEngine
from specserve.kernels import paged_decode_attention, paged_decode_attention_reference, paged_decode_attention_triton
from specserve.kernels.batch_invariant import batch_invariant_linear, linear_reference
from specserve.model.attention import AttentionMetadata
from specserve.server import AsyncEngine, build_app

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CACHE = CacheConfig(num_blocks=256, block_size=4)


def on_cuda(case: dict) -> dict:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}


# ---- kernels -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"),
    [(9, 3, 64), (32, 8, 128), (4, 4, 16), (14, 2, 64)],
    ids=["smollm2", "llama3-8b", "tiny", "qwen2.5-0.5b"],
)
def test_paged_attention_kernel_on_cuda(num_heads, num_kv_heads, head_dim, dtype):
    """Compiled kernel (default context blocks) vs the reference, decode and verification."""
    for query_lens, context_lens in (
        ([1] * 16, list(range(1, 1600, 100))),
        ([1, 2, 5, 9, 33], [1, 70, 300, 513, 2000]),
    ):
        case = on_cuda(paged_case(query_lens, context_lens, num_heads, num_kv_heads, head_dim, dtype))
        expected = paged_decode_attention_reference(**case)
        got = paged_decode_attention_triton(**case)
        torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype])
        torch.testing.assert_close(paged_decode_attention(**case), got)  # the dispatcher picks Triton on CUDA


def test_cuda_metadata_routes_decode_to_the_kernel():
    slots = torch.arange(40, device="cuda").view(2, 20)
    decode = AttentionMetadata.build([1, 3], [20, 17], torch.zeros(4, dtype=torch.int64, device="cuda"), slots)
    assert decode.uses_decode_kernel and decode.query_start.tolist() == [0, 1, 4]
    prefill = AttentionMetadata.build(
        [100], [100], torch.arange(100, device="cuda"), torch.arange(100, device="cuda")[None]
    )
    assert not prefill.uses_decode_kernel


def test_graph_shapes_follow_the_config():
    spec = SpeculativeConfig(draft="unused", num_speculative_tokens=3)
    config = EngineConfig("unused", device="cuda", scheduler=SchedulerConfig(max_num_seqs=12), speculative=spec)
    assert graph_shapes(config, 512) == GraphShapes((1, 2, 4, 8, 12), (1, 2, 3, 4), 515)
    assert graph_shapes(EngineConfig("unused", device="cuda", cuda_graphs=False), 512) is None
    plain = graph_shapes(EngineConfig("unused", device="cuda"), 100)
    assert plain.batch_sizes == (1, 2, 4, 8, 16, 32) and plain.query_lens == (1,)


# ---- the engine on CUDA --------------------------------------------------------------------------


def make(tiny, draft: str | None, k: int | None, device: str = "cuda", **kw) -> LLM:
    return LLM(tiny["llama"], draft=draft, dtype="float32", num_speculative_tokens=k, cache=CACHE, device=device, **kw)


@pytest.fixture(scope="module")
def plain_cuda(tiny) -> LLM:
    return make(tiny, None, None)


def test_plain_greedy_on_cuda_equals_the_cpu(tiny, plain_cuda):
    cpu = make(tiny, None, None, device="cpu")
    assert [c.token_ids for c in plain_cuda.generate(PROMPTS, greedy(40))] == [
        c.token_ids for c in cpu.generate(PROMPTS, greedy(40))
    ]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("draft", ["draft", "llama"])
def test_greedy_speculation_on_cuda_equals_plain_greedy(tiny, plain_cuda, draft, k):
    spec = make(tiny, tiny[draft], k)
    expected = [c.token_ids for c in plain_cuda.generate(PROMPTS, greedy(40))]
    assert [c.token_ids for c in spec.generate(PROMPTS, greedy(40))] == expected
    assert spec.engine.metrics.total_speculation().drafted_tokens > 0
    # the verifier's and the draft's decode steps went through captured graphs
    assert spec.engine.runner.cuda_graphs.num_replays > 0
    assert spec.engine.proposer.runner.cuda_graphs.num_replays > 0


def test_adaptive_speculation_on_cuda_equals_plain_greedy(tiny, plain_cuda):
    spec = make(tiny, tiny["llama"], None)  # the verifier as its own draft: adaptive k climbs
    expected = [c.token_ids for c in plain_cuda.generate(PROMPTS, greedy(40))]
    assert [c.token_ids for c in spec.generate(PROMPTS, greedy(40))] == expected
    assert spec.engine.metrics.total_speculation().drafted_tokens > 0


def test_cuda_graphs_change_no_token(tiny):
    with_graphs = make(tiny, tiny["draft"], 3)
    without = make(tiny, tiny["draft"], 3, cuda_graphs=False)
    assert without.engine.runner.cuda_graphs is None and with_graphs.engine.runner.cuda_graphs.captured > 0
    params = [greedy(32), greedy(20), greedy(32), greedy(8), greedy(32)]
    assert [c.token_ids for c in with_graphs.generate(PROMPTS, params)] == [
        c.token_ids for c in without.generate(PROMPTS, params)
    ]
    assert with_graphs.engine.runner.cuda_graphs.num_replays > 0


def test_seeded_sampled_speculation_on_cuda(tiny):
    """Sampled drafts and the Triton rejection sampler on CUDA; a seed means the same alone or batched."""
    spec = make(tiny, tiny["draft"], 3)
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True)
    alone = spec.generate([PROMPTS[1]], sampled)[0].token_ids
    batched = spec.generate(PROMPTS[:3], [greedy(30), sampled, SamplingParams(max_tokens=5, temperature=1.0)])
    assert alone == batched[1].token_ids and len(alone) == 24


def test_bf16_on_cuda_generates(tiny):
    llm = LLM(
        tiny["llama"], draft=tiny["draft"], dtype="bfloat16", num_speculative_tokens=2, cache=CACHE, device="cuda"
    )
    outs = llm.generate(PROMPTS, greedy(16))
    assert all(len(o.token_ids) == 16 for o in outs)


# ---- batch-invariant mode (tests/test_batch_invariant.py runs on CUDA too, compiled) -----------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_batch_invariant_linear_rows_are_the_same_bits_on_cuda(dtype):
    """SmolLM2's MLP shape: a row alone, at any offset, among 1..64 and 300 rows; cuBLAS is shown as the contrast."""
    torch.manual_seed(0)
    w = torch.randn(1536, 576, device="cuda", dtype=dtype)
    x = torch.randn(300, 576, device="cuda", dtype=dtype)
    full = batch_invariant_linear(x, w)
    torch.testing.assert_close(full.float(), linear_reference(x, w).float(), rtol=2e-2, atol=2e-1)
    for n in (1, 2, 3, 8, 9, 33, 64):
        for start in (0, 5, 64, 250):
            assert torch.equal(batch_invariant_linear(x[start : start + n], w), full[start : start + n])
    cublas_same = all(torch.equal(torch.nn.functional.linear(x[:n], w)[0], torch.nn.functional.linear(x, w)[0])
                      for n in (1, 2, 8))  # fmt: skip
    print(f"cuBLAS row 0 the same bits at 1, 2, 8 and 300 rows: {cublas_same}")


def test_batch_invariant_bf16_speculation_equals_plain_with_cuda_graphs(tiny):
    """bf16, where cuBLAS rounds a 1-row and a (k + 1)-row pass differently: batch-invariant kernels make greedy
    speculation (fixed and adaptive k, batched) equal plain decoding one request at a time, graphs and all."""
    kw = dict(dtype="bfloat16", cache=CACHE, device="cuda", batch_invariant=True)
    plain = LLM(tiny["llama"], **kw)
    expected = [plain.generate([p], greedy(40))[0].token_ids for p in PROMPTS]
    for k in (1, 3, None):
        spec = LLM(tiny["llama"], draft=tiny["llama"], num_speculative_tokens=k, **kw)
        assert [c.token_ids for c in spec.generate(PROMPTS, greedy(40))] == expected, k
        assert spec.engine.metrics.total_speculation().drafted_tokens > 0
        assert spec.engine.runner.cuda_graphs.num_replays > 0


def test_batch_invariant_seeded_sampling_alone_equals_batched_on_cuda(tiny):
    spec = LLM(tiny["llama"], draft=tiny["draft"], dtype="bfloat16", num_speculative_tokens=3, cache=CACHE,
               device="cuda", batch_invariant=True)  # fmt: skip
    assert spec.engine.numerics.seeded_reproducible
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=5, ignore_eos=True)
    alone = spec.generate([PROMPTS[1]], sampled)[0].token_ids
    batched = spec.generate(PROMPTS, [greedy(30), sampled, *[SamplingParams(max_tokens=9, temperature=1.0)] * 3])
    assert alone == batched[1].token_ids


# ---- the server ----------------------------------------------------------------------------------


def test_server_end_to_end_on_cuda(tiny):
    config = EngineConfig(
        verifier=tiny["llama"],
        dtype="float32",
        device="cuda",
        cache=CACHE,
        speculative=SpeculativeConfig(draft=tiny["draft"], num_speculative_tokens=2),
    )
    engine = LLMEngine(config)
    expected = make(tiny, None, None, device="cpu").generate([PROMPTS[0]], greedy(12))[0].text
    with TestClient(build_app(AsyncEngine(engine, max_queue=8), "tiny")) as client:
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        out = response.json()
        assert out["choices"][0]["text"] == expected
        assert out["usage"]["completion_tokens"] == 12
        metrics = client.get("/metrics").text
        assert "specserve_spec_accepted_tokens_total" in metrics
    assert engine.runner.cuda_graphs.num_replays > 0
