"""One-row linear layers (kernels/row_linear.py) against cuBLAS (torch.nn.functional.linear) at the 830M model's
shapes in bf16: time per call and the weight bytes read / time against the copy bandwidth.

For q|k|v and w1|w3 it also times the forward's batch-1 sequences with and without the work fused into
the product: fused_ops.add_rms_norm, row_linear, then fused_ops.rope (q|k|v) or fused_ops.silu_mul (w1|w3),
against `norm_qkv_rope` / `norm_linear(..., silu_mul=True)` (one kernel each) and, for w1|w3, the SwiGLU epilogue
alone (`row_linear_silu_mul`). Each time is one CUDA graph over 24 distinct weights of the
shape (as a decode step's layers run: no weight in L2 from the call before, no launch cost between calls
beyond the graph's), divided by 24; the LM head has one weight (timed for reference: the engine keeps it on
cuBLAS). --sweep also times every (rows per program, columns per load) pair of {2, 4, 8} x {512, 1024} in
both of the kernels' forms (the loop over pieces of K and the unrolled one), from which row_linear.row_tiles and
row_linear.unrolled were chosen.

    python benchmarks/row_linear.py [--sweep] [--out benchmarks/results/row_linear.json]
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as F
import triton

from common import ROOT, commit, copy_bandwidth, write_result
from mta_serve.config import ModelConfig
from mta_serve.kernels.fused_ops import add_rms_norm, rope, silu_mul
from mta_serve.kernels.row_linear import (ROPE, SWIGLU, norm_linear, norm_qkv_rope, row_linear, row_linear_silu_mul,
                                          row_norm_linear, row_tiles, unrolled)
from mta_serve.model import rope_angles


def shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The linear layers of a block (fused as in MTATransformer.fuse_projections) and the LM head: [N, K]."""
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    return {"wqkv": (qkv, cfg.dim), "wo": (cfg.dim, cfg.n_heads * cfg.head_dim),
            "w13": (2 * cfg.ffn_hidden_dim, cfg.dim), "w2": (cfg.dim, cfg.ffn_hidden_dim),
            "lm_head": (cfg.vocab_size, cfg.dim)}


