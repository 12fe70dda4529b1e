"""Runs an LLMEngine on a background thread for asyncio callers (the HTTP server).

The thread owns the engine: callers only enqueue commands (add, abort) and read their request's outputs from
an asyncio queue. A caller that stops listening (client disconnect, cancellation) aborts its request, so
its blocks are freed at once. If a step raises, every pending request gets the error and `healthy` turns
false; the server then answers /health with 503.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import uuid

from .engine import LLMEngine, RequestOutput
from .metrics import Metrics
from .sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


class ShuttingDownError(EngineDeadError):
    pass


class RequestStream:
    """One request's outputs, as an async iterator. Closing it before the request finished aborts it; the
    owner must close it (also when it never iterated), which is what frees the request's blocks."""

    def __init__(self, engine: "AsyncEngine", request_id: str):
        self.engine, self.request_id = engine, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self._finish()
            raise item
        if item.finished:
            self._finish()
        return item

    def close(self) -> None:
        if not self.done:
            self._finish()
            self.engine._commands.put(("abort", self.request_id))

    def _finish(self) -> None:
        self.done = True
        self.engine._streams.pop(self.request_id, None)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: Metrics | None = None, max_queued: int | None = None):
        self.engine = engine
        self.metrics = metrics
        self.max_queued = max_queued  # requests accepted but not yet running; None = unbounded
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.num_reserved = 0  # admission slots the server holds while it parses (event-loop thread only)
        self._error: BaseException | None = None
        self._stopping = False
        if metrics is not None:
            metrics.set_cache_size(engine)
        self._thread = threading.Thread(target=self._run, name="mta-serve-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        """Requests with a listener (accepted and not finished)."""
        return len(self._streams)

    def queue_full(self) -> bool:
        """Whether a new request must be turned away: checked before any parsing or tokenization."""
        return self.max_queued is not None and self._num_waiting() >= self.max_queued

    def queue_room(self) -> int | None:
        """How many more requests the queue admits (None: unbounded)."""
        return None if self.max_queued is None else self.max_queued - self._num_waiting()

    def _num_waiting(self) -> int:
        # Requests admitted by the server but not yet submitted, submitted but not yet seen by the engine
        # thread, and waiting in the scheduler.
        return self.num_reserved + self._commands.qsize() + len(self.engine.scheduler.waiting)

    def generate(self, prompt: str | list[int], params: SamplingParams) -> "RequestStream":
        """Submit a request now; iterate the result for its outputs, step by step, until it finishes.
        `close()` the stream when done listening: it aborts the request if it has not finished."""
        if not self.healthy:
            raise EngineDeadError(f"the engine loop has stopped: {self._error!r}")
        request_id = uuid.uuid4().hex
        stream = RequestStream(self, request_id)
        self._streams[request_id] = (asyncio.get_running_loop(), stream.queue)
        self._commands.put(("add", request_id, prompt, params))
        return stream

    def abort_all(self) -> None:
        """Abort every in-flight request (at the end of a shutdown's grace period). Safe from any thread."""
        for request_id in list(self._streams):
            self._commands.put(("abort", request_id))
            self._deliver(request_id, ShuttingDownError("the server is shutting down"))

    def stop(self) -> None:
        self._stopping = True
        self._commands.put(("stop",))
        self._thread.join(timeout=10)

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain(block=not self.engine.has_unfinished_requests())
                outputs = self.engine.step()
                if self.metrics is not None:
                    self.metrics.observe_step(self.engine, outputs)
                for out in outputs:
                    self._deliver(out.request_id, out)
        except BaseException as exc:  # the step failed: fail everyone pending, mark unhealthy
            self._error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(f"the engine loop failed: {exc!r}"))

    def _drain(self, block: bool) -> None:
        """Apply queued commands; wait for one when the engine has nothing to do."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return
            block = False
            if command[0] == "add":
                _, request_id, prompt, params = command
                try:
                    self.engine.add_request(request_id, prompt, params)
                except ValueError as exc:  # RequestError, tokenizer errors: the caller's fault
                    self._deliver(request_id, exc)
            elif command[0] == "abort":
                if self.engine.abort_request(command[1]) and self.metrics is not None:
                    self.metrics.request_aborted(command[1])
            else:
                return
