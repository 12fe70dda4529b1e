"""Continuous batching: each step picks how many tokens every request computes.

Running requests go first, in arrival order; each asks for all its uncomputed tokens (a decode asks for 1, a
prompt for the rest of its prompt; a token still being drawn on the device counts, see Request), capped by
the step's token budget and `max_chunk_tokens`. When the cache is full, the most recently admitted running
request is preempted: its blocks are freed and it waits, first in line, to recompute. Waiting requests are
admitted in order while budget, `max_num_seqs` and blocks allow, starting after their cached prefix.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .config import SchedulerConfig
from .kv_cache_manager import KVCacheManager
from .request import Request, RequestStatus


@dataclass(slots=True, frozen=True)
class ScheduledRequest:
    """A request's share of one step, fixed when scheduled: it computes positions [start, end)."""

    request: Request
    start: int
    end: int
    samples: bool  # the step reaches its last known token, so the logits there give the next token

    @classmethod
    def of(cls, request: Request, num_new_tokens: int) -> "ScheduledRequest":
        end = request.num_computed_tokens + num_new_tokens
        return cls(request, request.num_computed_tokens, end, end == request.num_tokens)

    @property
    def num_new_tokens(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:  # a full cache admits nobody new this step
            self._schedule_waiting(out, budget)
        return out

    def _chunk(self, request: Request, budget: int) -> int:
        cap = self.config.max_chunk_tokens or budget
        return min(request.num_tokens - request.num_computed_tokens, budget, cap)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.num_drawn_tokens >= request.params.max_tokens:
                i += 1  # its last token is being drawn (a step in flight): nothing left to compute
                continue
            num_new = self._chunk(request, budget)
            while not self.kv.allocate(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    return budget
            out.scheduled.append(ScheduledRequest.of(request, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request)
            request.num_computed_tokens = 0
            num_new = min(request.num_tokens - len(cached) * self.kv.block_size, budget,
                          self.config.max_chunk_tokens or budget)
            if not self.kv.allocate(request, num_new, cached):
                return
            request.num_computed_tokens = len(cached) * self.kv.block_size
            self.kv.record_prefix_lookup(request.num_tokens, request.num_computed_tokens)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest.of(request, num_new))
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        self._release(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, scheduled: list[ScheduledRequest]) -> None:
        """Once the step is queued on the device: its tokens count as computed (later steps are queued
        behind it, so whatever reads their K/V runs after it)."""
        for s in scheduled:
            s.request.num_computed_tokens = s.end

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request (finished or aborted) wherever it is and free its blocks."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    def _release(self, request: Request) -> None:
        """Free the request's blocks, indexing first the full ones whose last token was still being drawn
        when their final step was scheduled (their K/V is computed, or queued, and their tokens known now)."""
        if request.request_id in self.kv.block_tables:
            self.kv.cache_full_blocks(request, request.num_computed_tokens)
        self.kv.free(request.request_id)
