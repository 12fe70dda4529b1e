"""Native checkpoints and import from the reference implementation's layouts."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mta_serve.checkpoint import CheckpointError, import_reference, load_checkpoint, save_model, save_native
from mta_serve.config import ModelConfig
from mta_serve.model import build_model
from mta_serve.tokenizer import BytesTokenizer

TOKENS = [[256, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100], [256, 1, 2]]


def _tiny_cfg(**mta) -> ModelConfig:
    mta = mta or dict(pre_conv=[3, 5], post_conv=[2, 3], mta_layers=[1], wpsm=True, head_kernel_size=2,
                      group_norm=True, gate="1d")
    return ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=258, rope_theta=1e5, mta=mta)


def _same_logits(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.score(TOKENS), b.score(TOKENS)))


def test_native_round_trip(tmp_path):
    model = build_model(_tiny_cfg(), seed=3, mta_init="random")
    save_model(tmp_path / "ckpt", model, BytesTokenizer())
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} >= {"config.json", "model.safetensors",
                                                                "tokenizer_config.json"}
    loaded, tokenizer = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg and tokenizer.kind == "bytes"
    assert _same_logits(model, loaded)


def test_native_keeps_dtype(tmp_path):
    cfg = ModelConfig.from_dict({**_tiny_cfg().to_dict(), "dtype": "bfloat16"})
    save_model(tmp_path, build_model(cfg, seed=0), BytesTokenizer())
    assert {t.dtype for t in load_file(str(tmp_path / "model.safetensors")).values()} == {torch.bfloat16}
    model, _ = load_checkpoint(tmp_path)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


@pytest.fixture
def saved(tmp_path):
    model = build_model(_tiny_cfg(), seed=3, mta_init="random")
    save_model(tmp_path, model, BytesTokenizer())
    return tmp_path, load_file(str(tmp_path / "model.safetensors"))


def test_missing_tensor_is_named(saved):
    path, sd = saved
    del sd["layers.1.attention.mta_kernel"]
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): layers.1.attention.mta_kernel"):
        load_checkpoint(path)


def test_unexpected_tensor_is_named(saved):
    path, sd = saved
    sd["layers.0.attention.extra"] = torch.zeros(2)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): layers.0.attention.extra"):
        load_checkpoint(path)


def test_misshaped_tensor_is_named(saved):
    path, sd = saved
    sd["layers.0.attention.wpsm.weight"] = torch.zeros(3, 3)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers.0.attention.wpsm.weight has shape \[3, 3\], expected \[4, 4\]"):
        load_checkpoint(path)


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**_tiny_cfg().to_dict(), "n_heads": 3}))
    with pytest.raises(CheckpointError, match="n_heads|dim"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_tiny_cfg().to_dict()))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(tmp_path)


# ---- reference layouts --------------------------------------------------------------------------------

def _reference_params(post_linear: bool) -> dict:
    """A params.json as the reference trainer writes it (its own field names, written out by hand)."""
    mta = {"use_mta": True, "query_kernel_size": 3, "key_kernel_size": 5, "after_sm_query_kernel_size": 2,
           "after_sm_key_kernel_size": 3, "pad_key": "both", "mta_layers": "1", "pre_sm_linear_head": True,
           "group_norm": True, "layer_norm_rescale": True, "add_gating": True, "gate_1d": True,
           "init_method": "identity"}
    mta.update({"post_sm_linear_head": True} if post_linear else {"head_kernel_size": 2})
    model = {"dim": 32, "n_layers": 2, "n_heads": 4, "rope_theta": 100_000, "ffn_dim_multiplier": 1.0,
             "multiple_of": 256, "weight_tying": True, "vocab_size": 258, "max_seqlen": 64, "dropout": 0.0,
             "mta": mta, "triton": post_linear}
    return {"model": model, "distributed": {"model_dtype": "fp32"},
            "data": {"tokenizer": {"name": "bytes", "path": None}}, "steps": 10}


def _write_reference(path, params: dict, state_dict: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    torch.save({"model": state_dict}, path / "consolidated.pth")


def _to_triton_layout(sd: dict, conv_layers: list[int]) -> dict:
    out = dict(sd)
    for i in conv_layers:
        p = f"layers.{i}.attention."
        out[p + "triton_mta.mta_conv_triton.weight"] = out.pop(p + "mta_kernel").squeeze(1)
        out[p + "triton_mta.mta_conv_after_sm_triton.weight"] = out.pop(p + "mta_kernel_after_sm").squeeze(1)
        out[p + "triton_mta.wpsm_triton.weight"] = out.pop(p + "wpsm.weight")
        out[p + "triton_mta.wposm_triton.weight"] = out.pop(p + "wposm.weight")
    return out


@pytest.mark.parametrize("layout", ["plain", "triton"])
def test_reference_import_gives_identical_logits(tmp_path, layout):
    params = _reference_params(post_linear=layout == "triton")
    cfg = ModelConfig.from_reference_params(params)
    assert cfg.mta.layer_norm_rescale and cfg.mta.mta_layers == (1,)
    native = build_model(cfg, seed=9, mta_init="random")
    sd = {k: v.clone() for k, v in native.state_dict().items()}
    sd["output.tied_module.weight"] = sd["tok_embeddings.weight"]
    if layout == "triton":
        sd = _to_triton_layout(sd, [1])
    _write_reference(tmp_path / "ref", params, sd)
    cfg2, state_dict, tokenizer = import_reference(tmp_path / "ref")
    save_native(tmp_path / "native", cfg2, state_dict, tokenizer)
    loaded, tok = load_checkpoint(tmp_path / "native")
    assert tok.kind == "bytes" and loaded.cfg == cfg
    assert _same_logits(native, loaded)


def test_reference_import_errors(tmp_path):
    params = _reference_params(post_linear=False)
    sd = build_model(ModelConfig.from_reference_params(params), seed=1).state_dict()
    with pytest.raises(CheckpointError, match="params.json is missing"):
        import_reference(tmp_path)
    bad_alias = {**sd, "output.tied_module.weight": torch.zeros_like(sd["tok_embeddings.weight"])}
    _write_reference(tmp_path / "a", params, bad_alias)
    with pytest.raises(CheckpointError, match="differs from tok_embeddings"):
        import_reference(tmp_path / "a")
    unknown = {**sd, "layers.1.attention.triton_mta.mystery.weight": torch.zeros(1)}
    _write_reference(tmp_path / "b", params, unknown)
    with pytest.raises(CheckpointError, match="triton_mta.mystery.weight"):
        import_reference(tmp_path / "b")
    tiktoken_params = {**params, "data": {"tokenizer": {"name": "tiktoken", "path": "/train/tokenizer.model"}}}
    _write_reference(tmp_path / "c", tiktoken_params, sd)
    with pytest.raises(ValueError, match="--tokenizer"):
        import_reference(tmp_path / "c")


def test_reference_dtype_kept_unless_overridden(tmp_path):
    params = _reference_params(post_linear=False)
    params["distributed"]["model_dtype"] = "bf16"
    cfg = ModelConfig.from_reference_params(params)
    sd = {k: v.to(torch.bfloat16) for k, v in build_model(cfg, seed=1).state_dict().items()}
    _write_reference(tmp_path, params, sd)
    assert import_reference(tmp_path)[0].dtype == "bfloat16"
    assert import_reference(tmp_path, dtype="float32")[0].dtype == "float32"
