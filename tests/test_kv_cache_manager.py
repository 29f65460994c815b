"""BlockPool and KVCacheManager alone: block ids and counters, no model, no tensors.

Covers allocation and freeing with reference counts, prefix-cache hits (chained hashes, the last token
left to compute, draft KV validity), LRU eviction of cached free blocks, and rollback of rejected
speculative tokens (a counter moves; no block is copied or cached with unverified tokens).
"""

from __future__ import annotations

import pytest
from kv_accounting import assert_nothing_held, assert_pool_consistent, make_request

from specserve.engine.block_pool import BlockPool, hash_block
from specserve.engine.kv_cache_manager import KVCacheManager

BS = 4  # tokens per block in these tests


def compute(kv: KVCacheManager, request, num_new: int, draft: bool = True) -> None:
    """What the engine does after a step that computed `num_new` tokens of `request` (all verified)."""
    assert kv.allocate(request, num_new)
    request.num_computed_tokens += num_new
    if draft:
        request.num_draft_computed_tokens = request.num_computed_tokens
    kv.cache_finalised(request, request.num_computed_tokens, request.num_draft_computed_tokens)


# ---- BlockPool -----------------------------------------------------------------------------------------------------


def test_pool_allocates_least_recently_used_first_and_counts_references():
    pool = BlockPool(4)
    a = pool.allocate(2)
    assert a == [0, 1] and pool.num_free == 2
    assert [pool.blocks[b].ref_count for b in a] == [1, 1]
    pool.release([1, 0])  # a request's blocks come back last-first
    assert list(pool.free_queue) == [2, 3, 1, 0]
    assert pool.allocate(3) == [2, 3, 1]
    assert_pool_consistent(pool)


def test_pool_refuses_more_blocks_than_free_and_double_release():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="asked for 3 blocks, only 2 free"):
        pool.allocate(3)
    assert pool.num_free == 2  # a refused allocation takes nothing
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(RuntimeError, match=f"block {b} released more often than taken"):
        pool.release([b])
    with pytest.raises(ValueError, match="at least one block, got 0"):
        BlockPool(0)


def test_pool_shared_block_is_free_only_after_its_last_reference():
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool.touch([b])  # a second request hits it
    assert pool.blocks[b].ref_count == 2
    pool.release([b])
    assert pool.blocks[b].ref_count == 1 and b not in pool.free_queue
    pool.release([b])
    assert pool.blocks[b].ref_count == 0 and b in pool.free_queue
    pool.touch([b])  # a hit on a free cached block takes it out of the free queue
    assert pool.num_free == 2 and b not in pool.free_queue
    assert_pool_consistent(pool)


def test_pool_cached_free_block_stays_findable_until_handed_out():
    pool = BlockPool(2)
    h = hash_block(None, [1, 2, 3, 4])
    (b,) = pool.allocate(1)
    pool.cache(b, h, draft_valid=True)
    pool.release([b])
    assert pool.lookup(h) == b  # free, still cached
    pool.allocate(1)  # the other block: the cached one is at the queue's tail
    assert pool.lookup(h) == b
    assert pool.allocate(1) == [b]  # handed out again: evicted from the index
    assert pool.lookup(h) is None
    assert pool.blocks[b].block_hash is None and not pool.blocks[b].draft_valid
    assert_pool_consistent(pool)


def test_pool_keeps_the_first_of_two_identical_cached_blocks():
    pool = BlockPool(3)
    h = hash_block(None, [7] * BS)
    first, second = pool.allocate(2)
    pool.cache(first, h, draft_valid=False)
    pool.cache(second, h, draft_valid=False)
    assert pool.lookup(h) == first
    pool.release([second, first])
    pool.allocate(2)  # block 2, then `second`: evicting the duplicate leaves the first's entry
    assert pool.lookup(h) == first
    assert_pool_consistent(pool)


