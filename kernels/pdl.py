"""Programmatic dependent launch (PDL, compute capability 9.0 and later): a kernel launched with it is set up
while the kernel before it in the stream finishes, and its programs start as that kernel's programs exit.
Each such kernel first waits (griddepcontrol.wait) until the kernel before it has finished and its writes are
visible, before touching memory, so it sees everything that kernel (and, since every kernel in the chain
waits, every kernel before) wrote. What it hides is the gap between one kernel's last program and the next
one's first, which a batch-1 decode step pays once per launch (about 300 for the 830M models).

H200, `benchmarks/step_profile.py --batch 1`, graphs on, MTA_SERVE_PDL=0 and 1 interleaved twice in one
session at 3f3ca35: 830M MTA 1.516 / 1.514 -> 1.403 / 1.405 ms, 830M baseline 1.153 / 1.152 -> 1.116 /
1.120 ms. In a first experiment on another machine (baseline only) batch 1 went 1.150 -> 1.038 ms and batch
64 stayed at 6.53 ms; letting the next kernel launch right after the wait (griddepcontrol.launch_dependents)
gave 1.063 ms there. The MTA attention kernels do not take PDL yet. On by default where the GPU has it;
MTA_SERVE_PDL=0 turns it off.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _available(device_index: int) -> bool:
    return os.environ.get("MTA_SERVE_PDL", "1") != "0" and torch.cuda.get_device_capability(device_index)[0] >= 9


def options(x: torch.Tensor) -> dict:
    """The launch arguments of a kernel taking `PDL: tl.constexpr`, for tensors on x's device."""
    on = x.is_cuda and _available(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


@triton.jit
def wait(PDL: tl.constexpr):
    """The first thing a kernel taking PDL does: wait for the kernel before it to finish and its writes to show."""
    if PDL:
        tl.extra.cuda.gdc_wait()
