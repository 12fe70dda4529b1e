"""Paged causal attention without MTA operations, in Triton: the fast path for baseline layers.

Same work items as `mta_attention` (tiles of BM query rows of one sequence, key range split for
flash-decoding), but every head is independent and the softmax is a single online pass: a program owns one
(tile, split, head), keeps its output rows in registers and writes them with their running max and sum of
exp; `_combine_kernel` merges the splits. The step's queries come from `q`, keys and values from the cache.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from .work_items import (SPLIT_CHUNK, WorkItems, cache_slots, dot_width, exp_minus, qk_tile, split_key_tiles,
                         work_item)


def paged_flash_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, work: WorkItems,
                          out: torch.Tensor, block_n: int | None = None, num_warps: int = 4,
                          decode_dot: bool = True, num_splits: int | None = None) -> torch.Tensor:
    """q [N, H, d]; k_cache, v_cache [num_blocks, bs, G, d] already holding the step's tokens; writes the
    work items' rows of out [N, H, d].

    decode_dot: one-row tiles (decode) run as 16-row tl.dot tiles of which only the first row is real.
    The extra arithmetic is free in a bandwidth-bound kernel, and Triton software-pipelines the K/V loads of
    a loop that feeds tl.dot (a broadcast-sum loop waits on each tile's loads). block_n: keys per tile,
    by default 64 (H200, 830M heads: benchmarks/kernels.py --sweep plain for prompt tiles; the engine's
    decode tiles: mta_serve.triton_attention.flash_block_n).
    num_splits: key splits, by default work.num_splits."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    num_work, splits = work.work_seq.numel(), num_splits or work.num_splits
    if num_work == 0:
        return out
    bm = max(work.block_m, 16) if work.block_m > 1 or decode_dot else 1
    block_n = block_n or 64
    partial = torch.empty(num_work, splits, n_heads, bm, head_dim, dtype=torch.float32, device=q.device)
    stats = torch.empty(2, num_work, splits, n_heads, bm, dtype=torch.float32, device=q.device)
    meta = dict(H=n_heads, GROUP=n_heads // k_cache.shape[2], D=head_dim, DP=dot_width(head_dim),
                BM=bm, SPLITS=splits)
    _flash_kernel[(num_work * n_heads, splits)](
        q, k_cache, v_cache, work.block_tables, work.block_tables.stride(0), work.seq_start, work.seq_end,
        work.seq_row, work.work_seq, work.work_first, partial, stats, num_work, 1.0 / math.sqrt(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BN=block_n, TILE=work.block_m, FP32=q.dtype == torch.float32, **meta,
        num_warps=num_warps, **pdl.options(q))
    # One-row tiles merge in one warp (H200, benchmarks/combine_sweep.py: the layer at 64 x 2048 230 -> 228 us,
    # at 256 x 2048 861 -> 849 us; at batch 1 the same, where the 32-split loads had taken the 830M baseline
    # step's combine time 152 -> 58 us).
    _flash_combine_kernel[(num_work, n_heads)](
        partial, stats, out, work.seq_start, work.seq_end, work.seq_row, work.work_seq, work.work_first,
        num_work, TILE=work.block_m, SC=SPLIT_CHUNK, **meta, num_warps=1 if work.block_m == 1 else num_warps,
        **pdl.options(q))
    return out


@triton.jit(do_not_specialize=["bt_stride", "num_work", "SPLITS"])
def _flash_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, bt_stride, seq_start_ptr, seq_end_ptr, seq_row_ptr,
                  work_seq_ptr, work_first_ptr, part_ptr, stats_ptr, num_work, sm_scale,
                  BLOCK_SIZE: tl.constexpr, BN: tl.constexpr, TILE: tl.constexpr, FP32: tl.constexpr,
                  H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr,
                  SPLITS, PDL: tl.constexpr):
    """One (tile, split, head): online softmax over the split's keys; rows [BM] (>= TILE, padded for dot).
    Heads vary fastest in the grid, so the programs running together read all heads of the same keys:
    whole 3 KB cache rows rather than 192-byte pieces of many (H200, 256 x 2048: 0.912 -> 0.852 ms)."""
    pdl.wait(PDL)
    w, h, split = tl.program_id(0) // H, tl.program_id(0) % H, tl.program_id(1)
    first, start, end, row0, last_row, bt = work_item(w, work_seq_ptr, work_first_ptr, seq_start_ptr, seq_end_ptr,
                                                      seq_row_ptr, bt_ptr, bt_stride, TILE)
    rows = first + tl.arange(0, BM)
    offs_d = tl.arange(0, DP)
    dmask = offs_d[None, :] < D
    row_ok = rows <= last_row
    q = tl.load(q_ptr + ((row0 + rows - start) * H + h).to(tl.int64)[:, None] * D + offs_d[None, :],
                mask=row_ok[:, None] & dmask, other=0.0)
    m = tl.full((BM,), float("-inf"), tl.float32)
    l = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    kv_head = h // GROUP
    t0, t1 = split_key_tiles(last_row, split, BN, SPLITS)
    for t in range(t0, t1):
        keys = t * BN + tl.arange(0, BN)
        key_ok = keys <= last_row
        slots = cache_slots(bt, keys, key_ok, BLOCK_SIZE)
        kv_offs = (slots * (H // GROUP) + kv_head)[:, None] * D + offs_d[None, :]
        k = tl.load(k_ptr + kv_offs, mask=key_ok[:, None] & dmask, other=0.0)
        v = tl.load(v_ptr + kv_offs, mask=key_ok[:, None] & dmask, other=0.0)
        s = qk_tile(q, k, BM == 1, FP32)
        s = tl.where((keys[None, :] <= rows[:, None]) & key_ok[None, :], s * sm_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = exp_minus(s, m_safe[:, None])
        alpha = exp_minus(m, m_safe)
        l = l * alpha + tl.sum(p, axis=1)
        if BM == 1:
            acc = acc * alpha[:, None] + tl.sum(tl.trans(p) * v.to(tl.float32), axis=0)[None, :]
        elif FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    base = (w * SPLITS + split) * H + h
    r = tl.arange(0, BM)
    in_tile = r < TILE  # a decode tile padded to 16 rows writes only its real row
    tl.store(part_ptr + (base * BM + r).to(tl.int64)[:, None] * D + offs_d[None, :], acc,
             mask=in_tile[:, None] & dmask)
    tl.store(stats_ptr + base * BM + r, m, mask=in_tile)
    tl.store(stats_ptr + num_work * SPLITS * H * BM + base * BM + r, l, mask=in_tile)


@triton.jit(do_not_specialize=["num_work", "SPLITS"])
def _flash_combine_kernel(part_ptr, stats_ptr, out_ptr, seq_start_ptr, seq_end_ptr, seq_row_ptr, work_seq_ptr,
                          work_first_ptr, num_work, TILE: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr,
                          D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, SPLITS, SC: tl.constexpr,
                          PDL: tl.constexpr):
    """Merge the splits' (acc, max, sum) of one tile and head into normalized output rows."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)  # the o-projection after it requests its weights early
    w, h = tl.program_id(0), tl.program_id(1)
    seq = tl.load(work_seq_ptr + w)
    first = tl.load(work_first_ptr + w)
    end = tl.load(seq_end_ptr + seq)
    out_row = tl.load(seq_row_ptr + seq) + first - tl.load(seq_start_ptr + seq)
    offs_d = tl.arange(0, DP)[None, :]
    sums = num_work * SPLITS * H * BM
    if TILE == 1:
        r = tl.arange(0, 1)[:, None]
        acc = _combine_one_row(part_ptr, stats_ptr, sums, w, h, SPLITS, H, D, DP, BM, SC)
    else:
        r = tl.arange(0, BM)[:, None]
        acc = _combine_rows(part_ptr, stats_ptr, sums, w, h, SPLITS, TILE, H, D, DP, BM)
    ok = (r < TILE) & (first + r < end) & (offs_d < D)
    tl.store(out_ptr + ((out_row + r) * H + h).to(tl.int64) * D + offs_d, acc.to(out_ptr.dtype.element_ty),
             mask=ok)


@triton.jit
def _combine_rows(part_ptr, stats_ptr, sums, w, h, SPLITS, TILE: tl.constexpr, H: tl.constexpr,
                  D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr):
    """Output rows [BM, DP] of a tile: its splits merged one at a time. part_ptr [work, SPLITS, H, BM, D];
    stats_ptr [2, work, SPLITS, H, BM] (max, then sum of exp `sums` elements further)."""
    r = tl.arange(0, BM)
    offs_d = tl.arange(0, DP)[None, :]
    in_tile = r < TILE
    m = tl.full((BM,), float("-inf"), tl.float32)
    for s in range(SPLITS):
        m = tl.maximum(m, tl.load(stats_ptr + ((w * SPLITS + s) * H + h) * BM + r, mask=in_tile,
                                  other=float("-inf")))
    m = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((BM,), tl.float32)
    acc = tl.zeros((BM, DP), tl.float32)
    for s in range(SPLITS):
        base = (w * SPLITS + s) * H + h
        m_s = tl.load(stats_ptr + base * BM + r, mask=in_tile, other=float("-inf"))
        scale = tl.where(m_s == float("-inf"), 0.0, exp_minus(m_s, m))
        l += scale * tl.load(stats_ptr + sums + base * BM + r, mask=in_tile, other=0.0)
        acc += scale[:, None] * tl.load(part_ptr + (base * BM + r).to(tl.int64)[:, None] * D + offs_d,
                                        mask=in_tile[:, None] & (offs_d < D), other=0.0)
    return acc / tl.where(l == 0.0, 1.0, l)[:, None]


@triton.jit
def _combine_one_row(part_ptr, stats_ptr, sums, w, h, SPLITS, H: tl.constexpr, D: tl.constexpr,
                     DP: tl.constexpr, BM: tl.constexpr, SC: tl.constexpr):
    """The output row [1, DP] of a one-row tile (decode): SC splits per load, merged by online softmax.
    part_ptr [work, SPLITS, H, BM, D]; stats_ptr [2, work, SPLITS, H, BM]; only row 0 of the BM is real."""
    s = tl.arange(0, SC)[:, None]
    offs_d = tl.arange(0, DP)[None, :]
    m = tl.full((1, 1), float("-inf"), tl.float32)
    l = tl.zeros((1, 1), tl.float32)
    acc = tl.zeros((1, DP), tl.float32)
    for s0 in range(0, SPLITS, SC):
        base = (w * SPLITS + s0 + s) * H + h  # [SC, 1]; row 0 of each split's BM rows
        ok = s0 + s < SPLITS
        m_s = tl.load(stats_ptr + base * BM, mask=ok, other=float("-inf"))
        l_s = tl.load(stats_ptr + sums + base * BM, mask=ok, other=0.0)
        part = tl.load(part_ptr + (base * BM).to(tl.int64) * D + offs_d, mask=ok & (offs_d < D), other=0.0)
        m_new = tl.maximum(m, tl.max(m_s, axis=0)[None, :])
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.where(m_s == float("-inf"), 0.0, exp_minus(m_s, m_safe))  # [SC, 1]
        alpha = exp_minus(m, m_safe)
        l = l * alpha + tl.sum(scale * l_s, axis=0)[None, :]
        acc = acc * alpha + tl.sum(scale * part, axis=0)[None, :]
        m = m_new
    return acc / tl.where(l == 0.0, 1.0, l)
