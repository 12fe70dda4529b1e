"""Model configuration: slotted dataclasses validated on construction.

YAML files in `configs/` and a native checkpoint's `config.json` map onto these classes 1:1 (same keys).
`ModelConfig.from_reference_params` reads the reference implementation's `params.json`.
"""
from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PAD_KEYS = ("both", "left", "right")
GATES = ("none", "1d", "full")
DTYPES = ("float32", "float16", "bfloat16")
_REFERENCE_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


def _require(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"invalid {name}={value!r}: allowed {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _conv_pair(name: str, value: Any) -> tuple[int, int] | None:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) and v >= 1 for v in value)
    _require(ok, name, value, "null or [c_q, c_k] with two positive integers")
    return (value[0], value[1])


@dataclass(slots=True)
class MTAConfig:
    """Which MTA operations a model uses (see docs/MTA spec, steps 2-9). All off = plain attention."""

    pre_conv: tuple[int, int] | None = None  # (c_q, c_k) pre-softmax key-query conv, on `mta_layers`
    post_conv: tuple[int, int] | None = None  # (c_q', c_k') post-softmax key-query conv, on `mta_layers`
    pad_key: str = "both"  # key-axis padding of both convs
    mta_layers: tuple[int, ...] | None = None  # layers with the key-query convs; None = every layer
    wpsm: bool = False  # pre-softmax H x H head mixing, every layer
    head_kernel_size: int | None = None  # post-softmax grouped head conv with groups of c_h heads, every layer
    wposm: bool = False  # post-softmax H x H linear head mixing, every layer
    group_norm: bool = False  # per-head RMSNorm of the attention output, every layer
    layer_norm_rescale: bool = False  # depth scaling (1 - lambda(layer)) of the group norm
    gate: str = "none"  # sigmoid gate on each head's output: none | 1d (Linear(d,1)) | full (Linear(d,d))

    def __post_init__(self) -> None:
        self.pre_conv = _conv_pair("mta.pre_conv", self.pre_conv)
        self.post_conv = _conv_pair("mta.post_conv", self.post_conv)
        _require(self.pad_key in PAD_KEYS, "mta.pad_key", self.pad_key, f"one of {PAD_KEYS}")
        for name, conv in (("mta.pre_conv", self.pre_conv), ("mta.post_conv", self.post_conv)):
            if conv is not None and self.pad_key == "both":
                _require(conv[1] % 2 == 1, name, list(conv), "an odd key size c_k when pad_key is 'both'")
        if self.mta_layers is not None:
            ok = isinstance(self.mta_layers, (list, tuple)) and all(_is_int(i) and i >= 0 for i in self.mta_layers)
            _require(ok, "mta.mta_layers", self.mta_layers, "null (every layer) or a list of layer ids >= 0")
            self.mta_layers = tuple(sorted(set(self.mta_layers)))
        for name in ("wpsm", "wposm", "group_norm", "layer_norm_rescale"):
            _require(isinstance(getattr(self, name), bool), f"mta.{name}", getattr(self, name), "true or false")
        if self.head_kernel_size is not None:
            ok = _is_int(self.head_kernel_size) and self.head_kernel_size >= 1
            _require(ok, "mta.head_kernel_size", self.head_kernel_size, "null or a positive integer")
        _require(not (self.wposm and self.head_kernel_size is not None), "mta.wposm", self.wposm,
                 "false when head_kernel_size is set (one post-softmax head mixing at a time)")
        _require(self.group_norm or not self.layer_norm_rescale, "mta.layer_norm_rescale",
                 self.layer_norm_rescale, "false unless group_norm is true")
        _require(self.gate in GATES, "mta.gate", self.gate, f"one of {GATES}")

    @property
    def mixes_after_softmax(self) -> bool:
        return self.post_conv is not None or self.head_kernel_size is not None or self.wposm

    def has_conv(self, layer_id: int) -> bool:
        """Whether the key-query convolutions apply in this layer."""
        return self.mta_layers is None or layer_id in self.mta_layers


@dataclass(slots=True)
class ModelConfig:
    """A Llama-style decoder whose attention layers may be MTA layers."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    head_dim: int | None = None  # None = dim // n_heads
    ffn_hidden_dim: int | None = None  # None = 256 * ceil(int(8 * dim / 3) / 256), the paper's rule
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    max_seq_len: int = 2048
    dtype: str = "float32"  # weight dtype of the checkpoint
    mta: MTAConfig = field(default_factory=MTAConfig)

    def __post_init__(self) -> None:
        if isinstance(self.mta, dict):
            self.mta = _from_dict(MTAConfig, self.mta, "mta.")
        _require(isinstance(self.mta, MTAConfig), "mta", self.mta, "a mapping of MTA options")
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "a positive integer")
        self.n_kv_heads = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        _require(_is_int(self.n_kv_heads) and self.n_kv_heads >= 1 and self.n_heads % self.n_kv_heads == 0,
                 "n_kv_heads", self.n_kv_heads, f"a positive divisor of n_heads={self.n_heads}")
        if self.head_dim is None:
            _require(self.dim % self.n_heads == 0, "dim", self.dim, f"a multiple of n_heads={self.n_heads}")
            self.head_dim = self.dim // self.n_heads
        _require(_is_int(self.head_dim) and self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim",
                 self.head_dim, "an even integer >= 2 (RoPE rotates pairs)")
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = 256 * math.ceil(int(8 * self.dim / 3) / 256)
        _require(_is_int(self.ffn_hidden_dim) and self.ffn_hidden_dim >= 1, "ffn_hidden_dim",
                 self.ffn_hidden_dim, "a positive integer")
        _require(_is_positive_number(self.norm_eps), "norm_eps", self.norm_eps, "a positive finite number")
        _require(_is_positive_number(self.rope_theta), "rope_theta", self.rope_theta, "a positive finite number")
        _require(isinstance(self.tie_embeddings, bool), "tie_embeddings", self.tie_embeddings, "true or false")
        _require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
        self._check_mta()

    def _check_mta(self) -> None:
        mta = self.mta
        if mta.mta_layers is not None:
            bad = [i for i in mta.mta_layers if i >= self.n_layers]
            _require(not bad, "mta.mta_layers", list(mta.mta_layers), f"layer ids below n_layers={self.n_layers}")
        if mta.head_kernel_size is not None:
            _require(self.n_heads % mta.head_kernel_size == 0, "mta.head_kernel_size", mta.head_kernel_size,
                     f"a divisor of n_heads={self.n_heads}")

    # ---- (de)serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("pre_conv", "post_conv", "mta_layers"):
            if out["mta"][key] is not None:
                out["mta"][key] = list(out["mta"][key])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, data, "")

    @staticmethod
    def mta_from_dict(data: dict[str, Any]) -> MTAConfig:
        """An `mta:` section alone (fields named mta.*); what depends on the model's layers and heads is
        checked when a ModelConfig takes it."""
        return _from_dict(MTAConfig, data, "mta.")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
        _require(isinstance(data, dict), str(path), type(data).__name__, "a YAML mapping of ModelConfig fields")
        return cls.from_dict(data)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_reference_params(cls, params: dict[str, Any]) -> "ModelConfig":
        from .reference_params import model_config_kwargs

        if not isinstance(params, dict):
            raise ConfigError("params.json must be a JSON object with a 'model' mapping")
        try:
            kwargs = model_config_kwargs(params)
        except (TypeError, AttributeError, ZeroDivisionError, KeyError) as exc:
            raise ConfigError(f"params.json is malformed: {exc}") from None
        return cls(**kwargs)


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    _require(isinstance(data, dict), prefix.rstrip(".") or "config", data, "a mapping")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known, key=str)  # YAML keys may be booleans or numbers (`on:`, `1:`)
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]!s}: allowed fields are {sorted(known)}")
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ConfigError(f"missing config field {prefix}{missing[0]}: required fields are {required}")
    return cls(**data)


@dataclass(slots=True)
class CacheConfig:
    """The paged KV cache. Its size is `num_blocks` if given, else derived from a memory budget: on CUDA a
    fraction of the memory free after a warm-up forward, on CPU `cpu_kv_cache_bytes`."""

    block_size: int = 16  # tokens per block
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 256 << 20
    enable_prefix_caching: bool = True
    attention_backend: str = "auto"  # auto = triton on CUDA, torch elsewhere
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps (debugging); graphs need triton on CUDA

    def __post_init__(self) -> None:
        _require(self.attention_backend in ("auto", "torch", "triton"), "attention_backend",
                 self.attention_backend, "'auto', 'torch' or 'triton'")
        _require(_is_int(self.block_size) and self.block_size >= 1, "block_size", self.block_size,
                 "a positive integer")
        _require(self.num_blocks is None or (_is_int(self.num_blocks) and self.num_blocks >= 1), "num_blocks",
                 self.num_blocks, "null or a positive integer")
        _require(_is_positive_number(self.gpu_memory_utilization) and self.gpu_memory_utilization <= 1,
                 "gpu_memory_utilization", self.gpu_memory_utilization, "a number in (0, 1]")
        _require(_is_int(self.cpu_kv_cache_bytes) and self.cpu_kv_cache_bytes >= 1, "cpu_kv_cache_bytes",
                 self.cpu_kv_cache_bytes, "a positive integer")
        _require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching",
                 self.enable_prefix_caching, "true or false")
        _require(isinstance(self.enforce_eager, bool), "enforce_eager", self.enforce_eager, "true or false")


@dataclass(slots=True)
class SchedulerConfig:
    """Continuous batching limits. `max_chunk_tokens` caps the tokens one request computes per step (chunked
    prefill); None lets a prompt take the whole remaining token budget. `overlap_steps`: schedule and launch
    step N+1 before reading step N's tokens and building its outputs (detokenization, stop strings,
    streaming), so that host work runs while the device computes (engine.py); None = on where the forward
    runs asynchronously (CUDA)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_chunk_tokens: int | None = None
    overlap_steps: bool | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, name, value, "a positive integer")
        _require(self.max_chunk_tokens is None or (_is_int(self.max_chunk_tokens) and self.max_chunk_tokens >= 1),
                 "max_chunk_tokens", self.max_chunk_tokens, "null or a positive integer")
        _require(self.overlap_steps is None or isinstance(self.overlap_steps, bool), "overlap_steps",
                 self.overlap_steps, "null, true or false")
