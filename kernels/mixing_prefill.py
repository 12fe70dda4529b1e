"""Prompt groups of MTA layers without a key-query conv (head mixing only: wpsm, head_kernel or wposm) in
two fused passes over the keys, instead of mta_attention's row stages: no score, logit or probability rows
go through memory.

A program owns one group of BM query rows of one sequence, every head, and one split of the keys. Per key
tile it computes the [heads, BM, keys] scores with one batched tl.dot and mixes them across heads (wpsm),
then
1. `_mixed_stats_kernel` keeps each (head, row)'s running max and sum of exp -> per-split statistics, which
   mta_attention's `_normalizers_kernel` combines;
2. `_mixed_pv_kernel` computes the same logits again, normalizes them with the combined statistics, mixes
   the probabilities across heads (head_kernel / wposm) and accumulates P' V for every head -> per-split
   partial outputs, already normalized, which mta_attention's `_sum_splits_kernel` adds up.
The mixing needs every head's row before any head's softmax or output, so one program holds all heads;
the logits are computed once per pass. Extra memory: the per-split statistics and partial outputs,
O(groups x splits x heads x BM x d). The engine's `triton` backend runs mixing-only layers' prompt groups
through it (triton_attention: 16 rows, 16-key tiles, 8 warps, P' in the cache dtype). A program's operand
tiles ([heads, BM, d] queries, [heads, d, keys] keys, [heads, keys, d] values, buffered `num_stages` times
in the second pass and `stats_stages` in the first) must fit the GPU's shared memory: on the H200 at the
830M heads 16-row groups of 16-key tiles fit (at 1807f15, before the head-size parts below, 32 rows or 32
keys fit only with one buffer and were slower), and a wider model may not fit at all (Triton's
OutOfResources; the engine then falls back to the row pipeline).

Head sizes that are not a power of two run as two parts (work_items.dot_parts: 96 as 64 + 32) rather than
padded to the next power: every tile holds all heads, so the padding cost shared memory, registers and
products. H200, 830M heads (16 x 96), bf16, the engine's config (benchmarks/results/
kernels_h200_mixing_d_parts.json): 8192 tokens 8.49 -> 7.05 ms, 2048 tokens 0.696 -> 0.593 ms; with the first
pass's key tiles in one buffer (an sm_90 build: 128 registers and 81 KiB of shared memory, so two programs
per SM where two buffers' 113 KiB allowed one) 6.95 and 0.585 ms.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from .fused_ops import CAST_ONLY, HeadNormGate
from .mta_attention import (MTALayerParams, _mix, _normalizers_kernel, _running_max_sum, _sum_splits_kernel,
                            split_dot)
from .work_items import (SPLIT_CHUNK, WorkItems, cache_slots, dot_parts, dot_width, exp_norm, split_key_tiles,
                         work_item)

def mixing_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, params: MTALayerParams,
                             work: WorkItems, out: torch.Tensor, key_tile: int = 16, num_splits: int = 1,
                             num_warps: int = 4, pv_in_cache_dtype: bool = False,
                             num_stages: int = 2, head_norm: HeadNormGate = CAST_ONLY,
                             stats_stages: int = 1) -> torch.Tensor:
    """Rows of the work items (groups of work.block_m >= 16 rows, the rows of a tl.dot) into `out` [N, H, d]
    for a layer whose params have no pre- or post-softmax conv. q [N, H, d]: the step's queries; k_cache,
    v_cache [num_blocks, bs, G, d] already holding the step's tokens. Keys in `num_splits` splits of
    `key_tile`-key tiles (powers of two, key_tile >= 16). For 16-bit caches P'V runs as two 16-bit
    products of P' split into a head and a remainder (about fp32's accuracy), or with `pv_in_cache_dtype`
    as one, on P' rounded to the cache dtype as flash attention does (an accuracy the GPU test bounds at
    1e-2). `num_stages` buffers of each key / value tile of the second pass in shared memory (Triton's Hopper
    default, 3, overflowed the H200's 227 KiB at 10 heads x 128, 16 rows and 16 keys, when P'V took the
    values in fp32), `stats_stages` of each key tile of the first. The last kernel casts each output row to out's dtype
    and applies `head_norm` (steps 8-9) to it."""
    if params.pre_kernel is not None or params.post_kernel is not None:
        raise ValueError("mixing_prefill_attention serves layers without a key-query conv; "
                         "use mta_attention.mta_paged_attention")
    if work.block_m < 16 or key_tile < 16:
        raise ValueError(f"block_m={work.block_m}, key_tile={key_tile}: tl.dot needs 16 rows and 16 keys")
    num_items = work.work_seq.numel()
    if num_items == 0:
        return out
    n_heads, head_dim, bm = q.shape[1], q.shape[2], work.block_m
    f32 = dict(dtype=torch.float32, device=q.device)
    stats = torch.empty(2, num_items, num_splits, n_heads, bm, **f32)  # per split: max, sum of exp
    norms = torch.empty(2, num_items, n_heads, bm, **f32)  # max, 1 / sum of exp
    partial = torch.empty(num_items, num_splits, n_heads, bm, head_dim, **f32)  # per split: P'V
    dummy = torch.empty(1, **f32)
    seq = (work.block_tables, work.block_tables.stride(0), work.seq_start, work.seq_end, work.seq_row,
           work.work_seq, work.work_first)
    da, db = dot_parts(head_dim)
    c = dict(H=n_heads, GROUP=n_heads // k_cache.shape[2], D=head_dim, DA=da, DB=db,
             HB=triton.next_power_of_2(n_heads), BM=bm, BN=key_tile, BLOCK_SIZE=k_cache.shape[1],
             PRE_MIX=params.pre_mix is not None, FP32=q.dtype == torch.float32)
    pre_mix = dummy if params.pre_mix is None else params.pre_mix
    post_mix = dummy if params.post_mix is None else params.post_mix
    scale = 1.0 / math.sqrt(head_dim)
    launch = pdl.options(q)
    _mixed_stats_kernel[(num_items, num_splits)](q, k_cache, pre_mix, stats, scale, *seq, num_splits, **c,
                                                 num_warps=num_warps, num_stages=stats_stages, **launch)
    _normalizers_kernel[(num_items, n_heads)](stats, norms, H=n_heads, RL=bm, SPLITS=num_splits, RLP=bm,
                                              SC=SPLIT_CHUNK, num_warps=num_warps, **launch)
    _mixed_pv_kernel[(num_items, num_splits)](q, k_cache, v_cache, pre_mix, post_mix, norms, partial, scale, *seq,
                                              num_splits, POST_MIX=params.post_mix is not None,
                                              P16=pv_in_cache_dtype and q.dtype != torch.float32, **c,
                                              num_warps=num_warps, num_stages=num_stages, **launch)
    _sum_splits_kernel[(num_items, n_heads)](partial, out, 0, *seq, H=n_heads, D=head_dim, DP=dot_width(head_dim),
                                             RO=bm, SPLITS=num_splits, SC=SPLIT_CHUNK,
                                             num_warps=num_warps, **head_norm.kernel_args(dummy), **launch)
    return out


# ---- device code --------------------------------------------------------------------------------------
# q_ptr [N, H, D]; k_ptr, v_ptr [blocks, BLOCK_SIZE, H / GROUP, D]; pre_mix_ptr, post_mix_ptr [H, H] fp32
# (out, in); stats_ptr [2, items, SPLITS, H, BM]: max, sum of exp; norm_ptr [2, items, H, BM]: max,
# 1 / sum of exp; part_ptr [items, SPLITS, H, BM, D] fp32; bt_ptr [seqs, bt_stride] int32 and the other
# sequence / work-item arrays as in work_items.WorkItems.

@triton.jit
def _group_queries(q_ptr, rows, start, row0, last, D0: tl.constexpr, DW: tl.constexpr, H: tl.constexpr,
                   D: tl.constexpr, HB: tl.constexpr):
    """Dims [D0, D0 + DW) of the group's queries: [HB, BM, DW] (zero outside the heads, rows and head size)."""
    h3 = tl.arange(0, HB)[:, None, None]
    r3 = rows[None, :, None]
    d3 = D0 + tl.arange(0, DW)[None, None, :]
    ok = (h3 < H) & (r3 <= last) & (d3 < D)
    return tl.load(q_ptr + ((row0 + tl.where(ok, r3 - start, 0)) * H + h3).to(tl.int64) * D + d3, mask=ok, other=0.0)


