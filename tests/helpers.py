"""Test helpers: the dense ground truth, running greedy requests through an engine, a real server process."""
from __future__ import annotations

import torch

from mta_serve.sampling_params import SamplingParams


@torch.no_grad()
def greedy_reference(model, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and the logprob of each, every step recomputing the dense model over the sequence."""
    tokens, logprobs = [], []
    for _ in range(max_tokens):
        logits = model.score([prompt + tokens])[0][-1]
        token = int(torch.argmax(logits))
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        tokens.append(token)
    return tokens, logprobs


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)


def run_all(engine, prompts, max_tokens, on_step=None) -> dict:
    """Greedy requests r0, r1, ... (max_tokens: one count, or one per prompt) stepped to the end -> their
    final outputs by id; fails if a request finishes twice or the engine stops making progress."""
    counts = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    for i, (p, n) in enumerate(zip(prompts, counts)):
        engine.add_request(f"r{i}", p, greedy(n))
    done, step = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done, "a request finished twice"
                done[out.request_id] = out
        step += 1
        if on_step:
            on_step(engine, step)
        assert step < 2000, "the engine made no progress"
    return done


# ---- a real `mta-serve` process on a loopback port ------------------------------------------------------

import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import httpx  # noqa: E402

CLI = [sys.executable, "-m", "mta_serve.cli"]
TINY_CONFIG = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
# The seeded random tiny model with the byte tokenizer: what most server tests run against.
TINY_RANDOM = ("--config", TINY_CONFIG, "--served-model-name", "mta-tiny-random")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mta-serve ARGS` in a subprocess on a free loopback port, healthy on return; `stop()` ends it."""

    def __init__(self, *args: str, timeout: float = 90):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen([*CLI, "--port", str(self.port), "--log-level", "warning", *args],
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {timeout} s")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
