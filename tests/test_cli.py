"""The `mta-serve` command: help, one-line errors, conversions, and serving checkpoints as they are."""
from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from mta_serve.checkpoint import save_model
from mta_serve.config import ModelConfig
from mta_serve.model import build_model
from mta_serve.tokenizer import BytesTokenizer
from helpers import Server, greedy_reference, run_cli

def test_help_lists_serve_and_convert():
    out = run_cli("--help")
    assert out.returncode == 0 and "--model" in out.stdout and "convert" in out.stdout
    out = run_cli("convert", "hf", "--help")
    assert out.returncode == 0 and "--mta-config" in out.stdout


@pytest.mark.parametrize("args,needle", [
    (["--model", "/nonexistent/model"], "no such checkpoint directory, and not an embedded model (mta-toy, "),
    (["--model", "mta-tiny"], "not an embedded model (mta-toy, toy-baseline)"),
    (["convert", "reference", "/nonexistent", "/tmp/out"], "params.json is missing"),
    (["convert", "hf", "/nonexistent", "/tmp/out"], "nonexistent"),
    (["--shutdown-timeout", "-5"], "invalid --shutdown-timeout -5.0: allowed a number of seconds >= 0"),
    (["--shutdown-timeout", "nan"], "invalid --shutdown-timeout nan"),
    (["--host", "999.1.1.1"], "cannot listen on 999.1.1.1:8000"),
    # also the sampler's seed: accepted, it failed the engine at the first sampled request
    (["--seed", str(10**23)], f"invalid --seed {10**23}: allowed an integer in [0, 2^63)"),
    (["--seed", "-1"], "invalid --seed -1"),
    (["--device", "meta"], "unsupported --device 'meta': allowed cpu, cuda or cuda:N"),
])
def test_cli_errors_are_one_line(args, needle):
    out = run_cli(*args)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mta-serve: error:") and needle in lines[0], out.stderr


def test_a_port_in_use_is_a_one_line_error():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_cli("--port", str(port))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], out.stderr


def test_every_address_of_a_host_is_checked():
    """localhost (which may resolve to ::1 and 127.0.0.1) and "" (every interface) pass the bind check; a
    port taken on one of them does not."""
    import socket

    from mta_serve.cli import CLIError, _check_bindable

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        _check_bindable("localhost", 0)
        _check_bindable("", 0)
        taken.listen()
        with pytest.raises(CLIError, match=f"cannot listen on localhost:{port}"):
            _check_bindable("localhost", port)


def test_cli_bad_config_value(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dim: 32\nn_layers: 1\nn_heads: 4\nvocab_size: 300\nmta:\n  pad_key: middle\n")
    out = run_cli("--config", str(cfg))
    assert out.returncode == 1 and "mta.pad_key='middle'" in out.stderr and "Traceback" not in out.stderr
    # YAML reads `on:` as a boolean key: named among the unknown fields, not a traceback from sorting them
    cfg.write_text("dim: 32\nn_layers: 1\nn_heads: 4\nvocab_size: 300\non: true\nfoo: 3\n")
    out = run_cli("--config", str(cfg))
    assert out.returncode == 1 and "unknown config field" in out.stderr and "Traceback" not in out.stderr


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
