"""Convert a Hugging Face Llama-architecture checkpoint into an MTA model whose MTA weights are the identity.

With identity MTA weights (and no group norm or gate) every MTA layer is exactly causal softmax attention
(docs MTA spec, "Identity initialization"), so the converted model computes the same logits as the source
model. That makes a pretrained Llama a starting point for MTA fine-tuning and a strong end-to-end test.

Two layout differences are handled here:
- key names (HF `model.layers.N.self_attn.q_proj.weight` -> `layers.N.attention.wq.weight`, ...);
- RoPE layout: HF rotates half-split pairs (x[m], x[m + d/2]) while this model rotates interleaved pairs
  (x[2m], x[2m+1]) with the same frequency for pair m. Reordering the rows of wq and wk inside every head
  moves each HF pair into an interleaved slot; q.k is a sum over all d dims, so scores are unchanged.

Everything that would change the function and is not supported is rejected with a one-line CheckpointError,
and every tensor of the source is either mapped, explicitly ignored, or reported: nothing is silently dropped.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .config import DTYPES, ConfigError, ModelConfig, MTAConfig
from .model import DTYPES as TORCH_DTYPES
from .checkpoint import CheckpointError, check_state_dict, expected_shapes
from .model import identity_conv_kernel


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}  # same tensors and function
_ALLOWED_ROPE_KEYS = {"rope_type", "type", "rope_theta"}  # a rope dict with only these is plain RoPE

# Per-layer HF suffix -> our suffix. gate_proj feeds the SiLU (w1), up_proj the linear branch (w3).
_LAYER_KEYS = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_GLOBAL_KEYS = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Non-weight buffers that older transformers versions saved; recomputed from rope_theta, so not needed.
_IGNORED_RE = re.compile(r"(.+\.)?rotary_emb\.inv_freq")


# ---- public API ---------------------------------------------------------------------------------------

def default_mta(n_layers: int, n_heads: int) -> MTAConfig:
    """The paper's MTA layout without group norm and gate (neither is an identity function): 6x11 pre- and
    post-softmax convs on layers 2, 6, 10, ... and H x H pre-softmax mixing plus one all-heads head conv on
    every layer. A model with <= 2 layers has no layer 2, so it gets the convs on every layer instead (like
    the paper's 4-layer toy model), rather than silently converting to an MTA model without convs."""
    layers = tuple(range(2, n_layers, 4))
    return MTAConfig(pre_conv=(6, 11), post_conv=(6, 11), pad_key="both", mta_layers=layers or None,
                     wpsm=True, head_kernel_size=n_heads)


def convert_hf_llama(src_dir: str | Path, mta: MTAConfig | None = None,
                     dtype: str | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF Llama checkpoint directory (config.json + safetensors) -> (ModelConfig, state dict).

    `mta=None` uses `default_mta`; `MTAConfig()` gives a plain Llama. `dtype` overrides the source dtype.
    The state dict has exactly the keys, shapes and dtype of `build_model(cfg).state_dict()`.
    """
    src_dir = Path(src_dir)
    hf = read_hf_config(src_dir)
    cfg = _model_config(src_dir, hf, mta, dtype)
    expected = expected_shapes(cfg)
    state = _map_weights(_load_safetensors(src_dir), cfg, expected)
    state.update(identity_mta_state(cfg))
    target = TORCH_DTYPES[cfg.dtype]
    state = {name: tensor.to(target).contiguous() for name, tensor in state.items()}
    check_state_dict(cfg, state, f"converted {src_dir}")
    return cfg, state


# ---- config.json --------------------------------------------------------------------------------------

def read_hf_config(src_dir: Path) -> dict[str, Any]:
    """Load config.json and reject every architecture or option whose function this model cannot compute."""
    path = src_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src_dir}: no config.json (expected a Hugging Face checkpoint directory)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    _check_architecture(path, hf)
    _check_supported(path, hf)
    return hf


def _check_architecture(path: Path, hf: dict[str, Any]) -> None:
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    if model_type is not None and model_type not in _ARCHITECTURES:
        raise CheckpointError(f"{path}: unsupported model_type={model_type!r}: allowed {sorted(_ARCHITECTURES)}")
    allowed = set(_ARCHITECTURES.values()) if model_type is None else {_ARCHITECTURES[model_type]}
    if (model_type is None or archs) and not allowed & set(archs):
        raise CheckpointError(f"{path}: unsupported architectures={archs!r}: allowed one of {sorted(allowed)}")


def _check_supported(path: Path, hf: dict[str, Any]) -> None:
    # (field, value the converted model computes, HF default when the field is absent)
    for name, allowed, default in (("hidden_act", "silu", "silu"), ("attention_bias", False, False),
                                   ("mlp_bias", False, False), ("sliding_window", None, None),
                                   ("use_sliding_window", False, False), ("quantization_config", None, None)):
        value = hf.get(name, default)
        if value != allowed:
            raise CheckpointError(f"{path}: unsupported {name}={value!r}: allowed {json.dumps(allowed)}")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise CheckpointError(f"{path}: unsupported layer_types={sorted(set(layer_types))}: "
                              "allowed only 'full_attention'")
    for name in ("rope_scaling", "rope_parameters"):  # transformers < 5 / >= 5 spelling
        rope = hf.get(name)
        if rope is not None and not _is_plain_rope(rope):
            raise CheckpointError(f"{path}: unsupported rope_scaling ({name}={json.dumps(rope)}): allowed null "
                                  "or rope_type 'default' (plain RoPE)")


def _is_plain_rope(rope: Any) -> bool:
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else None
    return kind == "default" and set(rope) <= _ALLOWED_ROPE_KEYS


def _rope_theta(path: Path, hf: dict[str, Any]) -> float:
    # transformers >= 5 moved rope_theta into rope_parameters; older configs keep it top-level.
    thetas = {float(t) for t in (hf.get("rope_theta"), (hf.get("rope_parameters") or {}).get("rope_theta"))
              if t is not None}
    if len(thetas) > 1:
        raise CheckpointError(f"{path}: rope_theta and rope_parameters.rope_theta disagree: {sorted(thetas)}")
    return thetas.pop() if thetas else 10000.0  # LlamaConfig's default


def _weight_dtype(path: Path, hf: dict[str, Any], override: str | None) -> str:
    if override is not None:
        if override not in DTYPES:
            raise CheckpointError(f"invalid dtype={override!r}: allowed one of {DTYPES}")
        return override
    # transformers >= 5 writes "dtype", older versions "torch_dtype"; absent = float32, HF's load default.
    name = hf.get("dtype", hf.get("torch_dtype")) or "float32"
    name = str(name).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"{path}: unsupported torch_dtype={name!r}: allowed one of {DTYPES} "
                              "(or pass dtype=...)")
    return name


def _model_config(src_dir: Path, hf: dict[str, Any], mta: MTAConfig | None, dtype: str | None) -> ModelConfig:
    path = src_dir / "config.json"
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if hf.get(k) is None]
    if missing:
        raise CheckpointError(f"{path}: missing required field {missing[0]}")
    n_layers, n_heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    mta = default_mta(n_layers, n_heads) if mta is None else mta
    _check_mta_is_identity(mta)
    try:
        return ModelConfig(
            dim=hf["hidden_size"], n_layers=n_layers, n_heads=n_heads, vocab_size=hf["vocab_size"],
            n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
            ffn_hidden_dim=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(path, hf), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=hf.get("max_position_embeddings", 2048), dtype=_weight_dtype(path, hf, dtype), mta=mta)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _check_mta_is_identity(mta: MTAConfig) -> None:
    # Convs and head mixings have identity weights; a group norm (RMSNorm) and a sigmoid gate have none.
    if mta.group_norm:
        raise CheckpointError("unsupported mta.group_norm=True for a converted checkpoint: allowed false "
                              "(a group norm has no identity weights, the logits would change)")
    if mta.gate != "none":
        raise CheckpointError(f"unsupported mta.gate={mta.gate!r} for a converted checkpoint: allowed 'none' "
                              "(a sigmoid gate has no identity weights, the logits would change)")


# ---- safetensors --------------------------------------------------------------------------------------

def _load_safetensors(src_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards named by model.safetensors.index.json."""
    single, index = src_dir / "model.safetensors", src_dir / "model.safetensors.index.json"
    if single.is_file():
        return _read_file(single, {})
    if not index.is_file():
        extra = " (pytorch_model.bin is not supported: re-save with safe_serialization=True)" \
            if any(src_dir.glob("pytorch_model*.bin")) else ""
        raise CheckpointError(f"{src_dir}: no model.safetensors or model.safetensors.index.json{extra}")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({exc!r})") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (src_dir / shard).is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing from {src_dir}")
        _read_file(src_dir / shard, tensors)
    unlisted = sorted(set(weight_map) - set(tensors))
    if unlisted:
        raise CheckpointError(f"{index}: tensors listed in weight_map but absent from the shards: {unlisted[:10]}")
    return tensors


def _read_file(path: Path, into: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            if name in into:
                raise CheckpointError(f"{path}: tensor {name} also appears in another shard")
            into[name] = f.get_tensor(name)
    return into


# ---- weights ------------------------------------------------------------------------------------------

def _target_name(name: str) -> str | None:
    """HF tensor name -> our name (None if unknown). lm_head is handled by the caller (depends on tying)."""
    if name in _GLOBAL_KEYS:
        return _GLOBAL_KEYS[name]
    match = _LAYER_RE.fullmatch(name)
    if match and match.group(2) in _LAYER_KEYS:
        return f"layers.{int(match.group(1))}.{_LAYER_KEYS[match.group(2)]}"
    return None


def _map_weights(raw: dict[str, torch.Tensor], cfg: ModelConfig,
                 expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Rename every source tensor, permute wq/wk rows to the interleaved RoPE layout, check the shapes."""
    lm_head = raw.pop("lm_head.weight", None)
    state, unexpected = {}, []
    for name in sorted(raw):
        target = _target_name(name)
        if target is None or target not in expected:  # e.g. layers beyond num_hidden_layers
            if not _IGNORED_RE.fullmatch(name):
                unexpected.append(name)
            continue
        state[target] = raw.pop(name)
    if unexpected:
        raise CheckpointError(f"unexpected tensors in checkpoint (not part of a Llama model): {_few(unexpected)}")
    _place_output(state, lm_head, cfg)
    missing = sorted(set(expected) - set(state) - set(identity_mta_state(cfg, meta=True)))
    if missing:
        raise CheckpointError(f"missing tensors in checkpoint: {_few(_source_names(missing))}")
    _check_shapes(state, expected)  # before the per-head reshape below, which needs the right row count
    for i in range(cfg.n_layers):
        for proj, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads)):
            name = f"layers.{i}.attention.{proj}.weight"
            state[name] = half_split_to_interleaved(state[name], heads, cfg.head_dim)
    return state


def _place_output(state: dict[str, torch.Tensor], lm_head: torch.Tensor | None, cfg: ModelConfig) -> None:
    if not cfg.tie_embeddings:
        if lm_head is not None:
            state["output.weight"] = lm_head
        return
    # Tied: the output projection is the embedding. A stored lm_head copy is only dropped if it is one.
    embed = state.get("tok_embeddings.weight")
    if lm_head is not None and embed is not None and not torch.equal(lm_head, embed):
        raise CheckpointError("tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight: "
                              "allowed an lm_head equal to the embedding, or none")


def half_split_to_interleaved(weight: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a q/k projection [n_heads * head_dim, dim]: within each head, new row 2m = old row m and new
    row 2m+1 = old row m + d/2, so HF's pair (m, m + d/2) becomes our interleaved pair (2m, 2m+1) and both
    are rotated by the same angle pos * theta^(-2m/d)."""
    half = head_dim // 2
    order = torch.stack((torch.arange(half), torch.arange(half) + half), dim=1).flatten()
    per_head = weight.reshape(n_heads, head_dim, weight.shape[-1])
    return per_head[:, order].reshape(weight.shape)


def _source_names(names: list[str]) -> list[str]:
    # Report tensors under the checkpoint's (HF) names, which is what the user can look for.
    ours_to_hf = {ours: hf for hf, ours in _GLOBAL_KEYS.items()} | {"output.weight": "lm_head.weight"}
    layer_to_hf = {ours: hf for hf, ours in _LAYER_KEYS.items()}
    out = []
    for name in names:
        layer = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        suffix = layer_to_hf.get(layer.group(2)) if layer else None
        out.append(f"model.layers.{layer.group(1)}.{suffix}" if suffix else ours_to_hf.get(name, name))
    return out


def _few(names: list[str], limit: int = 10) -> str:
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---- MTA identity weights and final check -------------------------------------------------------------

def identity_mta_state(cfg: ModelConfig, meta: bool = False) -> dict[str, torch.Tensor]:
    """Identity weights for every MTA parameter `cfg` creates: with them an MTA layer is plain attention.
    `meta=True` only names them (shape-only tensors), for bookkeeping."""
    mta, n_heads, out = cfg.mta, cfg.n_heads, {}
    with torch.device("meta" if meta else "cpu"):
        for i in range(cfg.n_layers):
            prefix = f"layers.{i}.attention."
            for name, size in (("mta_kernel", mta.pre_conv), ("mta_kernel_after_sm", mta.post_conv)):
                if size is not None and mta.has_conv(i):
                    out[prefix + name] = identity_conv_kernel(n_heads, *size, mta.pad_key)
            for name, on in (("wpsm.weight", mta.wpsm), ("wposm.weight", mta.wposm)):
                if on:
                    out[prefix + name] = torch.eye(n_heads)
            if mta.head_kernel_size is not None:
                c_h = mta.head_kernel_size
                out[prefix + "head_kernel"] = torch.eye(c_h).repeat(n_heads // c_h, 1, 1)
    return out


def _check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    for name, tensor in state.items():
        if tensor.shape != expected[name]:
            raise CheckpointError(f"tensor {_source_names([name])[0]} has shape {list(tensor.shape)}, the config "
                                  f"implies {list(expected[name])}")
