"""KV accounting for the scheduler's and the KV-cache manager's unit tests: requests built without a model
or tokenizer, and the invariants of the block pool.

Knows nothing of models or tensors; imported by plain name (`from kv_accounting import make_request`), as
pytest puts tests/ on sys.path.
"""

from __future__ import annotations

from specserve.engine.block_pool import BlockPool
from specserve.engine.kv_cache_manager import KVCacheManager
from specserve.engine.request import Request
from specserve.sampling_params import SamplingParams


class NoStopStrings:
    """A detokenizer stand-in for requests without text: no token ever completes a stop string."""

    def add(self, token: int) -> None:
        return None


def make_request(request_id: str, prompt_token_ids: list[int], max_tokens: int = 16, **params) -> Request:
    """A request as the scheduler sees it: no text (no stop strings), no EOS (it ends by length or by abort)."""
    return Request(
        request_id, prompt_token_ids, SamplingParams(max_tokens=max_tokens, **params), NoStopStrings(), set()
    )


def assert_pool_consistent(pool: BlockPool) -> None:
    """Free queue = the unreferenced blocks, each once; the index only names blocks that carry that hash."""
    free = list(pool.free_queue)
    assert len(free) == len(set(free))
    assert set(free) == {b.block_id for b in pool.blocks if b.ref_count == 0}
    assert all(b.ref_count >= 0 for b in pool.blocks)
    for h, block_id in pool.cached.items():
        assert pool.blocks[block_id].block_hash == h


def assert_nothing_held(kv: KVCacheManager) -> None:
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert all(b.ref_count == 0 for b in kv.pool.blocks)
    assert kv.req_blocks == {} and kv.req_hashes == {}
    assert_pool_consistent(kv.pool)
