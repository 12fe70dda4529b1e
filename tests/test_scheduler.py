"""Scheduler decisions, step by step: exact requests, token ranges, block ids and preemption order."""
from __future__ import annotations

from mta_serve.block_pool import BlockPool
from mta_serve.config import SchedulerConfig
from mta_serve.kv_cache_manager import KVCacheManager
from mta_serve.request import Request, RequestStatus
from mta_serve.sampling_params import SamplingParams
from mta_serve.scheduler import Scheduler


def make(num_blocks=16, block_size=4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), KVCacheManager(BlockPool(num_blocks), block_size))


def add(s: Scheduler, rid: str, prompt_len: int, max_tokens: int = 4) -> Request:
    r = Request(rid, [1000 * ord(rid[0]) + i for i in range(prompt_len)], SamplingParams(max_tokens=max_tokens))
    s.add(r)
    return r


def plan(out) -> list[tuple[str, int, int]]:
    return [(x.request.request_id, x.start, x.end) for x in out.scheduled]


def finish_step(s: Scheduler, out, token: int = 1) -> None:
    s.update(out.scheduled)
    for x in out.scheduled:
        if x.samples:
            x.request.append_pending(0)
            x.request.resolve_pending(token)


def test_budget_chunks_prompts_and_decodes_run_first():
    s = make(max_num_batched_tokens=10, max_chunk_tokens=6)
    add(s, "a", 9)
    add(s, "b", 3)
    out = s.schedule()
    assert plan(out) == [("a", 0, 6), ("b", 0, 3)]
    assert [x.samples for x in out.scheduled] == [False, True]
    finish_step(s, out)
    out = s.schedule()
    assert plan(out) == [("a", 6, 9), ("b", 3, 4)]  # a's last prompt chunk, b's first decode
    finish_step(s, out)
    assert plan(s.schedule()) == [("a", 9, 10), ("b", 4, 5)]


def test_max_num_seqs_limits_admission():
    s = make(max_num_seqs=2)
    for rid in "abc":
        add(s, rid, 2)
    out = s.schedule()
    assert plan(out) == [("a", 0, 2), ("b", 0, 2)] and [r.request_id for r in s.waiting] == ["c"]


def test_blocks_are_assigned_in_order():
    s = make(block_size=4)
    add(s, "a", 5)
    add(s, "b", 4)
    s.schedule()
    assert s.kv.block_ids("a") == [0, 1] and s.kv.block_ids("b") == [2]


def test_preemption_frees_the_newest_and_requeues_it_first():
    s = make(num_blocks=4, block_size=2, max_num_batched_tokens=100)
    a, b = add(s, "a", 4, max_tokens=8), add(s, "b", 4, max_tokens=8)
    out = s.schedule()
    assert plan(out) == [("a", 0, 4), ("b", 0, 4)] and s.kv.pool.num_free == 0
    assert a.status is RequestStatus.RUNNING
    finish_step(s, out)
    out = s.schedule()  # a needs a third block: b (admitted last) is preempted
    assert plan(out) == [("a", 4, 5)] and out.preempted == [b]
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and list(s.waiting) == [b]
    assert s.kv.block_ids("a") == [0, 1, 3] and "b" not in s.kv.block_tables
    assert s.num_preemptions == 1 and b.num_preemptions == 1
    finish_step(s, out)
    out = s.schedule()  # b needs 3 blocks but only its own cached first block is free: it keeps waiting
    assert plan(out) == [("a", 5, 6)] and list(s.waiting) == [b]


def test_preempted_request_resumes_with_its_tokens_and_prefix_blocks():
    s = make(num_blocks=4, block_size=2, max_num_batched_tokens=100)
    a, b = add(s, "a", 4, max_tokens=3), add(s, "b", 4, max_tokens=3)
    finish_step(s, s.schedule())
    finish_step(s, s.schedule())  # preempts b
    assert b.status is RequestStatus.WAITING and b.output_token_ids == [1]
    while a.status is RequestStatus.RUNNING:
        out = s.schedule()
        finish_step(s, out)
        if a.status.finished:
            s.finish(a, a.status)
    out = s.schedule()
    # b's 4 prompt tokens + 1 output: its first (full, cached) block is reused, the rest recomputed
    assert plan(out) == [("b", 2, 5)] and out.scheduled[0].samples


def test_finish_and_abort_free_blocks():
    s = make()
    a = add(s, "a", 6)
    add(s, "b", 3)
    s.schedule()
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    assert "a" not in s.kv.block_tables and [r.request_id for r in s.running] == ["b"]
    waiting = add(s, "c", 2)
    s.finish(waiting, RequestStatus.FINISHED_ABORTED)
    assert not s.waiting


def test_same_step_prefix_sharing():
    """A request admitted in the same step as another with the same prompt shares its full blocks."""
    s = make(block_size=2)
    prompt = [7, 8, 9, 10, 11]
    for rid in ("a", "b"):
        s.add(Request(rid, list(prompt), SamplingParams(max_tokens=2)))
    out = s.schedule()
    assert plan(out) == [("a", 0, 5), ("b", 4, 5)]
    assert s.kv.block_ids("a") == [0, 1, 2] and s.kv.block_ids("b") == [0, 1, 3]


def test_a_pending_token_is_computed_next_and_the_last_one_is_not():
    """With a step in flight a decode's input token is a placeholder: the next step computes it all the
    same. A request whose max_tokens-th token is being drawn has nothing left to compute."""
    s = make()
    a, b = add(s, "a", 3, max_tokens=2), add(s, "b", 3, max_tokens=4)
    out = s.schedule()
    s.update(out.scheduled)
    for row, x in enumerate(out.scheduled):
        x.request.append_pending(row)
    assert a.token_ids[-1] == -1 and b.token_ids[-1] == -2 and a.num_output_tokens == 0
    out = s.schedule()  # the step before is still in flight
    assert plan(out) == [("a", 3, 4), ("b", 3, 4)] and all(x.samples for x in out.scheduled)
    s.update(out.scheduled)
    for row, x in enumerate(out.scheduled):
        x.request.append_pending(row)
    assert a.num_drawn_tokens == 2 and a.num_pending_tokens == 2
    assert plan(s.schedule()) == [("b", 4, 5)]  # a's second (last) token is being drawn


def test_a_stop_token_drops_the_pending_tokens_after_it():
    r = Request("r", [1, 2, 3], SamplingParams(max_tokens=8, stop_token_ids=[50]))
    for row in (4, 0, 2):
        r.append_pending(row)
    assert r.token_ids == [1, 2, 3, -5, -1, -3] and r.output_token_ids == []
    r.resolve_pending(10)
    assert r.output_token_ids == [10] and r.num_pending_tokens == 2 and not r.status.finished
    r.resolve_pending(50)
    assert r.status is RequestStatus.FINISHED_STOPPED
    assert r.token_ids == [1, 2, 3, 10, 50] and r.num_pending_tokens == 0
