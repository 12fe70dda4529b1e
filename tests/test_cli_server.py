"""The `mta-serve` command and the HTTP server, run for real on loopback."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mta_serve.checkpoint import save_model
from mta_serve.config import ModelConfig
from mta_serve.model import build_model
from mta_serve.tokenizer import BytesTokenizer
from helpers import greedy_reference

CLI = [sys.executable, "-m", "mta_serve.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_serve_and_convert():
    out = run_cli("--help")
    assert out.returncode == 0 and "--model" in out.stdout and "convert" in out.stdout
    out = run_cli("convert", "hf", "--help")
    assert out.returncode == 0 and "--mta-config" in out.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model"], "does not exist"),
    (["convert", "reference", "/nonexistent", "/tmp/out"], "params.json is missing"),
    (["convert", "hf", "/nonexistent", "/tmp/out"], "nonexistent"),
])
def test_cli_errors_are_one_line(args, needle):
    out = run_cli(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mta-serve: error:") and needle in lines[0], out.stderr


def test_cli_bad_config_value(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dim: 32\nn_layers: 1\nn_heads: 4\nvocab_size: 300\nmta:\n  pad_key: middle\n")
    out = run_cli("--config", str(cfg))
    assert out.returncode == 1 and "mta.pad_key='middle'" in out.stderr and "Traceback" not in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mta-serve` in a subprocess on a loopback port; stopped when the test ends."""

    def __init__(self, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*CLI, "--port", str(self.port), "--log-level", "warning", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy in 90 s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def default_server():
    server = Server()  # no model arguments: the embedded default
    yield server
    server.stop()


def test_default_server_models_and_greedy_completion(default_server):
    models = httpx.get(default_server.url + "/v1/models").json()
    name = models["data"][0]["id"]
    assert name == "mta-tiny-random"
    body = {"model": name, "prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
            "some_unknown_client_field": 1}
    first = httpx.post(default_server.url + "/v1/completions", json=body, timeout=60)
    assert first.status_code == 200, first.text
    choice = first.json()["choices"][0]
    assert first.json()["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}
    assert choice["finish_reason"] == "length"
    second = httpx.post(default_server.url + "/v1/completions", json=body, timeout=60).json()
    assert second["choices"][0]["text"] == choice["text"]  # greedy is deterministic


def test_openai_client(default_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused")
    out = client.completions.create(model="mta-tiny-random", prompt=[256, 65, 66], max_tokens=3,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)


@pytest.mark.parametrize("body,status,param", [
    ({"model": "mta-tiny-random", "prompt": "", "max_tokens": 1}, 400, "prompt"),
    ({"model": "mta-tiny-random", "prompt": [1, 999], "max_tokens": 1}, 400, "prompt"),
    ({"model": "mta-tiny-random", "prompt": "a", "max_tokens": 100000}, 400, "prompt"),
    ({"model": "mta-tiny-random", "prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "mta-tiny-random", "prompt": "a", "stream": True}, 400, "stream"),
    ({"model": "mta-tiny-random", "prompt": "a", "suffix": "z"}, 400, "suffix"),
    ({"model": "mta-tiny-random", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"model": "mta-tiny-random", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"model": "mta-tiny-random", "prompt": "a", "seed": 2**70}, 400, "seed"),
    ({"model": "mta-tiny-random", "prompt": [True, False]}, 400, "prompt"),
    ({"model": "mta-tiny-random", "prompt": [1.0, 2.0]}, 400, "prompt"),
    ({"model": "mta-tiny-random", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "mta-tiny-random", "prompt": "a", "max_tokens": "3"}, 400, "max_tokens"),
    ({"model": "mta-tiny-random", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "mta-tiny-random", "prompt": "a", "n": 2}, 400, "n"),
    ({"model": "nope", "prompt": "a"}, 404, "model"),
    ({"prompt": "a"}, 400, "model"),
])
def test_errors_are_openai_json(default_server, body, status, param):
    resp = httpx.post(default_server.url + "/v1/completions", json=body, timeout=30)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]


def test_nan_and_unknown_routes_are_openai_json(default_server):
    resp = httpx.post(default_server.url + "/v1/completions", headers={"content-type": "application/json"},
                      content=b'{"model": "mta-tiny-random", "prompt": "a", "temperature": NaN}')
    assert resp.status_code == 400 and "NaN" in resp.json()["error"]["message"]
    resp = httpx.get(default_server.url + "/v1/nothing")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == 404
    resp = httpx.get(default_server.url + "/v1/completions")
    assert resp.status_code == 405 and resp.json()["error"]["type"] == "invalid_request_error"


def test_concurrent_requests_are_batched_and_exact(default_server):
    """Eight simultaneous greedy requests of different lengths each get what they get alone."""
    import asyncio

    prompts = ["a", "hello there", "MTA", "x" * 40, "0123456789", "Zz", "the quick brown fox", "."]

    async def one(client, prompt):
        body = {"model": "mta-tiny-random", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True}
        resp = await client.post(default_server.url + "/v1/completions", json=body, timeout=120)
        return resp.json()["choices"][0]["text"]

    async def together():
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    async def alone():
        async with httpx.AsyncClient() as client:
            return [await one(client, p) for p in prompts]

    assert asyncio.run(together()) == asyncio.run(alone())


def test_malformed_json_is_400(default_server):
    resp = httpx.post(default_server.url + "/v1/completions", content=b"{nope",
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


def test_context_length_message_states_numbers(default_server):
    resp = httpx.post(default_server.url + "/v1/completions",
                      json={"model": "mta-tiny-random", "prompt": "abc", "max_tokens": 600})
    assert "prompt (4 tokens) + max_tokens (600) = 604 exceeds the context length 512" in resp.text


def test_serves_a_native_checkpoint_exactly(tmp_path):
    cfg = ModelConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    model = build_model(cfg, seed=42, mta_init="random")
    save_model(tmp_path / "my-model", model, BytesTokenizer())
    expected, _ = greedy_reference(model, BytesTokenizer().encode("The cat"), 6)
    server = Server("--model", str(tmp_path / "my-model"))
    try:
        resp = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": "my-model", "prompt": "The cat", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
        assert resp.json()["choices"][0]["text"] == BytesTokenizer().decode(expected)
    finally:
        server.stop()


def test_seeded_sampling_is_reproducible(default_server):
    body = {"model": "mta-tiny-random", "prompt": "abc", "max_tokens": 8, "temperature": 1.0, "seed": 123,
            "ignore_eos": True}
    texts = {httpx.post(default_server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
             for _ in range(2)}
    assert len(texts) == 1


def test_cli_convert_reference_then_serve(tmp_path):
    """A reference checkpoint converted by the CLI is served as is and generates what the source model does."""
    import json as _json

    import torch

    params = {"model": {"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 258, "weight_tying": True,
                        "max_seqlen": 64, "mta": {"use_mta": True, "query_kernel_size": 2, "key_kernel_size": 3}},
              "distributed": {"model_dtype": "fp32"}, "data": {"tokenizer": {"name": "bytes"}}}
    cfg = ModelConfig.from_reference_params(params)
    source = build_model(cfg, seed=5, mta_init="random")
    sd = dict(source.state_dict())
    sd["output.tied_module.weight"] = sd["tok_embeddings.weight"]
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "params.json").write_text(_json.dumps(params))
    torch.save({"model": sd}, tmp_path / "ref" / "consolidated.pth")
    out = run_cli("convert", "reference", str(tmp_path / "ref"), str(tmp_path / "toy-ref"))
    assert out.returncode == 0, out.stderr
    prompt = BytesTokenizer().encode("abc")
    expected, _ = greedy_reference(source, prompt, 5)
    server = Server("--model", str(tmp_path / "toy-ref"))
    try:
        resp = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": "toy-ref", "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert resp.json()["choices"][0]["text"] == BytesTokenizer().decode(expected)
    finally:
        server.stop()
