"""BlockPool: the fixed set of KV blocks, their reference counts and the prefix-cache index.

A block is free when no request references it. Free blocks queue in LRU order; a free block
may still hold a cached prefix (it keeps its hash) until it is handed out again, which evicts
it from the index. Knows nothing about requests or tensors: only block ids and counts.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass


def hash_block(parent: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """Chained hash of one full block: it names the block's tokens *and* everything before them."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    draft_valid: bool = False
    """Whether the draft model's KV for this cached block was computed (a hit may reuse it)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks from the head of the free queue (least recently used), evicting their cache."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} blocks, only {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) == block_id:
                    del self.cached[block.block_hash]
                block.block_hash = None
                block.draft_valid = False
            block.ref_count = 1
            out.append(block_id)
        return out

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (a prefix-cache hit)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; unreferenced blocks join the free queue's tail.

        Callers pass a request's blocks last-first, so a request's tail blocks are evicted
        before its head blocks, which other requests are likelier to share.
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} released more often than taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def cache(self, block_id: int, block_hash: bytes, draft_valid: bool) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.draft_valid = draft_valid
        # an identical block may already be cached by another request: keep the first
        self.cached.setdefault(block_hash, block_id)

    def invalidate_draft(self) -> None:
        """A new draft model makes every cached draft KV stale."""
        for block in self.blocks:
            block.draft_valid = False
