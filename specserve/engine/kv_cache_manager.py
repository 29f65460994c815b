"""KVCacheManager: which blocks each request holds, prefix-cache hits, and slot reservations.

The accounting follows one rule for prefill, decode and speculation: a request holds enough
blocks for every token it has computed plus the tokens scheduled this step (including the
speculative lookahead). Rejected speculative tokens need no freeing: their slots lie beyond
`num_computed_tokens` and are overwritten by later steps. Only full blocks of finalised tokens
(verified, with KV written) enter the prefix cache.

Both models (verifier and draft) use the same block ids, each in its own KV pool, so one
manager serves both. Knows nothing about tensors or models.
"""

from __future__ import annotations

from specserve.engine.block_pool import BlockPool, hash_block
from specserve.engine.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.req_blocks: dict[str, list[int]] = {}
        self.req_hashes: dict[str, list[bytes]] = {}  # hashes of the request's cached full blocks
        self.req_draft_marked: dict[str, int] = {}  # how many of them cache_finalised has marked draft-valid
        self.prefix_hit_blocks = 0
        self.prefix_queried_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests (cached but unreferenced blocks count as free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def blocks_of(self, request_id: str) -> list[int]:
        return self.req_blocks.get(request_id, [])

    def find_cached_prefix(self, request: Request) -> tuple[list[int], int, int]:
        """Longest run of cached full blocks at the head of the request's tokens.

        Returns (block ids, tokens they cover, tokens whose draft KV they also hold). The last
        token is always left to compute so that the step yields logits. A request still scoring its prompt
        (prompt logprobs) gets no hit: it needs the verifier's logits at every prompt position.
        """
        if not self.enable_prefix_caching or request.scores_prompt:
            return [], 0, 0
        tokens = request.all_token_ids
        num_full = (len(tokens) - 1) // self.block_size
        blocks: list[int] = []
        draft_blocks = 0
        parent = None
        for i in range(num_full):
            h = hash_block(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block_id = self.pool.lookup(h)
            if block_id is None:
                break
            if len(blocks) == draft_blocks and self.pool.blocks[block_id].draft_valid:
                draft_blocks += 1
            blocks.append(block_id)
            parent = h
        self.prefix_queried_blocks += num_full
        self.prefix_hit_blocks += len(blocks)
        return blocks, len(blocks) * self.block_size, draft_blocks * self.block_size

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Make room for `num_new_tokens` beyond the computed ones; False (and no change) if the pool can't."""
        held = self.req_blocks.get(request.request_id, [])
        cached_blocks = cached_blocks or []
        total_tokens = request.num_computed_tokens + num_new_tokens
        needed = -(-total_tokens // self.block_size) - len(held) - len(cached_blocks)
        # cached blocks that sit in the free queue stop being free once we take them
        cached_free = sum(1 for b in cached_blocks if self.pool.blocks[b].ref_count == 0)
        if max(needed, 0) + cached_free > self.pool.num_free:
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
        new = self.pool.allocate(needed) if needed > 0 else []
        self.req_blocks[request.request_id] = held + cached_blocks + new
        if cached_blocks:
            self.req_hashes[request.request_id] = [self.pool.blocks[b].block_hash for b in cached_blocks]
        return True

    def invalidate_draft(self) -> None:
        """A new draft model: no cached block holds its KV."""
        self.pool.invalidate_draft()

    def cache_finalised(self, request: Request, num_finalised: int, num_draft_finalised: int) -> None:
        """Enter the request's full blocks of finalised tokens into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks.get(request.request_id, [])
        hashes = self.req_hashes.setdefault(request.request_id, [])
        tokens = request.all_token_ids
        num_full = min(num_finalised // self.block_size, len(blocks))
        while len(hashes) < num_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            h = hash_block(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            self.pool.cache(blocks[i], h, draft_valid=(i + 1) * self.block_size <= num_draft_finalised)
            hashes.append(h)
        # a block cached before the draft caught up on it (a prompt: the draft catches up at the first decode
        # step) vouches for the draft's KV once the draft has written it
        marked = self.req_draft_marked.get(request.request_id, 0)
        num_draft_full = min(num_draft_finalised // self.block_size, len(hashes))
        for i in range(marked, num_draft_full):
            block = self.pool.blocks[blocks[i]]
            if block.block_hash == hashes[i]:
                block.draft_valid = True
        self.req_draft_marked[request.request_id] = max(marked, num_draft_full)

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_hashes.pop(request.request_id, None)
        self.req_draft_marked.pop(request.request_id, None)
        self.pool.release(list(reversed(blocks)))