def test_block_hash_names_the_whole_prefix():
    a = hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) == a
    assert hash_block(a, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(None, [1, 2]) != hash_block(None, [12])  # token boundaries count


# ---- KVCacheManager: allocation ------------------------------------------------------------------------------------


def test_allocate_holds_blocks_for_computed_plus_scheduled_tokens():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_request("a", list(range(5)))
    assert kv.allocate(r, 5)
    assert len(kv.blocks_of("a")) == 2  # 5 tokens: 2 blocks of 4
    r.num_computed_tokens = 5
    assert kv.allocate(r, 3)  # up to 8 tokens: still 2 blocks
    assert len(kv.blocks_of("a")) == 2
    assert kv.allocate(r, 4)  # 9 tokens: a third
    assert len(kv.blocks_of("a")) == 3 and kv.num_free_blocks == 5
    assert kv.usage == pytest.approx(3 / 8)
    kv.free(r)
    assert_nothing_held(kv)
    assert kv.blocks_of("a") == []


def test_allocate_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a, b = make_request("a", [1] * 8), make_request("b", [2] * 8)
    assert kv.allocate(a, 8)
    held = list(kv.blocks_of("a"))
    assert not kv.allocate(b, 8)  # needs 2, 1 free
    assert kv.blocks_of("b") == [] and kv.num_free_blocks == 1
    a.num_computed_tokens = 8
    assert not kv.allocate(a, 5)  # 13 tokens: 4 blocks, 3 in the pool
    assert kv.blocks_of("a") == held and kv.num_free_blocks == 1
    kv.free(a)
    kv.free(b)  # freeing a request that holds nothing is harmless
    assert_nothing_held(kv)


# ---- KVCacheManager: prefix cache ----------------------------------------------------------------------------------


def test_prefix_hit_reuses_full_finalised_blocks_and_leaves_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(10, 20))  # 10 tokens: blocks [10..13] [14..17] and 2 more
    a = make_request("a", prompt)
    compute(kv, a, 10)
    assert len(kv.pool.cached) == 2  # only the full blocks
    a_blocks = kv.blocks_of("a")
    kv.free(a)

    b = make_request("b", prompt)
    blocks, num_cached, num_draft_cached = kv.find_cached_prefix(b)
    assert blocks == a_blocks[:2]
    assert (num_cached, num_draft_cached) == (8, 8)
    b.num_computed_tokens = num_cached
    assert kv.allocate(b, 10 - num_cached, blocks)
    assert kv.blocks_of("b")[:2] == blocks and len(kv.blocks_of("b")) == 3
    assert kv.prefix_hit_blocks == 2 and kv.prefix_queried_blocks == 2

    # exactly two blocks of prompt: the second is not reused, its last token must be computed for logits
    c = make_request("c", prompt[:8])
    blocks, num_cached, _ = kv.find_cached_prefix(c)
    assert num_cached == 4 and len(blocks) == 1


