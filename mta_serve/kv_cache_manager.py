"""Per-request block tables over the block pool, with hash-chained prefix caching, and per-request MTA
state slots.

A block's hash covers its tokens and, through its parent's hash, every token before it. The cache holds per
token exactly what depends only on that prefix (K, V and, for key-query-conv layers, the query), so a hit is
exact however the prefix was computed: whole, in chunks, or after a preemption.

A state slot holds what belongs to one request rather than to a prefix: the partial conv sums of the next rows
of its post-conv layers (kernels.mta_attention.ConvState). A request gets one when the runner first asks and
keeps it until its blocks are freed (finish, abort, preemption). The manager also records up to which
position the slot's sums are current, so that only a request continuing exactly there reads them.
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
    def __init__(self, pool: BlockPool, block_size: int, num_state_slots: int = 256):
        self.pool = pool
        self.block_size = block_size
        self.num_state_slots = num_state_slots  # at least the scheduler's max_num_seqs
        self._free_states = list(range(num_state_slots - 1, -1, -1))
        self._state_slots: dict[str, int] = {}
        self._state_ends: dict[str, int] = {}  # request -> the sequence length its slot's sums belong to
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
        table = self.block_tables.get(request.request_id)
        end = request.num_computed_tokens + num_new_tokens
        if not cached and table is not None and self.blocks_for(end) <= len(table):
            self.cache_full_blocks(request, end)  # a decode step, mostly: nothing to allocate
            return True
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
        self._block_ids.setdefault(request.request_id, []).extend([b.block_id for b in cached] +
                                                                  [b.block_id for b in new])
        self.cache_full_blocks(request, num_computed + num_new_tokens)
        return True

    def cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Index the blocks that are full once `num_tokens` tokens are computed and whose tokens are known
        (a block holding a pending token is indexed at a later step)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        full = min(num_tokens, request.num_known_tokens) // bs
        if len(hashes) >= full:
            return
        table = self.block_tables[request.request_id]
        for i in range(len(hashes), full):
            hashes.append(block_hash(hashes[-1] if hashes else None, request.token_ids[i * bs:(i + 1) * bs]))
            self.pool.cache(table[i], hashes[-1])

    def free(self, request_id: str) -> None:
        """Release a request's blocks, last block first, so the prefix blocks stay cached the longest."""
        table = self.block_tables.pop(request_id, [])
        self._block_ids.pop(request_id, None)
        self._hashes.pop(request_id, None)
        self.pool.free(table[::-1])
        self._state_ends.pop(request_id, None)
        slot = self._state_slots.pop(request_id, None)
        if slot is not None:
            self._free_states.append(slot)

    def state_slot(self, request_id: str) -> int:
        """The request's state slot, assigned on first use."""
        slot = self._state_slots.get(request_id)
        if slot is None:
            if not self._free_states:
                raise RuntimeError(f"all {self.num_state_slots} MTA state slots are taken: more requests run at "
                                   "once than the state slots the engine was built with (max_num_seqs)")
            slot = self._state_slots[request_id] = self._free_states.pop()
        return slot

    def state_ready(self, request_id: str, start: int) -> bool:
        """Whether the request's slot holds the rows of a step computing from position `start` on."""
        return self._state_ends.get(request_id) == start

    def state_written(self, request_id: str, end: int) -> None:
        """A step computing the request up to length `end` has been queued; it writes the slot."""
        self._state_ends[request_id] = end

    def slot(self, request_id: str, position: int) -> int:
        block = self.block_tables[request_id][position // self.block_size]
        return block.block_id * self.block_size + position % self.block_size
