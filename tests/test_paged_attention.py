"""Paged decode attention: the Triton kernel against its reference, the reference against the engine's
torch path, and the model's decode-kernel path with CUDA-graph padding, all on the CPU.

The kernel runs under TRITON_INTERPRET=1 (conftest sets it without a GPU) on small shapes; the same
comparisons on a GPU, compiled, are in test_gpu.py.
"""

from __future__ import annotations

import doctest
import os
import random
import subprocess
import sys

import pytest
import torch

import specserve.kernels.paged_attention as pa_module
from specserve.config import EngineConfig
from specserve.engine.cuda_graphs import CudaGraphs, GraphShapes, graph_shapes
from specserve.engine.model_runner import ModelRunner, TokenRun
from specserve.kernels import paged_decode_attention, paged_decode_attention_reference, paged_decode_attention_triton
from specserve.model.attention import AttentionMetadata, paged_attention
from specserve.model.loader import load_model

TRITON_ON_CPU = pa_module.triton is not None and getattr(pa_module, "_KERNEL_INTERPRETED", False)
requires_triton_cpu = pytest.mark.skipif(not TRITON_ON_CPU, reason="needs triton running under TRITON_INTERPRET=1")

BLOCK_SIZE = 4
# fp32: the same sums in another order; bf16: outputs and softmax weights rounded to 8 bits
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def paged_case(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict:
    """Random queries and a KV pool of BLOCK_SIZE-slot blocks, handed out to requests in shuffled order
    (so a context crosses blocks that are far apart), plus the metadata the kernel reads."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-c // BLOCK_SIZE) for c in context_lens]
    num_blocks = sum(blocks_needed) + 3  # a few blocks nobody owns
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in blocks_needed:
        tables.append(order[used : used + n])
        used += n
    max_context = max(context_lens)
    context_slots = torch.zeros(len(query_lens), max_context, dtype=torch.int64)  # [batch, max_context]
    for b, (table, ctx) in enumerate(zip(tables, context_lens)):
        pos = torch.arange(ctx)
        context_slots[b, :ctx] = torch.tensor(table)[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    num_slots = num_blocks * BLOCK_SIZE
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return dict(
        q=torch.randn(starts[-1], num_heads, head_dim, generator=g).to(dtype),
        k_cache=torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype),
        v_cache=torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype),
        context_slots=context_slots,
        query_start=torch.tensor(starts),
        context_lens=torch.tensor(context_lens),
        scale=head_dim**-0.5,
        max_query=max(query_lens),
    )


# ---- the reference: the specification ------------------------------------------------------------


def test_docstring_example():
    assert doctest.testmod(pa_module, raise_on_error=False).failed == 0


def test_reference_by_hand():
    """One query head, one key/value head; keys one-hot so the scores are the queries' own entries."""
    k_cache = torch.eye(3)[:, None, :]  # [3 slots, 1, 3]: slot s has key e_s
    v_cache = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])[:, None, :]
    q = torch.tensor([[0.0, 0.0, 0.0], [0.0, 2.0, 1.0]])[:, None, :]  # [2 tokens, 1, 3]
    # positions 0, 1, 2 in slots 2, 0, 1; the two queries sit at positions 1 and 2
    out = paged_decode_attention_reference(
        q, k_cache, v_cache, torch.tensor([[2, 0, 1]]), torch.tensor([0, 2]), torch.tensor([3]), 1.0, 2
    )[:, 0]
    # query 0 sees slots 2, 0 with equal scores; query 1 sees slots 2, 0, 1 with scores 1, 0, 2
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.0, 0.5]))
    w = torch.tensor([1.0, 0.0, 2.0]).softmax(0)  # over slots 2, 0, 1
    torch.testing.assert_close(out[1], torch.stack([w[1], w[2], w[0]]))


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2)])
def test_reference_equals_the_engines_torch_path(num_heads, num_kv_heads):
    """The dense torch path (gather, mask, SDPA) and the reference agree on a mixed batch."""
    query_lens, context_lens = [1, 3, 5, 2], [1, 9, 18, 7]
    case = paged_case(query_lens, context_lens, num_heads, num_kv_heads)
    expected = paged_decode_attention_reference(**case)
    meta = AttentionMetadata.build(query_lens, context_lens, torch.zeros(0, dtype=torch.int64), case["context_slots"])
    assert not meta.uses_decode_kernel  # the CPU keeps the torch path
    no_keys = case["q"].new_zeros(0, num_kv_heads, case["q"].shape[2])  # the pool already holds every key
    got = paged_attention(case["q"], no_keys, no_keys, case["k_cache"], case["v_cache"], meta, case["scale"])
    torch.testing.assert_close(got.view_as(expected), expected, rtol=1e-5, atol=1e-5)


