"""A step's query rows as work items for the paged attention kernels, and the device helpers they share."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(slots=True)
class WorkItems:
    """Query-row tiles of a step, for one launch. Built once per step and shared by every layer."""

    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_start: torch.Tensor  # [num_seqs] int32: first position computed in this step
    seq_end: torch.Tensor  # [num_seqs] int32: sequence length after this step
    seq_row: torch.Tensor  # [num_seqs] int32: row of position seq_start in the step's q / output
    work_seq: torch.Tensor  # [num_work] int32: the sequence of each tile
    work_first: torch.Tensor  # [num_work] int32: first query position of each tile
    block_m: int  # rows per tile (a power of two)
    num_splits: int  # key-range splits per tile (flash-decoding)
    max_len: int  # the longest sequence among the work items


def tile_rows(starts: list[int], ends: list[int], block_m: int,
              only: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(work_seq, work_first): tiles of block_m rows covering positions [start, end) of every sequence (or
    of those in `only`)."""
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m}: the kernels need a power of two")
    work_seq, work_first = [], []
    for i in range(len(starts)) if only is None else only:
        for first in range(starts[i], ends[i], block_m):
            work_seq.append(i)
            work_first.append(first)
    return work_seq, work_first


def build_work_items(block_tables: torch.Tensor, starts: list[int], ends: list[int], rows: list[int],
                     block_m: int, num_splits: int, device, only: list[int] | None = None) -> WorkItems:
    """WorkItems of tile_rows(...), each array its own upload (tests and benchmarks; the engine packs a
    step's arrays into one upload, triton_attention.StepUploader)."""
    work_seq, work_first = tile_rows(starts, ends, block_m, only)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    chosen = range(len(starts)) if only is None else only
    return WorkItems(block_tables, i32(starts), i32(ends), i32(rows), i32(work_seq), i32(work_first),
                     block_m, num_splits, max((ends[i] for i in chosen), default=0))


def dot_width(head_dim: int) -> int:
    """Head size padded to a power of two of at least 16, the smallest inner size tl.dot accepts."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def cache_slots(bt_ptr, pos, valid, BLOCK_SIZE: tl.constexpr):
    """Cache slots (int64) of positions `pos` of the sequence whose block-table row is bt_ptr."""
    safe = tl.where(valid, pos, 0)
    block = tl.load(bt_ptr + safe // BLOCK_SIZE, mask=valid, other=0)
    return block.to(tl.int64) * BLOCK_SIZE + safe % BLOCK_SIZE
