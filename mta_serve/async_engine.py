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
from collections.abc import AsyncIterator

from .engine import LLMEngine, RequestOutput
from .sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mta-serve-engine", daemon=True)
        self._thread.start()

    @property
    def healthy(self) -> bool:
        return self._error is None and self._thread.is_alive()

    async def generate(self, prompt: str | list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request, step by step, until it finishes. Raises RequestError if it is rejected."""
        if not self.healthy:
            raise EngineDeadError(f"the engine loop has stopped: {self._error!r}")
        request_id = uuid.uuid4().hex
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        self._commands.put(("add", request_id, prompt, params))
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                self._drain(block)
                for out in self.engine.step():
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
            else:
                self.engine.abort_request(command[1])
