"""What every benchmark script records beside its numbers: the commit measured and the machine's copy
bandwidth (the yardstick of every roofline figure)."""
from __future__ import annotations

import os
import statistics
import subprocess
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
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * 2 * n / statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