def test_reference_rejects_bad_inputs():
    case = paged_case([2], [3], 4, 2)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        paged_decode_attention_reference(**{**case, "q": torch.zeros(2, 3, 16)})
    with pytest.raises(ValueError, match="query_start must have shape"):
        paged_decode_attention_reference(**{**case, "query_start": torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match="context_slots must be int64"):
        paged_decode_attention_reference(**{**case, "context_slots": case["context_slots"].int()})
    with pytest.raises(ValueError, match="need query_len <= context_len"):
        paged_decode_attention_reference(**{**case, "max_query": 1})


# ---- the Triton kernel against the reference (interpreter) ---------------------------------------


def assert_kernel_matches(case: dict, block_n: int = 16) -> None:
    expected = paged_decode_attention_reference(**case)
    got = paged_decode_attention_triton(**case, block_n=block_n)
    rows = int(case["query_start"][-1])
    tol = TOLERANCE[case["q"].dtype]
    torch.testing.assert_close(got[:rows].float(), expected[:rows].float(), **tol)


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (6, 2), (8, 1)], ids=["mha", "gqa2", "gqa3", "mqa"]
)
def test_kernel_verification_batch(num_heads, num_kv_heads, dtype):
    """Query lengths 1..5 in one batch; contexts from 1 position to several 16-wide kernel blocks,
    each crossing many scattered 4-slot pages."""
    case = paged_case([1, 2, 3, 4, 5], [1, 6, 17, 33, 70], num_heads, num_kv_heads, dtype=dtype, seed=num_heads)
    assert_kernel_matches(case)


@requires_triton_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 8])
def test_kernel_decode_batch(batch, dtype):
    rng = random.Random(batch)
    case = paged_case([1] * batch, [rng.randint(1, 50) for _ in range(batch)], 6, 2, dtype=dtype, seed=batch)
    assert_kernel_matches(case)


@requires_triton_cpu
def test_kernel_odd_head_dim_and_long_queries():
    """head_dim 24 (padded to 32 lanes), and queries longer than one query tile of the program."""
    case = paged_case([9, 1], [40, 12], 8, 2, head_dim=24)
    case["max_query"] = 12  # more than any query: the spare tiles find no query and write nothing
    assert_kernel_matches(case, block_n=32)


@requires_triton_cpu
def test_kernel_skips_empty_requests_and_padding_rows():
    """What a CUDA graph's padding looks like: empty requests, and rows past the last request."""
    case = paged_case([2, 0, 3, 0], [5, 0, 8, 0], 4, 2)
    case["q"] = torch.cat([case["q"], torch.randn(4, *case["q"].shape[1:])])  # 4 rows that belong to no request
    assert_kernel_matches(case)


@requires_triton_cpu
def test_dispatcher_uses_the_reference_on_cpu():
    case = paged_case([2, 1], [5, 3], 4, 2)
    torch.testing.assert_close(paged_decode_attention(**case), paged_decode_attention_reference(**case))


# Compiles what paged_decode_attention_triton would launch, for an H100 (sm_90), in a process without
# the interpreter: no GPU is needed to lower a kernel to a cubin, only Triton's bundled ptxas.
AOT_COMPILE = """
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import specserve.kernels.paged_attention as pa

kernel = pa._paged_decode_attention_kernel
names = kernel.arg_names
for dtype, ptr, heads, kv_heads, head_dim, max_query in [
    (torch.bfloat16, "*bf16", 9, 3, 64, 1),  # SmolLM2-135M decoding
    (torch.bfloat16, "*bf16", 32, 8, 128, 9),  # Llama-3-8B verifying 8 draft tokens
    (torch.float32, "*fp32", 4, 2, 16, 5),  # the tiny test model in fp32
]:
    config = pa.kernel_config(dtype, heads, kv_heads, head_dim, max_query)
    num_warps = config.pop("num_warps")
    signature = {n: "i32" for n in names}
    signature.update({n: ptr for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")})
    signature.update({n: "*i64" for n in ("context_slots_ptr", "query_start_ptr", "context_lens_ptr")})
    signature.update(scale_log2="fp32", **{c: "constexpr" for c in config})
    source = ASTSource(kernel, signature, constexprs={(names.index(c),): v for c, v in config.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    assert compiled.asm["cubin"], (dtype, heads, kv_heads, head_dim)
print("compiled")
"""


