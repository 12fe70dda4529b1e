"""What the benchmark scripts share: the commit measured and the machine's copy bandwidth (the yardstick of
every roofline figure), the engine benchmarks' model options, and writing results."""
from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """MTA_SERVE_COMMIT if set (a copied tree, whose .git may be missing or stale), else the checkout's commit."""
    if os.environ.get("MTA_SERVE_COMMIT"):
        return os.environ["MTA_SERVE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        out = None
    return (out.stdout.strip() if out else "") or "unknown"


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second by a same-device copy (2 GiB on CUDA, 128 MiB elsewhere), the median
    of 10 timed copies after a warm-up one."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)  # int16 elements
    src = torch.ones(n, dtype=torch.int16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * 2 * n / statistics.median(times[1:])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_model_args(p) -> None:
    """The engine benchmarks' model options: config files (random weights), device, dtype."""
    p.add_argument("--models", nargs="+",
                   default=[str(ROOT / "configs" / "830m_mta.yaml"), str(ROOT / "configs" / "830m_baseline.yaml")])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", help="float32, float16 or bfloat16 (default: the config's)",
                   choices=["float32", "float16", "bfloat16"])


def build_bench_model(path: str, dtype: str | None, device: torch.device):
    """A config's model with seeded random weights -> (config, model, weight bytes, KV-cache bytes per token)."""
    from mta_serve.config import ModelConfig
    from mta_serve.model import DTYPES, build_model
    from mta_serve.paged_attention import cache_bytes_per_token

    cfg = ModelConfig.from_yaml(path)
    model = build_model(cfg, seed=0, mta_init="random", device=device, dtype=DTYPES[dtype] if dtype else None)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return cfg, model, weight_bytes, cache_bytes_per_token(cfg, model.tok_embeddings.weight.dtype)


def release(device: torch.device) -> None:
    """Give a finished engine's memory back before the next one sizes its KV cache (the benchmarks' wrappers
    around engine methods form reference cycles that only the collector frees)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_info(device: torch.device, bandwidth: float) -> dict:
    """What every result file records about its run."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return dict(command=" ".join(["python"] + sys.argv), commit=commit(), date=time.strftime("%Y-%m-%d"),
                device=name, torch=torch.__version__, copy_bandwidth_gbps=bandwidth / 1e9)


def write_result(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
