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
    seq_state: torch.Tensor | None = None  # [num_seqs] int32: each sequence's MTA state slot (ConvState)


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
                     block_m: int, num_splits: int, device, only: list[int] | None = None,
                     states: list[int] | None = None) -> WorkItems:
    """WorkItems of tile_rows(...), each array its own upload (tests and benchmarks; the engine packs a
    step's arrays into one upload, triton_attention.StepUploader)."""
    work_seq, work_first = tile_rows(starts, ends, block_m, only)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    chosen = range(len(starts)) if only is None else only
    return WorkItems(block_tables, i32(starts), i32(ends), i32(rows), i32(work_seq), i32(work_first),
                     block_m, num_splits, max((ends[i] for i in chosen), default=0),
                     None if states is None else i32(states))


# Splits a combine step reads at once ([SPLIT_CHUNK] statistics, [SPLIT_CHUNK, D] partial rows): a loop over
# the splits one load at a time waits on each load in turn, and a decode row has few programs to hide that.
# A constant (a power of two, for tl.arange), so split counts (runtime values) compile nothing new; the engine
# uses at most 32.
SPLIT_CHUNK = 32


def dot_width(head_dim: int) -> int:
    """Head size padded to a power of two of at least 16, the smallest inner size tl.dot accepts."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_parts(head_dim: int) -> tuple[int, int]:
    """(DA, DB): the head size as two tl.dot inner sizes, dims [0, DA) and [DA, DA + DB), where that pads
    less than dot_width alone (96 -> 64 + 32, 80 -> 64 + 16; DB = 0 where one part is as narrow: 128, 112,
    24). Kernels whose tiles hold every head pay the padding in shared memory, registers and products."""
    width = dot_width(head_dim)
    head = width // 2
    tail = dot_width(head_dim - head) if head_dim > head else 0
    return (head, tail) if head >= 16 and head + tail < width else (width, 0)


@triton.jit
def cache_slots(bt_ptr, pos, valid, BLOCK_SIZE: tl.constexpr):
    """Cache slots (int64) of positions `pos` of the sequence whose block-table row is bt_ptr."""
    safe = tl.where(valid, pos, 0)
    block = tl.load(bt_ptr + safe // BLOCK_SIZE, mask=valid, other=0)
    return block.to(tl.int64) * BLOCK_SIZE + safe % BLOCK_SIZE


@triton.jit
def work_item(w, work_seq_ptr, work_first_ptr, seq_start_ptr, seq_end_ptr, seq_row_ptr, bt_ptr, bt_stride,
              ROWS: tl.constexpr):
    """Work item w (ROWS rows at most): (first row, sequence start, end, row of the start in q/out, last row,
    the sequence's block-table row)."""
    seq = tl.load(work_seq_ptr + w)
    first = tl.load(work_first_ptr + w)
    end = tl.load(seq_end_ptr + seq)
    last = tl.minimum(first + ROWS, end) - 1
    return (first, tl.load(seq_start_ptr + seq), end, tl.load(seq_row_ptr + seq), last,
            bt_ptr + seq.to(tl.int64) * bt_stride)


@triton.jit
def split_key_tiles(last_key, split, BN: tl.constexpr, SPLITS):
    """This split's share [t0, t1) of the BN-key tiles covering keys 0..last_key."""
    num_tiles = tl.cdiv(last_key + 1, BN)
    per_split = tl.cdiv(num_tiles, SPLITS)
    t0 = split * per_split
    return t0, tl.minimum(t0 + per_split, num_tiles)


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def exp_minus(x, m):
    """exp(x - m) as exp2 of one multiply-add: tl.exp is a multiply, exp2 and a fix-up for tiny results, more
    instructions per element (an sm_90 build of the prompt post-conv's row loop: 589 -> 531 with exp_norm)."""
    return tl.exp2(x * LOG2E - m * LOG2E)


@triton.jit
def exp_norm(x, m, inv):
    """exp(x - m) * inv, the softmax of logits x with row max m and 1 / sum of exp inv, with the normalizer in
    the exponent (exp_minus); rows without keys (inv = 0) give 0."""
    log_inv = tl.where(inv > 0.0, tl.log2(tl.where(inv > 0.0, inv, 1.0)), float("-inf"))
    return tl.exp2(x * LOG2E - (m * LOG2E - log_inv))


@triton.jit
def qk_tile(q, k, ONE_ROW: tl.constexpr, FP32: tl.constexpr):
    """q [R, DP] . k [BN, DP]^T -> [R, BN] fp32: a broadcast sum for a single row (too few for tl.dot),
    exact fp32 products for fp32 inputs, tensor cores otherwise."""
    if ONE_ROW:
        return tl.sum(q.to(tl.float32) * k.to(tl.float32), axis=1)[None, :]
    if FP32:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    return tl.dot(q, tl.trans(k))
