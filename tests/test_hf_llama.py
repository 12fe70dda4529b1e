"""HF Llama -> MTA conversion, checked against transformers' own LlamaForCausalLM (the independent truth)."""
from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never touch the network

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import mta_serve.hf_llama as hf_llama
from mta_serve.config import MTAConfig
from mta_serve.hf_llama import CheckpointError, convert_hf_llama, default_mta
from mta_serve.model import build_model

TOL = 1e-4


def _save_llama(path, tied: bool = False, n_layers: int = 2, dtype=torch.float32, max_shard_size=None, **extra):
    """A tiny seeded GQA Llama saved as safetensors. Weights are large enough that attention is far from
    uniform (a wrong RoPE layout must show), and the norms are random so a misplaced norm shows too."""
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=97, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=64, tie_word_embeddings=tied, **extra)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.5 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 1.5 / param.shape[-1] ** 0.5)
    model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return model


def _ids(n: int = 20) -> list[int]:
    return torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(7)).tolist()


def _hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _our_logits(path, ids, **convert_kwargs) -> torch.Tensor:
    cfg, state = convert_hf_llama(path, **convert_kwargs)
    model = build_model(cfg, seed=None)
    model.load_state_dict(state, strict=True)
    return model.score([ids])[0]


@pytest.mark.parametrize("tied,n_layers", [(False, 2), (True, 3)])
@pytest.mark.parametrize("mta", ["default", "plain", "left_pad_convs"])
def test_logits_match_transformers(tmp_path, tied, n_layers, mta):
    hf = _save_llama(tmp_path, tied=tied, n_layers=n_layers)
    mta_cfg = {"default": None, "plain": MTAConfig(),
               "left_pad_convs": MTAConfig(pre_conv=(2, 3), post_conv=(3, 4), pad_key="left", wposm=True)}[mta]
    ids = _ids()
    expected = _hf_logits(hf, ids)
    ours = _our_logits(tmp_path, ids, mta=mta_cfg)
    assert ours.shape == expected.shape
    assert (ours - expected).abs().max().item() < TOL
    assert expected.std().item() > 0.5  # the comparison is not between near-constant logits


def test_default_mta_config_and_model_config(tmp_path):
    _save_llama(tmp_path, tied=True, n_layers=3)
    cfg, state = convert_hf_llama(tmp_path)
    assert cfg.mta == default_mta(3, 4)
    assert cfg.mta.mta_layers == (2,) and cfg.mta.pre_conv == (6, 11) and cfg.mta.head_kernel_size == 4
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (64, 3, 4, 2, 16)
    assert (cfg.ffn_hidden_dim, cfg.vocab_size, cfg.max_seq_len, cfg.tie_embeddings) == (128, 97, 64, True)
    assert cfg.rope_theta == 10000.0 and cfg.norm_eps == 1e-5 and cfg.dtype == "float32"
    assert "layers.2.attention.mta_kernel" in state and "layers.1.attention.mta_kernel" not in state
    assert torch.equal(state["layers.0.attention.wpsm.weight"], torch.eye(4))
    assert default_mta(24, 16).mta_layers == (2, 6, 10, 14, 18, 22)
    assert default_mta(2, 4).mta_layers is None  # no layer 2: convs on every layer, documented choice


def test_without_rope_permutation_logits_differ(tmp_path, monkeypatch):
    # Sensitivity check: the test model must be able to tell the two RoPE layouts apart.
    hf = _save_llama(tmp_path)
    monkeypatch.setattr(hf_llama, "half_split_to_interleaved", lambda w, n, d: w)
    ids = _ids()
    assert (_our_logits(tmp_path, ids, mta=MTAConfig()) - _hf_logits(hf, ids)).abs().max().item() > 1e-2