@pytest.mark.skipif(
    pa_module.triton is None
    or not os.path.exists(os.path.join(os.path.dirname(pa_module.triton.__file__), "backends/nvidia/bin/ptxas")),
    reason="needs triton's NVIDIA backend (ptxas)",
)
@pytest.mark.integration
def test_kernel_compiles_for_h100():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ---- the model's decode-kernel path and CUDA-graph padding, on the CPU ---------------------------


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load_model(tiny["llama"], "float32")


def test_static_graph_pass_equals_the_eager_pass(tiny_model):
    """CudaGraphs' padded static pass (run uncaptured here: graphs need CUDA) gives the eager logits:
    fewer requests than the bucket, shorter queries, padding rows writing to the scratch slot only."""
    bs = 4
    eager = ModelRunner(tiny_model, num_blocks=40, block_size=bs)
    static = ModelRunner(tiny_model, num_blocks=40, block_size=bs)
    graphs = CudaGraphs(tiny_model, static.kv_cache, bs, GraphShapes((1, 2, 4), (1, 2, 3), max_context=64))
    tables = [list(range(8, 0, -1)), list(range(10, 18)), [30, 21, 39, 22, 23, 31, 24, 25]]  # 8 blocks each
    rng = random.Random(0)
    lens = [4, 19, 22]
    prefill = [TokenRun([rng.randrange(3, 300) for _ in range(n)], 0, t, 1) for n, t in zip(lens, tables)]
    for runner in (eager, static):
        runner.forward(prefill)
    for new in ([1, 1, 1], [3, 1, 2], [2, 3, 3]):
        runs = [TokenRun([rng.randrange(3, 300) for _ in range(n)], p, t, n) for p, n, t in zip(lens, new, tables)]
        expected = eager.forward(runs)  # [sum(new), vocab]: logits of every new token
        ids = [t for r in runs for t in r.token_ids]
        pos = torch.tensor([p for r in runs for p in range(r.start_position, r.start_position + len(r.token_ids))])
        table = torch.tensor(tables)
        slot_mapping = torch.cat([table[i, p // bs] * bs + p % bs for i, p in enumerate(pos.split(new))])
        context_lens = [a + b for a, b in zip(lens, new)]
        key = graphs.bucket(len(runs), max(new), max(context_lens), table.shape[1])
        assert key == (4, max(new))  # 3 requests ride in the 4-request bucket
        hidden = graphs.run(key, ids, pos, slot_mapping, new, context_lens, table)
        assert hidden.shape[0] == len(ids)
        got = tiny_model.compute_logits(hidden)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()
        lens = context_lens
    # the pools agree on every real slot; only the static pass wrote the scratch slot (the last one)
    torch.testing.assert_close(static.kv_cache[:, :, :-1], eager.kv_cache[:, :, :-1], rtol=1e-5, atol=1e-5)
    assert static.kv_cache[:, :, -1].abs().sum() > 0 and eager.kv_cache[:, :, -1].abs().sum() == 0


def test_bucket_choice_and_fallbacks(tiny_model):
    runner = ModelRunner(tiny_model, num_blocks=8, block_size=4)
    graphs = CudaGraphs(tiny_model, runner.kv_cache, 4, GraphShapes((1, 2, 4), (1, 2, 5), max_context=30))
    assert graphs.max_blocks == 8
    assert graphs.bucket(1, 1, 10, 3) == (1, 1)
    assert graphs.bucket(3, 3, 10, 3) == (4, 5)
    assert graphs.bucket(5, 1, 10, 3) is None  # more requests than the largest bucket
    assert graphs.bucket(2, 6, 10, 3) is None  # a prefill chunk: longer than any captured query
    assert graphs.bucket(2, 1, 31, 8) is None  # a context past max_context
    assert graphs.captured == 0
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        graphs.capture()


def test_no_graphs_off_cuda():
    assert graph_shapes(EngineConfig("unused", device="cpu", cuda_graphs=True), 512) is None


def test_graph_shapes_validation():
    with pytest.raises(ValueError, match="batch_sizes must be distinct positive integers"):
        GraphShapes((2, 1), (1,), 16)
    with pytest.raises(ValueError, match="query_lens go up to 65"):
        GraphShapes((1,), (1, 65), 16)
    with pytest.raises(ValueError, match="max_context must be >= 1"):
        GraphShapes((1,), (1,), 0)
