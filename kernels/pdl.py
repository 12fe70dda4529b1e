"""Programmatic dependent launch (PDL, compute capability 9.0 and later): a kernel launched with it is set up
while the kernel before it in the stream finishes, and its programs may start before that kernel ends.
Each such kernel waits (griddepcontrol.wait) until the kernel before it has finished and its writes are
visible before it reads anything an earlier kernel writes, or writes anything, so it sees everything that
kernel (and, since every kernel in the chain waits, every kernel before) wrote. What it hides is the gap
between one kernel's last program and the next one's first, which a batch-1 decode step pays once per
launch (about 300 for the 830M models).

Levels (MTA_SERVE_PDL; by default 2 where the GPU has PDL):
- 0: off;
- 1: every kernel taking PDL waits first, and the next kernel's programs start as this one's exit;
- 2: also, `row_linear`'s kernels request their first piece of W (weights are not written while the model
  runs) before waiting, and let the next kernel launch (griddepcontrol.launch_dependents) as soon as they
  have requested it; the row norms and the last attention kernels (`_sum_splits_kernel`, paged flash's
  combine), each followed by a row product, let it launch right after their wait. So at batch 1 a row
  product's first weight reads overlap the kernel before it, and the kernel after it is set up while it runs.

H200, `benchmarks/step_profile.py --batch 1`, graphs on, 830M configs; each bullet is one machine and session:
- 3f3ca35, MTA_SERVE_PDL=0 and 1 interleaved twice: MTA 1.516 / 1.514 -> 1.403 / 1.405 ms, baseline 1.153 /
  1.152 -> 1.116 / 1.120 ms (then only the row products, norms, cache writes and paged flash took PDL);
- these levels (step_profile_h200_pdl_levels.json): a516a9c (PDL as at 3f3ca35, the old product loop)
  MTA 1.395 / 1.402 ms, baseline 1.114 / 1.116 ms; level 1 MTA 1.358, baseline 1.098; level 2 MTA 1.343 /
  1.339, baseline 1.076 / 1.074. Level 2 with the launch let after the wait instead: MTA 1.352 / 1.350 /
  1.349 / 1.353, baseline 1.085 / 1.084 / 1.083 / 1.086. At batch 64 that variant gave MTA 7.907 ms and
  baseline 6.532 ms, a516a9c 7.930 and 6.530 ms.
- the last attention kernels' early launch (a19dbdd against 6efe5cc, step_profile_h200_ab_cf41583_6efe5cc_a19dbdd.json):
  MTA 1.333 -> 1.307 ms, baseline 1.055 -> 1.025 ms.
In a first experiment (b65911b, baseline only) letting every kernel's successor launch right after the wait,
with nothing requested before it, was slower than level 1: 1.063 against 1.038 ms.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LEVELS = (0, 1, 2)


@functools.cache
def level(device_index: int) -> int:
    """The PDL level kernels on this device launch with: MTA_SERVE_PDL (default 2) on compute capability 9.0+,
    else 0."""
    text = os.environ.get("MTA_SERVE_PDL", "2")
    if text not in {str(n) for n in LEVELS}:
        raise ValueError(f"MTA_SERVE_PDL must be one of {', '.join(map(str, LEVELS))}, got {text!r}")
    return int(text) if torch.cuda.get_device_capability(device_index)[0] >= 9 else 0


def options(x: torch.Tensor) -> dict:
    """The launch arguments of a kernel taking `PDL: tl.constexpr`, for tensors on x's device."""
    on = level(x.device.index if x.device.index is not None else torch.cuda.current_device()) if x.is_cuda else 0
    return dict(PDL=on, launch_pdl=True) if on else dict(PDL=0)


@triton.jit
def wait(PDL: tl.constexpr):
    """Wait for the kernel before to finish and its writes to show: before any read of what a kernel writes."""
    if PDL >= 1:
        tl.extra.cuda.gdc_wait()


@triton.jit
def launch_dependents(PDL: tl.constexpr):
    """At level 2, let the next kernel launch (once every program of this one has got here or exited)."""
    if PDL >= 2:
        tl.extra.cuda.gdc_launch_dependents()
