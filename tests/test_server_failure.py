"""An engine failure mid-step: the requests in flight fail (500 / an error event then [DONE]), /health turns
503, and new requests are refused with 503 instead of hanging. The server runs in-process on 127.0.0.1 with a
fault injected into the model runner."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import uvicorn

from helpers import free_port
from mta_serve.async_engine import AsyncEngine
from mta_serve.config import CacheConfig, ModelConfig, SchedulerConfig
from mta_serve.engine import LLMEngine
from mta_serve.metrics import Metrics
from mta_serve.model import build_model
from mta_serve.server import ServedModel, build_app
from mta_serve.tokenizer import BytesTokenizer


def _faulty_server(fail_at_step: int):
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=258, max_seq_len=128)
    engine = LLMEngine(build_model(cfg, seed=0), BytesTokenizer(), CacheConfig(num_blocks=64), SchedulerConfig())
    execute, calls = engine.runner.execute, [0]

    def flaky(scheduled, *args):
        calls[0] += 1
        if calls[0] == fail_at_step:
            raise RuntimeError("injected device fault")
        return execute(scheduled, *args)

    engine.runner.execute = flaky
    app = build_app(ServedModel("m", AsyncEngine(engine, Metrics("m"))))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{server.config.port}"


def test_engine_failure_fails_in_flight_requests_and_health_reports_it():
    server, thread, url = _faulty_server(fail_at_step=4)
    body = {"model": "m", "prompt": "x", "max_tokens": 30, "ignore_eos": True}
    try:
        async def run():
            async with httpx.AsyncClient(timeout=30) as c:
                plain = c.post(url + "/v1/completions", json=body)
                streamed = c.post(url + "/v1/completions", json={**body, "stream": True})
                return await asyncio.gather(plain, streamed)

        plain, streamed = asyncio.run(run())
        assert plain.status_code == 500 and plain.json()["error"]["type"] == "server_error"
        assert "injected device fault" in plain.json()["error"]["message"]
        events = [e for e in streamed.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["error"]["code"] == 500
        assert httpx.get(url + "/health").status_code == 503
        again = httpx.post(url + "/v1/completions", json=body, timeout=10)
        assert again.status_code == 503 and again.json()["error"]["type"] == "server_error"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
