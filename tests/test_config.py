"""Config validation, YAML / config.json / params.json loading, paper parameter counts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mta_serve.checkpoint import expected_shapes
from mta_serve.config import ConfigError, ModelConfig, MTAConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The table in docs/MTA.md: (baseline, MTA) parameter counts at vocab 128256.
PAPER_PARAMS = {
    "300m": (388_277_248, 388_300_628),
    "550m": (651_818_240, 651_837_128),
    "830m": (876_553_728, 876_583_320),
    "1b": (1_495_894_016, 1_495_925_144),
}


def _count(cfg: ModelConfig) -> int:
    total = 0
    for shape in expected_shapes(cfg).values():
        total += int(torch.tensor(shape).prod().item()) if shape else 1
    return total


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    baseline, mta = PAPER_PARAMS[name]
    assert _count(ModelConfig.from_yaml(CONFIGS / f"{name}_baseline.yaml")) == baseline
    assert _count(ModelConfig.from_yaml(CONFIGS / f"{name}_mta.yaml")) == mta


def test_every_yaml_config_loads_and_round_trips(tmp_path):
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert len(paths) >= 9
    for path in paths:
        cfg = ModelConfig.from_yaml(path)
        cfg.save_json(tmp_path / "config.json")
        assert ModelConfig.from_json(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("field,value,needle", [
    ("pad_key", "middle", "mta.pad_key='middle'"),
    ("gate", "2d", "mta.gate='2d'"),
    ("pre_conv", [0, 3], "mta.pre_conv"),
    ("pre_conv", [3, 4], "odd key size"),  # pad_key both needs odd c_k
    ("mta_layers", "2,6", "mta.mta_layers"),
    ("wpsm", "yes", "mta.wpsm"),
])
def test_bad_mta_value_names_field_and_allowed(field, value, needle):
    with pytest.raises(ConfigError) as err:
        MTAConfig(**{field: value})
    assert needle in str(err.value) and "allowed" in str(err.value)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(n_kv_heads=3), "n_kv_heads=3"),
    (dict(dtype="float8"), "dtype='float8'"),
    (dict(mta=dict(mta_layers=[7])), "mta.mta_layers"),
    (dict(mta=dict(head_kernel_size=3)), "mta.head_kernel_size=3"),
    (dict(mta=dict(head_kernel_size=2, wposm=True)), "mta.wposm"),
    (dict(mta=dict(layer_norm_rescale=True)), "mta.layer_norm_rescale"),
    (dict(mta=dict(bogus=1)), "mta.bogus"),
    (dict(head_dim=7), "head_dim=7"),
])
def test_bad_model_value_names_field(kwargs, needle):
    base = dict(dim=32, n_layers=2, n_heads=4, vocab_size=10)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**base, **kwargs})
    assert needle in str(err.value)


def test_missing_required_field():
    with pytest.raises(ConfigError, match="missing config field vocab_size"):
        ModelConfig.from_dict(dict(dim=32, n_layers=2, n_heads=4))


def test_reference_params_json_maps_every_option():
    params = {
        "model": {"dim": 1536, "n_layers": 24, "n_heads": 16, "rope_theta": 100_000, "ffn_dim_multiplier": 1.0,
                  "multiple_of": 256, "weight_tying": True, "vocab_size": 128256, "dropout": 0.0,
                  "mta": {"use_mta": True, "pre_sm_linear_head": True, "query_kernel_size": 6,
                          "key_kernel_size": 11, "head_kernel_size": 16, "after_sm_query_kernel_size": 6,
                          "after_sm_key_kernel_size": 11, "init_method": "identity", "pad_key": "both",
                          "mta_layers": "2,6,10,14,18,22", "group_norm": True, "layer_norm_rescale": False,
                          "add_gating": True, "gate_1d": True}},
        "distributed": {"model_dtype": "bf16"},
        "data": {"tokenizer": {"name": "tiktoken", "path": "/nowhere/tokenizer.model"}},
    }
    cfg = ModelConfig.from_reference_params(params)
    assert cfg == ModelConfig.from_yaml(CONFIGS / "830m_mta.yaml").__class__.from_dict(
        {**ModelConfig.from_yaml(CONFIGS / "830m_mta.yaml").to_dict(), "max_seq_len": 1024})
    assert cfg.ffn_hidden_dim == 4096 and cfg.dtype == "bfloat16"


def test_reference_params_defaults_and_rejections():
    toy = {"model": {"dim": 256, "n_layers": 4, "n_heads": 2, "vocab_size": 32,
                     "mta": {"use_mta": True, "query_kernel_size": 2, "key_kernel_size": 9, "pad_key": "both"}}}
    cfg = ModelConfig.from_reference_params(toy)
    assert cfg.mta.pre_conv == (2, 9) and cfg.mta.mta_layers is None and cfg.mta.post_conv is None
    assert not cfg.tie_embeddings and cfg.dtype == "float32"
    # use_mta false keeps group norm and gate (they hang off the MTA args in the reference) but no conv
    plain = {"model": {**toy["model"], "mta": {"use_mta": False, "query_kernel_size": 2, "key_kernel_size": 9,
                                                "group_norm": True, "add_gating": True, "gate_1d": False}}}
    cfg = ModelConfig.from_reference_params(plain)
    assert cfg.mta.pre_conv is None and cfg.mta.group_norm and cfg.mta.gate == "full"
    with pytest.raises(ConfigError, match="curse_norm"):
        ModelConfig.from_reference_params({"model": {**toy["model"], "mta": {"curse_norm": True}}})
    with pytest.raises(ConfigError, match="model.vocab_size is missing"):
        ModelConfig.from_reference_params({"model": {"dim": 8, "n_heads": 2}})
    with pytest.raises(ConfigError, match="model.wat"):
        ModelConfig.from_reference_params({"model": {**toy["model"], "wat": 1}})