def test_sharded_checkpoint(tmp_path):
    hf = _save_llama(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    ids = _ids()
    assert (_our_logits(tmp_path, ids) - _hf_logits(hf, ids)).abs().max().item() < TOL


def test_dtype_from_source_and_override(tmp_path):
    _save_llama(tmp_path, dtype=torch.bfloat16)
    cfg, state = convert_hf_llama(tmp_path)
    assert cfg.dtype == "bfloat16" and all(t.dtype == torch.bfloat16 for t in state.values())
    cfg, state = convert_hf_llama(tmp_path, dtype="float32")
    assert cfg.dtype == "float32" and all(t.dtype == torch.float32 for t in state.values())
    with pytest.raises(CheckpointError, match="dtype"):
        convert_hf_llama(tmp_path, dtype="float64")


def _edit_config(path, **changes):
    cfg_path = path / "config.json"
    data = json.loads(cfg_path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    cfg_path.write_text(json.dumps(data))


def _edit_tensors(path, drop=(), add=None):
    tensors = load_file(path / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_rope_scaling_rejected(tmp_path):
    # transformers >= 5 stores a scaled RoPE under rope_parameters; older versions under rope_scaling.
    _save_llama(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(CheckpointError, match="rope_scaling"):
        convert_hf_llama(tmp_path)
    _edit_config(tmp_path, rope_parameters=..., rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(CheckpointError, match="rope_scaling"):
        convert_hf_llama(tmp_path)
    _edit_config(tmp_path, rope_scaling=None)  # legacy layout, plain RoPE: accepted
    assert convert_hf_llama(tmp_path)[0].rope_theta == 10000.0


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"),
                                         ("sliding_window", 16), ("model_type", "qwen2")])
def test_unsupported_config_fields_rejected(tmp_path, field, value):
    _save_llama(tmp_path)
    _edit_config(tmp_path, **{field: value})
    with pytest.raises(CheckpointError, match=field):
        convert_hf_llama(tmp_path)


@pytest.mark.parametrize("mta", [MTAConfig(group_norm=True), MTAConfig(gate="full")])
def test_non_identity_mta_rejected(tmp_path, mta):
    _save_llama(tmp_path)
    with pytest.raises(CheckpointError, match="group_norm|gate"):
        convert_hf_llama(tmp_path, mta=mta)


def test_missing_tensor_named(tmp_path):
    _save_llama(tmp_path)
    _edit_tensors(tmp_path, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(CheckpointError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_hf_llama(tmp_path)


def test_missing_lm_head_named_when_untied(tmp_path):
    _save_llama(tmp_path, tied=False)
    _edit_tensors(tmp_path, drop=["lm_head.weight"])
    with pytest.raises(CheckpointError, match=r"missing.*lm_head\.weight"):
        convert_hf_llama(tmp_path)


def test_unexpected_tensor_named_and_inv_freq_ignored(tmp_path):
    _save_llama(tmp_path)
    _edit_tensors(tmp_path, add={"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)})
    convert_hf_llama(tmp_path)  # a known non-weight buffer: ignored explicitly
    _edit_tensors(tmp_path, add={"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)})
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.layers\.0\.self_attn\.q_proj\.bias"):
        convert_hf_llama(tmp_path)


def test_tied_lm_head_must_equal_embedding(tmp_path):
    _save_llama(tmp_path, tied=True)
    embed = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    _edit_tensors(tmp_path, add={"lm_head.weight": embed.clone()})
    convert_hf_llama(tmp_path)  # an explicit copy of the embedding is fine
    _edit_tensors(tmp_path, add={"lm_head.weight": embed + 1.0})
    with pytest.raises(CheckpointError, match="lm_head"):
        convert_hf_llama(tmp_path)


def test_wrong_shape_named(tmp_path):
    _save_llama(tmp_path)
    _edit_config(tmp_path, intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"mlp\.(gate|up|down)_proj\.weight has shape"):
        convert_hf_llama(tmp_path)


def test_no_safetensors_rejected(tmp_path):
    _save_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not supported"):
        convert_hf_llama(tmp_path)


def _write_hf_tokenizer(path) -> None:
    """A word-level tokenizer.json over ids 0..96 (the tiny Llama's vocab), BOS = 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(97)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2"}))


def test_cli_convert_hf_then_serve_exactly(tmp_path):
    """`mta-serve convert hf` writes a checkpoint that `mta-serve --model` serves as is, with HF's logits."""
    import subprocess
    import sys

    from mta_serve.checkpoint import load_checkpoint

    hf = _save_llama(tmp_path / "src")
    _write_hf_tokenizer(tmp_path / "src")
    out = subprocess.run([sys.executable, "-m", "mta_serve.cli", "convert", "hf", str(tmp_path / "src"),
                          str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    model, tokenizer = load_checkpoint(tmp_path / "out")
    ids = tokenizer.encode("w5 w9 w13 w40 w77 w3", add_bos=True)
    assert ids == [1, 5, 9, 13, 40, 77, 3]
    assert (model.score([ids])[0] - _hf_logits(hf, ids)).abs().max().item() < TOL
    assert model.cfg.mta.pre_conv == (6, 11) and model.cfg.mta.wpsm


def test_cli_mta_config_is_checked_against_the_source_model(tmp_path):
    """--mta-config's layer ids and head kernel are checked against the converted model's layers and heads
    (3 and 4 here), not a placeholder model's; one the source cannot take is a one-line error naming it. An
    OUT_DIR that is SRC_DIR is refused before anything is written."""
    import subprocess
    import sys

    from mta_serve.checkpoint import load_checkpoint

    _save_llama(tmp_path / "src", n_layers=3)
    _write_hf_tokenizer(tmp_path / "src")

    def convert(mta_yaml: str, out: str = "out"):
        (tmp_path / "mta.yaml").write_text(mta_yaml)
        return subprocess.run([sys.executable, "-m", "mta_serve.cli", "convert", "hf", str(tmp_path / "src"),
                               str(tmp_path / out), "--mta-config", str(tmp_path / "mta.yaml")],
                              capture_output=True, text=True, timeout=120)

    done = convert("mta:\n  pre_conv: [2, 3]\n  mta_layers: [2]\n  wpsm: true\n  head_kernel_size: 2\n")
    assert done.returncode == 0, done.stderr
    model, _ = load_checkpoint(tmp_path / "out")
    assert model.cfg.mta.mta_layers == (2,) and model.cfg.mta.head_kernel_size == 2
    refused = convert("mta_layers: [3]\n")
    assert refused.returncode == 1 and "mta.mta_layers=[3]" in refused.stderr and "n_layers=3" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    before = sorted(p.name for p in (tmp_path / "src").iterdir())
    same = convert("mta_layers: [0]\n", out="src")
    assert same.returncode == 1 and "is SRC_DIR" in same.stderr
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == before
