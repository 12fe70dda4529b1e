"""Checkpoints: the native directory format, and import from the reference implementation's layout.

Native format (what `mta-serve --model DIR` serves): a directory with
  config.json          ModelConfig fields, 1:1 (see configs/*.yaml)
  model.safetensors    the state dict under the model's own parameter names, in the config's dtype
  tokenizer files      tokenizer_config.json (+ tokenizer.json or tokenizer.model), see mta_serve.tokenizer
Loading is strict: a missing, unexpected or mis-shaped tensor is an error that names it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, ModelConfig
from .reference_params import tokenizer_spec
from .model import DTYPES, MTATransformer, build_model
from .tokenizer import load_tokenizer, tokenizer_from_file, tokenizer_from_reference


class CheckpointError(ValueError):
    """A checkpoint directory or state dict cannot be used; the message says what is wrong."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model this config describes (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = MTATransformer(cfg)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_state_dict(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = [f"{k} has shape {list(state_dict[k].shape)}, expected {list(expected[k])}"
                 for k in sorted(set(expected) & set(state_dict)) if tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_few(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {_few(misshaped)}")
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))


def _few(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ---- native format ----------------------------------------------------------------------------------

def save_native(out_dir: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], tokenizer) -> Path:
    """Write a native checkpoint directory; tensors are stored in `cfg.dtype`."""
    check_state_dict(cfg, state_dict, "state dict")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_json(out / "config.json")
    dtype = DTYPES[cfg.dtype]
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(out)
    return out


def save_model(out_dir: str | Path, model: MTATransformer, tokenizer) -> Path:
    return save_native(out_dir, model.cfg, model.state_dict(), tokenizer)


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"model directory {model_dir} does not exist or is not a directory")
    if not path.is_file():
        raise CheckpointError(f"{model_dir} is not an mta-serve checkpoint: config.json is missing "
                              "(convert other formats with `mta-serve convert reference|hf`)")
    try:
        return ModelConfig.from_json(path)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def load_checkpoint(model_dir: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None):
    """Load a native checkpoint -> (model in eval mode, tokenizer)."""
    cfg = load_config(model_dir)
    weights = Path(model_dir) / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{model_dir} has config.json but no model.safetensors")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        raise CheckpointError(f"{weights} cannot be read: {exc}") from None
    check_state_dict(cfg, state_dict, str(weights))
    tokenizer = load_tokenizer(Path(model_dir))
    check_tokenizer_fits(cfg, tokenizer, str(model_dir))
    model = build_model(cfg, seed=None, device=device, dtype=dtype)
    model.load_state_dict(state_dict, strict=True)
    return model, tokenizer


# ---- reference implementation layout ----------------------------------------------------------------

_TRITON_KEYS = {  # triton_mta.<name>.weight -> (our name, whether conv weights need the [H,1,c_q,c_k] dim)
    "mta_conv_triton": ("mta_kernel", True),
    "mta_conv_after_sm_triton": ("mta_kernel_after_sm", True),
    "wpsm_triton": ("wpsm.weight", False),
    "wposm_triton": ("wposm.weight", False),
}


def reference_to_native_keys(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the reference's keys (plain and `triton_mta.*` layouts) to ours and resolve the tied alias."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key == "output.tied_module.weight":
            continue  # checked against the embedding below
        if ".attention.triton_mta." in key:
            prefix, rest = key.split(".triton_mta.")
            name, part = rest.rsplit(".", 1)
            if name not in _TRITON_KEYS or part != "weight":
                out[key] = tensor  # reported as unexpected by check_state_dict
                continue
            ours, add_dim = _TRITON_KEYS[name]
            out[f"{prefix}.{ours}"] = tensor.unsqueeze(1) if add_dim else tensor
        else:
            out[key] = tensor
    tied = state_dict.get("output.tied_module.weight")
    if tied is not None:
        if not cfg.tie_embeddings:
            raise CheckpointError("output.tied_module.weight is present but params.json says weight_tying=false")
        if not torch.equal(tied, state_dict.get("tok_embeddings.weight", tied + 1)):
            raise CheckpointError("output.tied_module.weight differs from tok_embeddings.weight: not a tied alias")
    return out


def import_reference(src_dir: str | Path, tokenizer_path: str | Path | None = None, dtype: str | None = None):
    """Read a reference checkpoint (consolidated.pth + params.json) -> (config, state_dict, tokenizer)."""
    src = Path(src_dir)
    params_path, weights_path = src / "params.json", src / "consolidated.pth"
    for path in (params_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{src} is not a reference checkpoint: {path.name} is missing")
    try:
        params = json.loads(params_path.read_text())
        cfg = ModelConfig.from_reference_params(params)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{params_path} is not valid JSON: {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{params_path}: {exc}") from None
    if dtype is not None:
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "dtype": dtype})
    state_dict = reference_to_native_keys(cfg, _load_reference_weights(weights_path))
    check_state_dict(cfg, state_dict, str(weights_path))
    spec = tokenizer_spec(params)
    if spec is None and tokenizer_path is None:
        raise CheckpointError(f"{params_path} names no data.tokenizer: pass --tokenizer FILE")
    tokenizer = (tokenizer_from_file(tokenizer_path) if spec is None
                 else tokenizer_from_reference(spec, tokenizer_path))
    check_tokenizer_fits(cfg, tokenizer, str(src))
    return cfg, state_dict, tokenizer


def _load_reference_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types, with multi-line messages
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} cannot be read as a PyTorch state dict: {first_line}") from None
    raw = blob["model"] if isinstance(blob, dict) and "model" in blob else blob
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors (expected {{'model': state_dict}})")
    return raw


def check_tokenizer_fits(cfg: ModelConfig, tokenizer, source: str) -> None:
    if tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"{source}: the tokenizer emits {tokenizer.vocab_size} ids but the model's "
                              f"vocab_size is {cfg.vocab_size}")