@triton.jit
def _head_tile(x_ptr, slots, key_ok, D0: tl.constexpr, DW: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr,
               D: tl.constexpr, HB: tl.constexpr, KEYS_LAST: tl.constexpr):
    """Dims [D0, D0 + DW) of every head's keys or values at cache `slots` [BN]: [HB, DW, BN] with KEYS_LAST
    (keys, the right operand of Q K^T), else [HB, BN, DW] (values)."""
    h3 = tl.arange(0, HB)[:, None, None]
    if KEYS_LAST:
        d3 = D0 + tl.arange(0, DW)[None, :, None]
        s3 = slots[None, None, :]
        ok = key_ok[None, None, :]
    else:
        d3 = D0 + tl.arange(0, DW)[None, None, :]
        s3 = slots[None, :, None]
        ok = key_ok[None, :, None]
    return tl.load(x_ptr + (s3 * (H // GROUP) + h3 // GROUP) * D + d3, mask=(h3 < H) & (d3 < D) & ok, other=0.0)


@triton.jit
def _qk(q3, k_ptr, slots, key_ok, s, D0: tl.constexpr, DW: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr,
        D: tl.constexpr, HB: tl.constexpr, FP32: tl.constexpr):
    """s + the queries' dims [D0, D0 + DW) (q3) times the keys' at `slots`: [HB, BM, BN]."""
    k3 = _head_tile(k_ptr, slots, key_ok, D0, DW, H, GROUP, D, HB, True)
    if FP32:
        return tl.dot(q3, k3, s, input_precision="ieee")
    return tl.dot(q3, k3, s)


@triton.jit
def _mixed_logits(q3, q3b, k_ptr, pre_mix_ptr, slots, keys, key_ok, rows, last, sm_scale, H: tl.constexpr,
                  GROUP: tl.constexpr, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HB: tl.constexpr,
                  BM: tl.constexpr, BN: tl.constexpr, PRE_MIX: tl.constexpr, FP32: tl.constexpr):
    """Pre-mixed logits [HB, BM, BN] of the group's rows (queries' dims [0, DA) in q3, [DA, DA + DB) in q3b)
    and the keys at cache `slots` [BN]: -inf where a key is after its row or a row after the group's last
    (spec steps 1-4 without a conv)."""
    s = _qk(q3, k_ptr, slots, key_ok, tl.zeros((HB, BM, BN), tl.float32), 0, DA, H, GROUP, D, HB, FP32)
    if DB > 0:
        s = _qk(q3b, k_ptr, slots, key_ok, s, DA, DB, H, GROUP, D, HB, FP32)
    causal = (keys[None, None, :] <= rows[None, :, None]) & (rows[None, :, None] <= last)
    s = tl.where(causal, s * sm_scale, 0.0)
    if PRE_MIX:
        s = _mix(pre_mix_ptr, s, H, HB, BM, BN, True)  # exact fp32 products, as mta_attention's _logits
    return tl.where(causal, s, float("-inf"))


@triton.jit
def _queries(q_ptr, rows, start, row0, last, H: tl.constexpr, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
             HB: tl.constexpr):
    """The group's queries as dims [0, DA) and [DA, DA + DB) (the first again where DB is 0, unused)."""
    q3 = _group_queries(q_ptr, rows, start, row0, last, 0, DA, H, D, HB)
    q3b = q3
    if DB > 0:
        q3b = _group_queries(q_ptr, rows, start, row0, last, DA, DB, H, D, HB)
    return q3, q3b


@triton.jit(do_not_specialize=["bt_stride", "SPLITS"])
def _mixed_stats_kernel(q_ptr, k_ptr, pre_mix_ptr, stats_ptr, sm_scale, bt_ptr, bt_stride, seq_start_ptr,
                        seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, SPLITS, H: tl.constexpr,
                        GROUP: tl.constexpr, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, HB: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRE_MIX: tl.constexpr,
                        FP32: tl.constexpr, PDL: tl.constexpr):
    """This split's max and sum of exp of the group's mixed logit rows, per head."""
    pdl.wait(PDL)
    b, split = tl.program_id(0), tl.program_id(1)
    first, start, end, row0, last, bt = work_item(b, work_seq_ptr, work_first_ptr, seq_start_ptr, seq_end_ptr,
                                                  seq_row_ptr, bt_ptr, bt_stride, BM)
    rows = first + tl.arange(0, BM)
    q3, q3b = _queries(q_ptr, rows, start, row0, last, H, D, DA, DB, HB)
    m = tl.full((HB, BM), float("-inf"), tl.float32)
    l = tl.zeros((HB, BM), tl.float32)
    t0, t1 = split_key_tiles(last, split, BN, SPLITS)
    for t in range(t0, t1):
        keys = t * BN + tl.arange(0, BN)
        key_ok = keys <= last
        x = _mixed_logits(q3, q3b, k_ptr, pre_mix_ptr, cache_slots(bt, keys, key_ok, BLOCK_SIZE), keys, key_ok,
                          rows, last, sm_scale, H, GROUP, D, DA, DB, HB, BM, BN, PRE_MIX, FP32)
        m, l = _running_max_sum(m, l, x)
    h2 = tl.arange(0, HB)[:, None]
    offs = ((b * SPLITS + split) * H + h2) * BM + tl.arange(0, BM)[None, :]
    tl.store(stats_ptr + offs, m, mask=h2 < H)
    tl.store(stats_ptr + tl.num_programs(0) * SPLITS * H * BM + offs, l, mask=h2 < H)


@triton.jit
def _pv(p, v_ptr, slots, key_ok, acc, D0: tl.constexpr, DW: tl.constexpr, H: tl.constexpr, GROUP: tl.constexpr,
        D: tl.constexpr, HB: tl.constexpr, FP32: tl.constexpr, P16: tl.constexpr):
    """acc [HB, BM, DW] + P' [HB, BM, BN] times the values' dims [D0, D0 + DW) at `slots`."""
    v3 = _head_tile(v_ptr, slots, key_ok, D0, DW, H, GROUP, D, HB, False)
    if FP32:
        return tl.dot(p, v3, acc, input_precision="ieee")
    if P16:
        return tl.dot(p.to(v3.dtype), v3, acc)
    return split_dot(p, v3, acc)


@triton.jit
def _store_part(part_ptr, acc, b, split, SPLITS, D0: tl.constexpr, DW: tl.constexpr, H: tl.constexpr,
                D: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr):
    h3 = tl.arange(0, HB)[:, None, None]
    d3 = D0 + tl.arange(0, DW)[None, None, :]
    offs = (((b * SPLITS + split) * H + h3) * BM + tl.arange(0, BM)[None, :, None]).to(tl.int64) * D + d3
    tl.store(part_ptr + offs, acc, mask=(h3 < H) & (d3 < D))


@triton.jit(do_not_specialize=["bt_stride", "SPLITS"])
def _mixed_pv_kernel(q_ptr, k_ptr, v_ptr, pre_mix_ptr, post_mix_ptr, norm_ptr, part_ptr, sm_scale, bt_ptr, bt_stride,
                     seq_start_ptr, seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, SPLITS,
                     H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr,
                     HB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     PRE_MIX: tl.constexpr, POST_MIX: tl.constexpr, FP32: tl.constexpr, P16: tl.constexpr,
                     PDL: tl.constexpr):
    """This split's sum over keys of P'[h, row, j] v_j for every head of the group (normalized already);
    P16: with P' in the values' 16-bit dtype. The values' dims [0, DA) and [DA, DA + DB) in two sums."""
    pdl.wait(PDL)
    b, split = tl.program_id(0), tl.program_id(1)
    first, start, end, row0, last, bt = work_item(b, work_seq_ptr, work_first_ptr, seq_start_ptr, seq_end_ptr,
                                                  seq_row_ptr, bt_ptr, bt_stride, BM)
    rows = first + tl.arange(0, BM)
    q3, q3b = _queries(q_ptr, rows, start, row0, last, H, D, DA, DB, HB)
    h3 = tl.arange(0, HB)[:, None, None]
    norm_offs = (b * H + h3) * BM + tl.arange(0, BM)[None, :, None]
    m = tl.load(norm_ptr + norm_offs, mask=h3 < H, other=0.0)  # [HB, BM, 1]
    inv = tl.load(norm_ptr + tl.num_programs(0) * H * BM + norm_offs, mask=h3 < H, other=0.0)
    acc = tl.zeros((HB, BM, DA), tl.float32)
    acc_b = tl.zeros((HB, BM, DB if DB > 0 else 16), tl.float32)  # (unused where DB is 0)
    t0, t1 = split_key_tiles(last, split, BN, SPLITS)
    for t in range(t0, t1):
        keys = t * BN + tl.arange(0, BN)
        key_ok = keys <= last
        slots = cache_slots(bt, keys, key_ok, BLOCK_SIZE)
        x = _mixed_logits(q3, q3b, k_ptr, pre_mix_ptr, slots, keys, key_ok, rows, last, sm_scale, H, GROUP, D, DA,
                          DB, HB, BM, BN, PRE_MIX, FP32)
        p = exp_norm(x, m, inv)
        if POST_MIX:
            p = _mix(post_mix_ptr, p, H, HB, BM, BN, FP32)
        acc = _pv(p, v_ptr, slots, key_ok, acc, 0, DA, H, GROUP, D, HB, FP32, P16)
        if DB > 0:
            acc_b = _pv(p, v_ptr, slots, key_ok, acc_b, DA, DB, H, GROUP, D, HB, FP32, P16)
    _store_part(part_ptr, acc, b, split, SPLITS, 0, DA, H, D, HB, BM)
    if DB > 0:
        _store_part(part_ptr, acc_b, b, split, SPLITS, DA, DB, H, D, HB, BM)