def test_prefix_hit_needs_the_same_tokens_before_the_block():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(kv, a, 9)
    same_second_block = make_request("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert kv.find_cached_prefix(same_second_block)[:2] == ([], 0)
    first_block_only = make_request("c", [1, 2, 3, 4, 0, 6, 7, 8, 9])
    assert kv.find_cached_prefix(first_block_only)[1] == 4


def test_shared_prefix_blocks_are_referenced_by_both_and_freed_by_the_last():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    prompt = list(range(9))
    a = make_request("a", prompt)
    compute(kv, a, 9)
    b = make_request("b", prompt + [100])
    blocks, num_cached, _ = kv.find_cached_prefix(b)
    b.num_computed_tokens = num_cached
    assert kv.allocate(b, b.num_tokens - num_cached, blocks)
    assert kv.blocks_of("b")[:2] == kv.blocks_of("a")[:2]
    assert [kv.pool.blocks[x].ref_count for x in blocks] == [2, 2]
    assert kv.num_free_blocks == 6 - 3 - 1
    kv.free(a)
    assert [kv.pool.blocks[x].ref_count for x in blocks] == [1, 1]
    assert kv.num_free_blocks == 6 - 3  # a's own third block only
    kv.free(b)
    assert_nothing_held(kv)
    assert len(kv.pool.cached) == 2  # freed blocks keep their cached prefix


def test_cached_free_blocks_are_evicted_tail_first_when_the_pool_runs_short():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = list(range(13))  # 3 full blocks + 1 token
    a = make_request("a", prompt)
    compute(kv, a, 13)
    a_blocks = kv.blocks_of("a")
    kv.free(a)  # all 4 free, 3 still cached; the request's tail goes first in LRU order
    filler = make_request("filler", [99] * 5)
    assert kv.allocate(filler, 5)
    assert kv.blocks_of("filler") == [a_blocks[3], a_blocks[2]]  # a's uncached 4th block, then its 3rd
    assert len(kv.pool.cached) == 2  # the 3rd was evicted from the index when handed out
    b = make_request("b", prompt)
    blocks, num_cached, _ = kv.find_cached_prefix(b)
    assert blocks == a_blocks[:2] and num_cached == 8
    # the hit's two free blocks count against the free ones: b needs them plus 2 new, 0 are left after them
    b.num_computed_tokens = num_cached
    assert not kv.allocate(b, 5, blocks)
    assert all(kv.pool.blocks[x].ref_count == 0 for x in blocks)  # the refused hit took no reference
    kv.free(filler)
    assert kv.allocate(b, 5, blocks)
    kv.free(b)
    assert_nothing_held(kv)


def test_draft_kv_of_a_hit_is_reused_only_where_the_draft_computed_it():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = list(range(13))
    a = make_request("a", prompt)
    assert kv.allocate(a, 13)
    a.num_computed_tokens = 13
    kv.cache_finalised(a, 13, num_draft_finalised=5)  # the draft has seen one block only
    kv.free(a)
    _, num_cached, num_draft_cached = kv.find_cached_prefix(make_request("b", prompt))
    assert (num_cached, num_draft_cached) == (12, 4)
    kv.invalidate_draft()  # a new draft model
    _, num_cached, num_draft_cached = kv.find_cached_prefix(make_request("c", prompt))
    assert (num_cached, num_draft_cached) == (12, 0)


def test_no_prefix_hit_for_a_request_that_scores_its_prompt_or_with_caching_off():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    compute(kv, a, 9)
    scoring = make_request("b", list(range(9)), prompt_logprobs=1)
    assert kv.find_cached_prefix(scoring) == ([], 0, 0)

    off = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    compute(off, a, 9)
    assert off.pool.cached == {}
    assert off.find_cached_prefix(make_request("b", list(range(9)))) == ([], 0, 0)


# ---- KVCacheManager: speculative rollback --------------------------------------------------------------------------


def test_rejected_tokens_roll_back_a_counter_and_are_never_cached():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_request("r", [1, 2, 3])
    compute(kv, r, 3)
    r.append_token(4)  # the prefill's sampled token: 4 known, 3 computed
    # decode step: the new token plus k = 3 draft slots, 3 + 4 = 7 slots: 2 blocks
    assert kv.allocate(r, 1 + 3)
    held = list(kv.blocks_of("r"))
    assert len(held) == 2
    # all 3 drafts rejected: computed += scheduled - rejected, one recovered token is emitted
    r.num_computed_tokens += 4 - 3
    r.append_token(50)
    kv.cache_finalised(r, r.num_computed_tokens, r.num_computed_tokens)
    assert r.num_computed_tokens == 4 and r.num_tokens == 5
    # block 1's slots 4..6 hold rejected KV: not cached, not freed, not copied; the next step overwrites them
    assert kv.blocks_of("r") == held
    assert [kv.pool.blocks[b].block_hash is not None for b in held] == [True, False]
    assert kv.allocate(r, 1 + 3)  # 4 + 4 = 8 slots: the same 2 blocks
    assert kv.blocks_of("r") == held and kv.num_free_blocks == 6
    kv.free(r)
    assert_nothing_held(kv)


def test_rollback_across_a_block_boundary_keeps_the_block_for_the_next_step():
    """The lookahead's block is not freed when rejection moves the counter back across its boundary: the
    next step's lookahead reuses it (KVCacheManager's docstring: rejected slots are overwritten), and it
    returns to the pool when the request ends. So a request holds at most ceil(k / block) blocks beyond its
    computed tokens."""
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    r = make_request("r", list(range(7)))
    compute(kv, r, 7)
    r.append_token(7)  # 8 known, 7 computed: 2 blocks, both full after this step
    assert kv.allocate(r, 1 + 3)  # 11 slots: a third block for the drafts
    assert len(kv.blocks_of("r")) == 3 and kv.num_free_blocks == 5
    r.num_computed_tokens += 1  # every draft rejected: back to 8, the boundary of block 2
    r.append_token(60)
    kv.cache_finalised(r, r.num_computed_tokens, r.num_computed_tokens)
    third = kv.blocks_of("r")[2]
    assert len(kv.blocks_of("r")) == 3 and kv.pool.blocks[third].block_hash is None
    assert len(kv.pool.cached) == 2  # the two blocks of finalised tokens
    assert kv.allocate(r, 1 + 3)  # 8 + 4 slots: no new block
    assert kv.num_free_blocks == 5
    kv.free(r)
    assert_nothing_held(kv)
