"""Split merges of decode rows: the chunk of splits each load reads (work_items.SPLIT_CHUNK) and the warps of
paged flash's one-row combine, timed per layer call (CUDA graph replay, kernels.bench_ms) at the engine's
split counts, 830M heads, bf16, for (a) conv, (b) mixing and (c) plain layers.

    python benchmarks/combine_sweep.py [--out benchmarks/results/combine_sweep.json]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import kernels as K
from common import ROOT, commit, write_result
from mta_serve.kernels import mta_attention, paged_flash

SHAPES = [(1, 2048), (1, 8192), (16, 2048), (64, 2048), (256, 2048)]


class CombineWarps:
    """Stands in for paged_flash._flash_combine_kernel, launching it with `warps` warps."""

    def __init__(self, kernel, warps: int):
        self.kernel, self.warps = kernel, warps

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, **{**kwargs, "num_warps": self.warps})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "combine_sweep.json"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/combine_sweep.py: error: needs a CUDA device", file=sys.stderr)
        return 1
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    combine, chunk, rows = paged_flash._flash_combine_kernel, mta_attention.SPLIT_CHUNK, []
    try:
        for kind in ("plain", "mixing", "conv"):
            for batch, context in SHAPES:
                inputs = K.paged_batch(batch, context, 1)
                splits = K.engine_splits(kind, batch, context, sms)
                for sc in (4, 8, 16, 32):
                    for warps in (1, 2, 4) if kind == "plain" else (None,):
                        mta_attention.SPLIT_CHUNK = paged_flash.SPLIT_CHUNK = sc
                        if warps:
                            paged_flash._flash_combine_kernel = CombineWarps(combine, warps)
                        us = 1e3 * K.bench_ms(K.run_paged(kind, inputs, 1, splits))
                        rows.append(dict(kind=kind, batch=batch, context=context, splits=splits, split_chunk=sc,
                                         combine_warps=warps, us=us))
                        print(f"{kind:6s} {batch:3d} x {context:5d} ({splits:2d} splits)  chunk {sc:2d}  "
                              f"combine warps {warps or '-'}  {us:8.1f} us", flush=True)
                del inputs
    finally:
        paged_flash._flash_combine_kernel = combine
        mta_attention.SPLIT_CHUNK = paged_flash.SPLIT_CHUNK = chunk
    write_result(args.out, dict(device=torch.cuda.get_device_name(), commit=commit(), date=time.strftime("%Y-%m-%d"),
                                torch=torch.__version__, command=" ".join(sys.argv), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
