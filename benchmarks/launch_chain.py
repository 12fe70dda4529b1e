"""The floor a kernel boundary puts under a batch-1 decode step: a chain of tiny Triton kernels, each reading
what the one before it wrote, replayed as one CUDA graph at each PDL level of kernels/pdl.py; and the same
chain inside one persistent kernel, its links separated by grid barriers instead of kernel boundaries.

A batch-1 step of the 830M models runs about 160 (baseline) or 200 (MTA) kernels one after another, each
depending on the one before. Per link it reports the graph's replay time over the chain's length (the
replay of a two-link graph subtracted), for grids of a few to several hundred programs: what every kernel
boundary costs before any work. In each link every program adds 1 to the block the next program wrote in
the link before, so each link depends on another program's writes and the chain's result is checked: a
barrier that let a program read too early would leave a smaller sum.

The persistent form is what a megakernel-style decode step would pay per phase instead of a kernel
boundary: every program arrives at an atomic counter and spins until all have (so all programs must be
resident at once, which the grids here are).

    python benchmarks/launch_chain.py [--links 256] [--programs 1 16 132 528] [--out FILE]

Without CUDA (TRITON_INTERPRET=1) it only runs both chains once and checks their results; the persistent
one on one program, since the interpreter runs programs one after another and a barrier over several
would never open (so only a GPU run checks the barrier itself).
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
    """dst = src + 1, this program's BLOCK elements of dst from the next program's of src (src_ptr, dst_ptr
    [programs * BLOCK] fp32)."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)
    pid, arange = tl.program_id(0), tl.arange(0, BLOCK)
    src = (pid + 1) % tl.num_programs(0) * BLOCK + arange
    tl.store(dst_ptr + pid * BLOCK + arange, tl.load(src_ptr + src) + 1.0)


@triton.jit
def _persistent_chain_kernel(buf_ptr, count_ptr, links, BLOCK: tl.constexpr):
    """`links` of _link_kernel's links in one launch, alternating buf_ptr's halves (buf_ptr [2, programs *
    BLOCK] fp32), with a grid barrier after each; count_ptr [1] int32, zero at launch, counts arrivals."""
    pid, programs, arange = tl.program_id(0), tl.num_programs(0), tl.arange(0, BLOCK)
    half = programs * BLOCK
    src, dst = (pid + 1) % programs * BLOCK + arange, pid * BLOCK + arange
    for i in range(links):
        # .cg: read from L2, where the other programs' stores are, not from a stale line in this SM's L1
        vals = tl.load(buf_ptr + i % 2 * half + src, cache_modifier=".cg")
        tl.store(buf_ptr + (i + 1) % 2 * half + dst, vals + 1.0)
        # every thread's stores before the release and every read after the acquire, as CUDA's grid sync
        # orders them
        tl.debug_barrier()
        _grid_barrier(count_ptr, (i + 1) * programs)
        tl.debug_barrier()


@triton.jit
def _grid_barrier(count_ptr, target):
    """Arrive at the counter (count_ptr [1] int32) and wait until it reaches `target`. One atomic, whose
    result may already open the barrier; then plain acquire loads, which every program can poll at once
    where atomics on one address would queue."""
    seen = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while seen < target:
        seen = tl.inline_asm_elementwise("ld.acquire.gpu.global.u32 $0, [$1];", "=r,l", [count_ptr],
                                         dtype=tl.int32, is_pure=False, pack=1)


def run_chain(bufs: tuple[torch.Tensor, torch.Tensor], links: int, level: int) -> None:
    """`links` launches alternating bufs[0] -> bufs[1] -> bufs[0] ..."""
    launch = dict(PDL=level, launch_pdl=True) if level else dict(PDL=0)
    grid = (bufs[0].numel() // BLOCK,)
    for i in range(links):
        _link_kernel[grid](bufs[i % 2], bufs[(i + 1) % 2], BLOCK=BLOCK, **launch)


def run_persistent(bufs: tuple[torch.Tensor, torch.Tensor], links: int, count: torch.Tensor) -> None:
    """The chain of run_chain over bufs (two halves of one [2, programs * BLOCK] tensor) in one launch."""
    count.zero_()
    _persistent_chain_kernel[(bufs[0].numel() // BLOCK,)](bufs[0], count, links, BLOCK=BLOCK)


def replay_us(programs: int, links: int, level: int | None, replays: int) -> float:
    """Median replay time (µs) of a CUDA graph of the chain (level: its PDL level, or None for the persistent
    kernel); checks the chain added `links` per replay."""
    halves = torch.zeros(2, programs * BLOCK, device="cuda")
    bufs, count = (halves[0], halves[1]), torch.zeros(1, dtype=torch.int32, device="cuda")

    def run():
        run_chain(bufs, links, level) if level is not None else run_persistent(bufs, links, count)

    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    halves.zero_()
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
    """A row per grid size and form: the chain of kernels at each PDL level, then the persistent kernel."""
    levels = pdl.LEVELS if torch.cuda.get_device_capability()[0] >= 9 else (0,)
    # the persistent kernel's programs must all be resident at once, or its first barrier never opens: 8 small
    # programs per SM surely are
    resident = 8 * torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for n in programs:
        if n > resident:
            print(f"{n:5d} programs: the grid-barrier form is skipped (more than {resident} may not be resident)")
        for level in (*levels, None) if n <= resident else levels:
            two, many = replay_us(n, 2, level, replays), replay_us(n, links, level, replays)
            form = "kernels" if level is not None else "grid barrier"
            rows.append(dict(programs=n, form=form, pdl=level, links=links, replay_us=many,
                             us_per_link=(many - two) / (links - 2)))
            label = f"PDL {level}" if level is not None else "grid barrier"
            print(f"{n:5d} programs  {label:>12}: {rows[-1]['us_per_link']:.2f} us per link "
                  f"({many:.1f} us for {links})", flush=True)
    return rows


def check_eagerly(links: int) -> None:
    """Both chains' sums without CUDA (the interpreter): the kernels over two programs, the persistent kernel
    over one."""
    bufs = (torch.zeros(2 * BLOCK), torch.zeros(2 * BLOCK))
    run_chain(bufs, links, 0)
    check(bufs, links, 1)
    halves = torch.zeros(2, BLOCK)
    run_persistent((halves[0], halves[1]), links, torch.zeros(1, dtype=torch.int32))
    check((halves[0], halves[1]), links, 1)
    print(f"{links} links checked on the CPU (kernels and persistent); timing needs CUDA")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--links", type=int, default=256, help="kernels in the chain (even)")
    p.add_argument("--programs", nargs="+", type=int, default=[1, 16, 132, 528])
    p.add_argument("--replays", type=int, default=22)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "launch_chain.json"))
    args = p.parse_args()
    if args.links < 4 or args.links % 2 or min(args.programs) < 1:
        p.error("--links must be even and at least 4; --programs at least 1")
    if args.links * max(args.programs) >= 2**31:
        p.error("--links x --programs must stay below 2^31 (the grid barrier's int32 counter)")
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
