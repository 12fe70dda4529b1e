"""Block pool and KV-cache manager: exact block ids, orders and reference counts."""
from __future__ import annotations

import pytest

from mta_serve.block_pool import BlockPool
from mta_serve.kv_cache_manager import KVCacheManager, block_hash
from mta_serve.request import Request
from mta_serve.sampling_params import SamplingParams


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_allocate_and_free_order():
    pool = BlockPool(6)
    a = pool.allocate(3)
    b = pool.allocate(2)
    assert ids(a) == [0, 1, 2] and ids(b) == [3, 4] and pool.num_free == 1
    pool.free(b[::-1])  # 4 then 3 become free after 5
    assert ids(pool.allocate(3)) == [5, 4, 3]
    assert pool.num_free == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_ref_counts_and_double_free():
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.touch([block])
    assert block.ref_count == 2
    pool.free([block])
    assert pool.num_free == 1  # still referenced once
    pool.free([block])
    assert pool.num_free == 2
    with pytest.raises(RuntimeError, match="freed more often"):
        pool.free([block])


def test_cached_blocks_survive_free_until_reallocated():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.cache(blocks[0], b"h0")
    pool.cache(blocks[1], b"h1")
    pool.free(blocks[::-1])  # free list: 2, 1, 0
    assert pool.lookup(b"h0") is blocks[0] and pool.num_cached == 2
    pool.touch([blocks[0]])  # a prefix hit revives block 0 from the middle of the free list
    assert pool.num_free == 2 and blocks[0].ref_count == 1
    assert ids(pool.allocate(2)) == [2, 1]  # block 1 is reallocated: its cached contents are evicted
    assert pool.lookup(b"h1") is None and pool.lookup(b"h0") is blocks[0]


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.cache(a, b"same")
    pool.cache(b, b"same")
    assert pool.lookup(b"same") is a and b.block_hash is None


def test_caching_disabled():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache(a, b"h")
    assert pool.lookup(b"h") is None


def _request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def test_manager_block_tables_slots_and_reverse_free():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    r = _request("a", list(range(10)))
    assert kv.allocate(r, 10)
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.slot("a", 9) == 2 * 4 + 1
    r.num_computed_tokens = 10
    r.token_ids.append(99)
    assert kv.allocate(r, 1) and kv.block_ids("a") == [0, 1, 2]  # position 10 fits block 2
    r.num_computed_tokens = 11
    r.token_ids += [98, 97]
    assert kv.allocate(r, 2) and kv.block_ids("a") == [0, 1, 2, 3]  # position 12 opens block 3
    kv.free("a")
    assert kv.block_ids("a") == [] and "a" not in kv.block_tables
    assert list(kv.pool._free)[-4:] == [3, 2, 1, 0]  # the prefix block is reused last


def test_blocks_filled_by_decode_steps_are_cached_for_later_prompts():
    """A decode step whose token lands in an already allocated block allocates nothing, but once the block
    is full it is indexed all the same, so a later prompt extending the generated text hits it."""
    kv = KVCacheManager(BlockPool(8), block_size=4)
    r = _request("a", list(range(6)))
    assert kv.allocate(r, 6) and kv.pool.num_cached == 1
    r.num_computed_tokens = 6
    for token in (50, 51):  # positions 6 and 7: block 1 fills without a new block
        r.token_ids.append(token)
        assert kv.allocate(r, 1) and kv.block_ids("a") == [0, 1]
        r.num_computed_tokens += 1
    assert kv.pool.num_cached == 2
    later = _request("b", list(range(6)) + [50, 51, 9])
    assert ids(kv.find_cached_prefix(later)) == [0, 1]


def test_manager_refuses_without_changing_anything():
    kv = KVCacheManager(BlockPool(2), block_size=4)
    r = _request("a", list(range(9)))
    assert not kv.allocate(r, 9)
    assert kv.pool.num_free == 2 and "a" not in kv.block_tables and kv.block_ids("a") == []


def test_prefix_lookup_chains_hashes_and_leaves_a_token():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    first = _request("a", list(range(12)))
    assert kv.allocate(first, 12)  # three full blocks, all cached
    assert kv.pool.num_cached == 3
    same = _request("b", list(range(12)))
    assert ids(kv.find_cached_prefix(same)) == [0, 1]  # (12 - 1) // 4: the last block is recomputed
    longer = _request("c", list(range(12)) + [7])
    assert ids(kv.find_cached_prefix(longer)) == [0, 1, 2]
    other = _request("d", [1] + list(range(1, 12)))
    assert kv.find_cached_prefix(other) == []  # the first block differs, so nothing after it can match
    assert block_hash(None, [0, 1, 2, 3]) != block_hash(b"x", [0, 1, 2, 3])
    assert kv.allocate(longer, 1, kv.find_cached_prefix(longer))
    assert kv.block_ids("c") == [0, 1, 2, 3] and [b.ref_count for b in kv.pool.blocks[:4]] == [2, 2, 2, 1]


def test_prompt_logprob_requests_never_hit():
    kv = KVCacheManager(BlockPool(8), block_size=4)
    assert kv.allocate(_request("a", list(range(12))), 12)
    r = Request("b", list(range(12)) + [5], SamplingParams(prompt_logprobs=1))
    assert kv.find_cached_prefix(r) == []


def test_state_slots_are_per_request_reused_after_free_and_current_only_where_written():
    kv = KVCacheManager(BlockPool(8), block_size=4, num_state_slots=2)
    a, b = kv.state_slot("a"), kv.state_slot("b")
    assert {a, b} == {0, 1} and kv.state_slot("a") == a  # assigned once, kept
    assert not kv.state_ready("a", 0)  # nothing written yet: not even at the start
    kv.state_written("a", 7)
    assert kv.state_ready("a", 7) and not kv.state_ready("a", 6) and not kv.state_ready("b", 7)
    with pytest.raises(RuntimeError, match="MTA state slots"):
        kv.state_slot("c")
    kv.free("a")  # finish, abort or preemption: the slot and what it held go
    assert kv.state_slot("c") == a and not kv.state_ready("c", 7)
    kv.free("b")
    assert kv.state_slot("a") == b and not kv.state_ready("a", 7)  # back after a preemption: starts over
