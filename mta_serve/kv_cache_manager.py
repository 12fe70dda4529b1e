"""Per-request block tables over the block pool, with hash-chained prefix caching.

A block's hash covers its tokens and, through its parent's hash, every token before it. The cache holds per
token exactly what depends only on that prefix (K, V and, for key-query-conv layers, the query), so a hit is
exact however the prefix was computed: whole, in chunks, or after a preemption.
"""
from __future__ import annotations

import hashlib
from array import array

from .block_pool import Block, BlockPool
from .request import Request


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    h = hashlib.sha256(parent or b"root")
    h.update(array("q", tokens).tobytes())
    return h.digest()


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size
        self.block_tables: dict[str, list[Block]] = {}
        self._block_ids: dict[str, list[int]] = {}  # the same tables as ids: read for every request every step
        self._hashes: dict[str, list[bytes]] = {}  # hashes of each request's full blocks, in order
        self.prefix_query_tokens = 0  # tokens of admitted requests that were looked up in the prefix cache
        self.prefix_hit_tokens = 0  # ... and that were found there

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_query_tokens += num_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table as block ids (the manager's own list: do not modify it)."""
        return self._block_ids.get(request_id, [])

    def find_cached_prefix(self, request: Request) -> list[Block]:
        """Cached blocks matching the request's leading full blocks. At least one token is always left to
        compute (its logits give the next token), so a fully cached prompt still recomputes its last block.
        Requests asking for prompt logprobs never hit."""
        if not self.pool.enable_caching or request.params.prompt_logprobs is not None:
            return []  # prompt logprobs need the logits of every prompt position, so compute them all
        hits: list[Block] = []
        parent = None
        for i in range((request.num_tokens - 1) // self.block_size):
            parent = block_hash(parent, request.token_ids[i * self.block_size:(i + 1) * self.block_size])
            block = self.pool.lookup(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(self, request: Request, num_new_tokens: int, cached: list[Block] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones (and the `cached` hits of a
        new request). False, changing nothing, when too few blocks are free."""
        table = self.block_tables.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(cached) * self.block_size
        need = self.blocks_for(num_computed + num_new_tokens) - len(table) - len(cached)
        revived = sum(1 for b in cached if b.ref_count == 0)  # cached hits that sit in the free list
        if need + revived > self.pool.num_free:
            if not table:
                del self.block_tables[request.request_id]
            return False
        self.pool.touch(list(cached))
        new = self.pool.allocate(max(need, 0))
        table.extend(cached)
        table.extend(new)
        ids = self._block_ids.setdefault(request.request_id, [])
        if cached or new:  # a decode step mostly allocates nothing: keep that path cheap
            ids.extend([b.block_id for b in cached] + [b.block_id for b in new])
        self._cache_full_blocks(request, num_computed + num_new_tokens)
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Index the blocks that are full once `num_tokens` tokens are computed (their tokens are known)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        table = self.block_tables[request.request_id]
        bs = self.block_size
        for i in range(len(hashes), min(num_tokens, request.num_tokens) // bs):
            hashes.append(block_hash(hashes[-1] if hashes else None, request.token_ids[i * bs:(i + 1) * bs]))
            self.pool.cache(table[i], hashes[-1])

    def free(self, request_id: str) -> None:
        """Release a request's blocks, last block first, so the prefix blocks stay cached the longest."""
        table = self.block_tables.pop(request_id, [])
        self._block_ids.pop(request_id, None)
        self._hashes.pop(request_id, None)
        self.pool.free(table[::-1])

    def slot(self, request_id: str, position: int) -> int:
        block = self.block_tables[request_id][position // self.block_size]
        return block.block_id * self.block_size + position % self.block_size
