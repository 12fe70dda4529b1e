"""Fused small-op kernels (kernels/fused_ops.py) against their PyTorch references (CUDA), at the 830M
model's shapes in bf16: time per call, and bytes that must move / time against the copy bandwidth.

Rows: 1 and 64 (decode batches) and 8192 (a prefill chunk). Each reference is the model's own PyTorch path
(model.RMSNorm after the residual add, apply_rope on separate q and k projections, norm_and_gate, silu * w3,
three index_copy_ cache writes, torch.argmax over fp32 logit rows: the sampler's greedy tokens, up to 1024
rows).

    python benchmarks/fused_ops.py [--rows 1 64 8192] [--out benchmarks/results/fused_ops.json]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.testing

from common import ROOT, commit, copy_bandwidth, write_result
from mta_serve.config import ModelConfig
from mta_serve.kernels import fused_ops
from mta_serve.model import RMSNorm, apply_rope, rope_angles


def cases(cfg: ModelConfig, n: int, dtype: torch.dtype):
    """(name, fused fn, reference fn, bytes moved) for n rows."""
    dev, dim, heads, kv, d = "cuda", cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    hidden = cfg.ffn_hidden_dim
    size = torch.tensor([], dtype=dtype).element_size()
    h, delta = (torch.randn(n, dim, dtype=dtype, device=dev) for _ in range(2))
    norm = RMSNorm(dim, cfg.norm_eps).to(dev, dtype)
    qkv = torch.randn(n, (heads + 2 * kv) * d, dtype=dtype, device=dev)
    cos, sin = rope_angles(torch.arange(n, device=dev), d, cfg.rope_theta)
    attn_out = torch.randn(n, heads, d, dtype=torch.float32, device=dev)
    subln = RMSNorm(d, 1e-5).to(dev, dtype)
    gate = torch.nn.Linear(d, 1).to(dev, dtype)
    x13 = torch.randn(n, 2 * hidden, dtype=dtype, device=dev)
    blocks = -(-n // 16) + 1
    caches = [torch.zeros(blocks, 16, c, d, dtype=dtype, device=dev) for c in (kv, kv, heads)]
    slots = torch.randperm(blocks * 16, device=dev)[:n].to(torch.int32)
    logits = torch.randn(n, cfg.vocab_size, device=dev) if n <= 1024 else None
    q, k, v = (qkv[:, :heads * d].view(n, heads, d).contiguous(), qkv[:, heads * d:(heads + kv) * d].view(n, kv, d),
               qkv[:, (heads + kv) * d:].view(n, kv, d))

    def ref_norm_gate():
        x = subln(attn_out.to(dtype))
        return x * torch.sigmoid(gate(x))

    def ref_write():
        for cache, t in zip(caches, (k, v, q)):
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slots.long(), t)

    return [
        ("add_rms_norm", lambda: fused_ops.add_rms_norm(h, delta, norm.weight, norm.eps),
         lambda: norm(h + delta), 4 * n * dim * size),
        ("rope", lambda: fused_ops.rope(qkv, cos, sin, heads, kv, d),
         lambda: (apply_rope(qkv[:, :heads * d].view(n, heads, d), cos, sin),
                  apply_rope(qkv[:, heads * d:(heads + kv) * d].view(n, kv, d), cos, sin)),
         2 * n * (heads + kv) * d * size + 2 * n * d * 4),
        ("head_norm_gate", lambda: fused_ops.head_norm_gate(attn_out, dtype, subln.weight, 1e-5, 1.0,
                                                             gate.weight[0], gate.bias),
         ref_norm_gate, n * heads * d * (4 + size)),
        ("silu_mul", lambda: fused_ops.silu_mul(x13), lambda: F.silu(x13[:, :hidden]) * x13[:, hidden:],
         3 * n * hidden * size),
        ("write_cache", lambda: fused_ops.write_cache(slots, k, v, q, *caches), ref_write,
         2 * n * (heads + 2 * kv) * d * size),
    ] + ([] if n > 1024 else [  # the sampler's greedy tokens: one fp32 logit row per sequence
        ("argmax_rows", lambda: fused_ops.argmax_rows(logits), lambda: torch.argmax(logits, dim=-1),
         n * cfg.vocab_size * 4)])


def bench_us(fn) -> float:
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 64, 8192])
    p.add_argument("--config", default=str(ROOT / "configs" / "830m_mta.yaml"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fused_ops.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/fused_ops.py: error: needs a CUDA device", file=sys.stderr)
        return 1
    cfg = ModelConfig.from_yaml(args.config)
    copy_bw = copy_bandwidth(torch.device("cuda"))
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}", flush=True)
    rows = []
    for n in args.rows:
        for name, fused, reference, nbytes in cases(cfg, n, torch.bfloat16):
            fused_us, ref_us = bench_us(fused), bench_us(reference)
            rows.append(dict(op=name, rows=n, fused_us=fused_us, reference_us=ref_us, bytes=nbytes,
                             fused_copy_fraction=nbytes / (fused_us * 1e-6) / copy_bw))
            print(f"{name:15s} rows={n:5d}  fused {fused_us:8.1f} us  reference {ref_us:8.1f} us  "
                  f"({ref_us / fused_us:5.1f}x)  {100 * rows[-1]['fused_copy_fraction']:5.1f}% of copy bw",
                  flush=True)
    write_result(args.out, dict(
        device=torch.cuda.get_device_name(), commit=commit(), date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        command=" ".join(sys.argv), config=args.config, dtype="bfloat16", copy_bandwidth_gbps=copy_bw / 1e9,
        results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