def graph_us(fn, weights: list[torch.Tensor], reps: int = 20) -> float:
    """Mean microseconds per fn(w) call over one CUDA graph that calls it once per weight."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # compile and warm up outside the capture
        for w in weights:
            fn(w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            fn(w)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / len(weights)


def fused_sequences(name: str, x: torch.Tensor, weights: list[torch.Tensor], cfg: ModelConfig, sweep: bool) -> dict:
    """Microseconds per call of the forward's batch-1 sequence around this product, separate and fused."""
    k = x.shape[1]
    h, delta = torch.randn_like(x), torch.randn_like(x)
    norm_w = torch.ones(k, device="cuda", dtype=x.dtype)
    if name == "wqkv":
        heads = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim)
        cos, sin = rope_angles(torch.tensor([1000], device="cuda"), cfg.head_dim, cfg.rope_theta)
        times = dict(
            separate_us=graph_us(lambda w: rope(row_linear(add_rms_norm(h, delta, norm_w, 1e-5)[1], w),
                                                cos, sin, *heads), weights),
            fused_us=graph_us(lambda w: norm_qkv_rope(h, delta, norm_w, 1e-5, w, cos, sin, *heads), weights))
        label = "add_rms_norm, row_linear, rope"
    else:
        times = dict(
            separate_us=graph_us(lambda w: silu_mul(row_linear(add_rms_norm(h, delta, norm_w, 1e-5)[1], w)),
                                 weights),
            silu_epilogue_us=graph_us(lambda w: row_linear_silu_mul(add_rms_norm(h, delta, norm_w, 1e-5)[1], w),
                                      weights),
            fused_us=graph_us(lambda w: norm_linear(h, delta, norm_w, 1e-5, w, silu_mul=True), weights))
        label = "add_rms_norm, row_linear, silu_mul"
    if sweep:  # block_n counts pairs of W rows here (q|k|v: RoPE pairs; w1|w3: a W1 row and its W3 row)
        epilogue = ROPE if name == "wqkv" else SWIGLU
        rotary = (cos, sin, (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim) if name == "wqkv" else None
        times["fused_sweep"] = [
            dict(block_n=bn, block_k=bk, num_warps=nw, unroll=un, us=graph_us(
                lambda w: row_norm_linear(h, delta, norm_w, 1e-5, w, epilogue, rotary, bn, bk, nw, unroll=un),
                weights))
            for un in (False, True) for bn in (1, 2, 4) for bk in (512, 1024) for nw in (4, 8)]
        for un in (False, True):
            best = min((r for r in times["fused_sweep"] if r["unroll"] == un), key=lambda r: r["us"])
            print(f"{'':8s} fused sweep, {'unrolled' if un else 'loop'}: best {best['block_n']} x "
                  f"{best['block_k']}, {best['num_warps']} warps: {best['us']:6.2f} us", flush=True)
    print(f"{'':8s} {label}: {times['separate_us']:6.2f} us; one kernel {times['fused_us']:6.2f} us"
          + (f" (SwiGLU epilogue only: {times['silu_epilogue_us']:6.2f} us)" if name == "w13" else ""), flush=True)
    return times


def measure(name: str, n: int, k: int, layers: int, sweep: bool, copy_bw: float, cfg: ModelConfig) -> dict:
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(row_linear(x, weights[0]).float(), F.linear(x, weights[0]).float(),
                               atol=2e-2, rtol=2e-2)
    nbytes = n * k * 2
    row = dict(layer=name, n=n, k=k, bytes=nbytes, tiles=row_tiles(n), unrolled=unrolled(n),
               cublas_us=graph_us(lambda w: F.linear(x, w), weights),
               row_linear_us=graph_us(lambda w: row_linear(x, w), weights))
    for key in ("cublas", "row_linear"):
        row[f"{key}_copy_fraction"] = nbytes / (row[f"{key}_us"] * 1e-6) / copy_bw
    if name in ("wqkv", "w13"):
        row.update(fused_sequences(name, x, weights, cfg, sweep))
    if sweep:
        row["sweep"] = [dict(block_n=bn, block_k=bk, unroll=un,
                             us=graph_us(lambda w: row_linear(x, w, bn, bk, unroll=un), weights))
                        for un in (False, True) for bn in (2, 4, 8) for bk in (512, 1024)]
    print(f"{name:8s} [{n:6d}, {k:5d}]  cuBLAS {row['cublas_us']:7.2f} us ({100 * row['cublas_copy_fraction']:4.1f}%)"
          f"  row_linear {row['row_linear_us']:7.2f} us ({100 * row['row_linear_copy_fraction']:4.1f}%)", flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "830m_mta.yaml"))
    p.add_argument("--sweep", action="store_true", help="also time every tile pair of {2, 4, 8} x {512, 1024}, "
                   "and {1, 2, 4} x {512, 1024} x {4, 8} warps for the fused q|k|v and w1|w3 kernels, each in "
                   "both of the kernels' forms (row_linear.unrolled)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "row_linear.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/row_linear.py: error: needs a CUDA device", file=sys.stderr)
        return 1
    cfg = ModelConfig.from_yaml(args.config)
    copy_bw = copy_bandwidth(torch.device("cuda"))
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s on {torch.cuda.get_device_name()}", flush=True)
    rows = [measure(name, n, k, 1 if name == "lm_head" else cfg.n_layers, args.sweep, copy_bw, cfg)
            for name, (n, k) in shapes(cfg).items()]
    blocks = [r for r in rows if r["layer"] != "lm_head"]
    # the engine sends the blocks' layers through row_linear at batch 1, and the LM head to cuBLAS
    per_step = {key: sum(r[f"{key}_us"] for r in blocks) * cfg.n_layers for key in ("cublas", "row_linear")}
    print(f"the {cfg.n_layers} blocks' linear layers per batch-1 step: cuBLAS {per_step['cublas']:.0f} us, "
          f"row_linear {per_step['row_linear']:.0f} us", flush=True)
    write_result(args.out, dict(
        device=torch.cuda.get_device_name(), commit=commit(), date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        command=" ".join(sys.argv), config=args.config, dtype="bfloat16", copy_bandwidth_gbps=copy_bw / 1e9,
        per_step_us=per_step, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
