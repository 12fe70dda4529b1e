"""The floor a kernel boundary puts under a batch-1 decode step: a chain of tiny Triton kernels, each reading
what the one before it wrote, replayed as one CUDA graph at each PDL level of kernels/pdl.py.

A batch-1 step of the 830M models runs about 160 (baseline) or 200 (MTA) kernels one after another, each
depending on the one before. Per link it reports the graph's replay time over the chain's length (the
replay of a two-link graph subtracted), for grids of a few to several hundred programs: what every kernel
boundary costs before any work. Each link adds 1 to every element, so the chain's result is checked.

    python benchmarks/launch_chain.py [--links 256] [--programs 1 16 132 528] [--out FILE]

Without CUDA (TRITON_INTERPRET=1) it only runs the chain eagerly and checks its result.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import triton
import triton.language as tl

from common import ROOT, copy_bandwidth, run_info, write_result
from mta_serve.kernels import pdl

BLOCK = 128  # fp32 elements per program


@triton.jit
def _link_kernel(src_ptr, dst_ptr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """dst = src + 1 over this program's BLOCK elements (src_ptr, dst_ptr [programs * BLOCK] fp32)."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs) + 1.0)


def run_chain(bufs: tuple[torch.Tensor, torch.Tensor], links: int, level: int) -> None:
    """`links` launches alternating bufs[0] -> bufs[1] -> bufs[0] ..."""
    launch = dict(PDL=level, launch_pdl=True) if level else dict(PDL=0)
    grid = (bufs[0].numel() // BLOCK,)
    for i in range(links):
        _link_kernel[grid](bufs[i % 2], bufs[(i + 1) % 2], BLOCK=BLOCK, **launch)


def replay_us(programs: int, links: int, level: int, replays: int) -> float:
    """Median replay time (µs) of a CUDA graph of the chain; checks the chain added `links` per replay."""
    bufs = (torch.zeros(programs * BLOCK, device="cuda"), torch.zeros(programs * BLOCK, device="cuda"))
    run_chain(bufs, links, level)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_chain(bufs, links, level)
    bufs[0].zero_(), bufs[1].zero_()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    check(bufs, links, replays)
    return statistics.median(times[2:])


def check(bufs, links: int, times: int) -> None:
    """After `times` runs of an even chain from zeros, bufs[0] holds links * times: every link added 1 to
    what the link before it wrote."""
    if not torch.all(bufs[0] == float(links * times)):
        raise RuntimeError(f"the chain computed {bufs[0].unique().tolist()[:4]}, expected {links * times}")


def measure(programs: list[int], links: int, replays: int) -> list[dict]:
    levels = pdl.LEVELS if torch.cuda.get_device_capability()[0] >= 9 else (0,)
    rows = []
    for n in programs:
        for level in levels:
            two, many = replay_us(n, 2, level, replays), replay_us(n, links, level, replays)
            rows.append(dict(programs=n, pdl=level, links=links, replay_us=many,
                             us_per_link=(many - two) / (links - 2)))
            print(f"{n:5d} programs  PDL {level}: {rows[-1]['us_per_link']:.2f} us per link "
                  f"({many:.1f} us for {links})", flush=True)
    return rows


def check_eagerly(links: int) -> None:
    """The chain's sums without CUDA (the interpreter)."""
    bufs = (torch.zeros(2 * BLOCK), torch.zeros(2 * BLOCK))
    run_chain(bufs, links, 0)
    check(bufs, links, 1)
    print(f"{links} links checked on the CPU; timing needs CUDA")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--links", type=int, default=256, help="kernels in the chain (even)")
    p.add_argument("--programs", nargs="+", type=int, default=[1, 16, 132, 528])
    p.add_argument("--replays", type=int, default=22)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "launch_chain.json"))
    args = p.parse_args()
    if args.links < 4 or args.links % 2 or min(args.programs) < 1:
        p.error("--links must be even and at least 4; --programs at least 1")
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("no CUDA device: set TRITON_INTERPRET=1 to check the chain on the CPU")
        check_eagerly(args.links)
        return 0
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    rows = measure(args.programs, args.links, args.replays)
    write_result(args.out, dict(**run_info(device, bandwidth), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
