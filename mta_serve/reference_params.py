"""Translate the reference implementation's `params.json` (its whole training config) into ModelConfig fields.

Only `model`, `distributed.model_dtype` and `data.tokenizer` matter for inference. Options that change the
computed function but are not part of the served spec are rejected rather than ignored.
"""
from __future__ import annotations

from typing import Any

from .config import _REFERENCE_DTYPES, ConfigError, MTAConfig

# Training-only or layout-only options of the reference model arguments.
_INFERENCE_IRRELEVANT = {"dropout", "init_base_std", "init_std_factor", "cache_attention_maps", "seed", "triton"}
_MODEL_KEYS = {"dim", "n_layers", "head_dim", "n_heads", "n_kv_heads", "ffn_dim_multiplier", "multiple_of",
               "norm_eps", "rope_theta", "max_seqlen", "vocab_size", "weight_tying", "mta", "sliding_window"}
_MTA_KEYS = {"use_mta", "query_kernel_size", "key_kernel_size", "pad_key", "mta_layers",
             "after_sm_query_kernel_size", "after_sm_key_kernel_size", "init_method", "head_kernel_size",
             "group_norm", "layer_norm_rescale", "curse_norm", "pre_sm_linear_head", "post_sm_linear_head",
             "add_gating", "gate_1d"}


def model_config_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    model = params.get("model")
    if not isinstance(model, dict):
        raise ConfigError("params.json has no 'model' mapping: is this a reference checkpoint's params.json?")
    unknown = sorted(set(model) - _MODEL_KEYS - _INFERENCE_IRRELEVANT)
    if unknown:
        raise ConfigError(f"params.json: unsupported model option model.{unknown[0]}; known: {sorted(_MODEL_KEYS)}")
    if model.get("sliding_window") is not None:
        raise ConfigError(f"params.json: model.sliding_window={model['sliding_window']!r} is not supported: allowed null")
    if "vocab_size" not in model:
        raise ConfigError("params.json: model.vocab_size is missing")
    dim = model.get("dim", 512)
    head_dim = model.get("head_dim")
    n_heads = model.get("n_heads") or dim // head_dim
    if model.get("triton") and (model.get("mta") or {}).get("use_mta"):
        _check_triton(model["mta"])
    for name in ("dim", "n_layers", "multiple_of"):
        if name in model and not (isinstance(model[name], int) and model[name] > 0):
            raise ConfigError(f"params.json: invalid model.{name}={model[name]!r}: allowed a positive integer")
    dtype_name = (params.get("distributed") or {}).get("model_dtype", "fp32")
    if not isinstance(dtype_name, str) or dtype_name not in _REFERENCE_DTYPES:
        raise ConfigError(f"invalid distributed.model_dtype={dtype_name!r}: allowed {sorted(_REFERENCE_DTYPES)}")
    return dict(
        dim=dim, n_layers=model.get("n_layers", 8), n_heads=n_heads, vocab_size=model["vocab_size"],
        n_kv_heads=model.get("n_kv_heads"), head_dim=head_dim or dim // n_heads,
        ffn_hidden_dim=_ffn_hidden(dim, model.get("ffn_dim_multiplier"), model.get("multiple_of", 256)),
        norm_eps=model.get("norm_eps", 1e-5), rope_theta=float(model.get("rope_theta", 10000.0)),
        tie_embeddings=model.get("weight_tying", False), max_seq_len=model.get("max_seqlen", 1024),
        dtype=_REFERENCE_DTYPES[dtype_name], mta=mta_config(model.get("mta") or {}),
    )


def _check_triton(mta: dict[str, Any]) -> None:
    # The reference's Triton MTA layers always pad keys on both sides and mix heads after the softmax with a
    # linear layer; configs that say otherwise compute something else there than on their other layers.
    if mta.get("pad_key", "both") != "both":
        raise ConfigError(f"params.json: model.triton=true with model.mta.pad_key={mta['pad_key']!r} is not "
                          "supported: the Triton layers always pad 'both'")
    if mta.get("head_kernel_size") is not None:
        raise ConfigError("params.json: model.triton=true with model.mta.head_kernel_size is not supported: the "
                          "Triton layers use a linear post-softmax head mixing instead")


def _ffn_hidden(dim: int, multiplier: float | None, multiple_of: int) -> int:
    # The reference FeedForward starts from 4*dim, takes 2/3, applies the multiplier, rounds up.
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def mta_config(mta: dict[str, Any]) -> MTAConfig:
    unknown = sorted(set(mta) - _MTA_KEYS)
    if unknown:
        raise ConfigError(f"params.json: unsupported MTA option model.mta.{unknown[0]}; known: {sorted(_MTA_KEYS)}")
    if mta.get("curse_norm", False):
        raise ConfigError("params.json: model.mta.curse_norm=true is not supported: allowed false")
    group_norm = bool(mta.get("group_norm", False))
    gate = "none"
    if mta.get("add_gating", False):
        gate = "1d" if mta.get("gate_1d", True) else "full"
    # Group norm and gate exist on every layer even when use_mta is false (they hang off the MTA args).
    kwargs: dict[str, Any] = dict(group_norm=group_norm, gate=gate,
                                  layer_norm_rescale=group_norm and bool(mta.get("layer_norm_rescale", False)))
    if not mta.get("use_mta", False):
        return MTAConfig(**kwargs)
    return MTAConfig(
        pre_conv=_pair(mta.get("query_kernel_size", 1), mta.get("key_kernel_size", 1)),
        post_conv=_pair(mta.get("after_sm_query_kernel_size"), mta.get("after_sm_key_kernel_size")),
        pad_key=mta.get("pad_key", "both"), mta_layers=_layers(mta.get("mta_layers")),
        wpsm=bool(mta.get("pre_sm_linear_head", False)), head_kernel_size=mta.get("head_kernel_size"),
        wposm=bool(mta.get("post_sm_linear_head", False)), **kwargs,
    )


def _pair(c_q: int | None, c_k: int | None) -> list[int] | None:
    # The reference builds a conv only when both sizes are set.
    return None if c_q is None or c_k is None else [c_q, c_k]


def _layers(value: Any) -> list[int] | None:
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, int):
        return [value]
    try:
        return [int(part) for part in str(value).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"invalid model.mta.mta_layers={value!r}: allowed a comma-separated list of layer ids")


def tokenizer_spec(params: dict[str, Any]) -> dict[str, Any] | None:
    """The reference's `data.tokenizer` ({"name", "path"}), if recorded."""
    data = params.get("data")
    spec = data.get("tokenizer") if isinstance(data, dict) else None
    return spec if isinstance(spec, dict) else None
