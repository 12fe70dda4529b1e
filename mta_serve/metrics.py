"""Prometheus metrics, under vLLM's names where the meaning matches (so existing dashboards work) and `mta_*`
names for what is specific to MTA. Updated by the engine thread after every step (prometheus-client's
metrics are thread-safe) and served at GET /metrics."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import LLMEngine, RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}
        r, names = self.registry, ["model_name"]

        def gauge(name, doc):
            return Gauge(name, doc, names, registry=r).labels(**label)

        def counter(name, doc):
            return Counter(name, doc, names, registry=r).labels(**label)

        def histogram(name, doc):
            return Histogram(name, doc, names, buckets=_LATENCY_BUCKETS, registry=r).labels(**label)

        self.running = gauge("vllm:num_requests_running", "Requests computing in the current step.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage: 1 means every block is in use.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generated tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Preemptions (a request recomputes later).")
        self._success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                names + ["finished_reason"], registry=r)
        self._label = label
        for reason in ("stop", "length", "abort"):  # present from the start, at 0
            self._success.labels(finished_reason=reason, **label)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first token.")
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.")
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.queue = histogram("vllm:request_queue_time_seconds", "Time from arrival to the first step.")
        self.mta_state_bytes = gauge("mta_kv_cache_query_bytes", "Bytes of the paged cache that hold MTA "
                                     "state (the queries of key-query-conv layers).")
        self.kv_bytes = gauge("mta_kv_cache_bytes", "Bytes of the whole paged cache (K, V and MTA queries).")
        self.prefix_queries = counter("mta_prefix_cache_queried_tokens", "Prompt tokens looked up in the "
                                      "prefix cache.")
        self.prefix_hits = counter("mta_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache.")
        self._last_token_time: dict[str, float] = {}
        self._seen = {"preemptions": 0, "prefix_queries": 0, "prefix_hits": 0}

    def set_cache_size(self, engine: LLMEngine) -> None:
        backend = engine.runner.backend
        q_bytes = sum(t.numel() * t.element_size() for t in backend.q_cache if t is not None)
        kv_bytes = sum(t.numel() * t.element_size() for t in backend.k_cache + backend.v_cache)
        self.mta_state_bytes.set(q_bytes)
        self.kv_bytes.set(q_bytes + kv_bytes)

    def observe_step(self, engine: LLMEngine, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        scheduler, pool = engine.scheduler, engine.pool
        self.running.set(len(scheduler.running))
        self.waiting.set(len(scheduler.waiting))
        self.kv_usage.set(1.0 - pool.num_free / pool.num_blocks)
        self._add_delta(self.preemptions, "preemptions", scheduler.num_preemptions)
        self._add_delta(self.prefix_queries, "prefix_queries", engine.kv.prefix_query_tokens)
        self._add_delta(self.prefix_hits, "prefix_hits", engine.kv.prefix_hit_tokens)
        for out in outputs:
            self._observe_output(out, now)

    def _add_delta(self, counter, key: str, total: int) -> None:
        if total > self._seen[key]:
            counter.inc(total - self._seen[key])
            self._seen[key] = total

    def _observe_output(self, out: RequestOutput, now: float) -> None:
        if out.new_token_ids:
            self.generation_tokens.inc(len(out.new_token_ids))
            last = self._last_token_time.get(out.request_id)
            if last is None:  # the first token
                self.prompt_tokens.inc(len(out.prompt_token_ids))
                self.ttft.observe(now - out.arrival_time)
                if out.first_scheduled_time is not None:
                    self.queue.observe(out.first_scheduled_time - out.arrival_time)
            else:
                self.itl.observe((now - last) / len(out.new_token_ids))
            self._last_token_time[out.request_id] = now
        if out.finished:
            self._last_token_time.pop(out.request_id, None)
            self.e2e.observe(now - out.arrival_time)
            self.request_finished(out.finish_reason)

    def request_finished(self, reason: str) -> None:
        self._success.labels(finished_reason=reason, **self._label).inc()

    def request_aborted(self, request_id: str) -> None:
        self._last_token_time.pop(request_id, None)
        self.request_finished("abort")

    def render(self) -> bytes:
        return generate_latest(self.registry)
