"""Cost of the dense reference path: one full forward (prefill) and recompute-style decoding.

The dense reference materializes every layer's T x T score maps, as the reference implementation does at
every decode step. This script measures how that cost grows with the sequence length, the baseline the paged
engine and the Triton kernels are meant to beat. Prints a table and saves JSON.

  python benchmarks/dense_reference.py [--config configs/tiny.yaml] [--lengths 64 128 256] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from mta_serve.config import ModelConfig
from mta_serve.model import build_model

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_forward(model, length: int, device: str, repeats: int) -> float:
    """Median seconds for one dense forward over a single sequence of `length` tokens."""
    tokens = torch.randint(0, model.cfg.vocab_size, (length,), device=device)
    times = []
    with torch.no_grad():
        model.dense_logits(tokens, [0, length])  # warm-up
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            model.dense_logits(tokens, [0, length])
            _sync(device)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dense_reference.json"))
    args = p.parse_args()

    cfg = ModelConfig.from_yaml(args.config)
    model = build_model(cfg, seed=0, mta_init="random", device=args.device, dtype=torch.float32)
    rows = []
    print(f"{'tokens':>8} {'forward ms':>12} {'ms/token':>10} {'decode step ms (recompute)':>28}")
    for length in args.lengths:
        seconds = time_forward(model, length, args.device, args.repeats)
        # A recompute-style decode step at context T costs one forward over T tokens.
        rows.append({"tokens": length, "forward_s": seconds, "per_token_ms": 1e3 * seconds / length})
        print(f"{length:>8} {1e3 * seconds:>12.2f} {1e3 * seconds / length:>10.3f} {1e3 * seconds:>28.2f}")
    result = {"config": args.config, "device": args.device, "torch": torch.__version__,
              "host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "commit": _commit(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
