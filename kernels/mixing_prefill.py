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
tiles ([heads, BM, d] queries, [heads, d, keys] keys, [heads, keys, d] values, each buffered `num_stages`
times) must fit the GPU's shared memory: on the H200 at the 830M heads 16-row groups of 16-key tiles with
two buffers fit and were fastest, 32 rows or 32 keys fit only with one buffer, and a wider model may not
fit at all (Triton's OutOfResources; the engine then falls back to the row pipeline).
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
from .work_items import SPLIT_CHUNK, WorkItems, cache_slots, dot_width, split_key_tiles, work_item

def mixing_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, params: MTALayerParams,
                             work: WorkItems, out: torch.Tensor, key_tile: int = 16, num_splits: int = 1,
                             num_warps: int = 4, pv_in_cache_dtype: bool = False,
                             num_stages: int = 2, head_norm: HeadNormGate = CAST_ONLY) -> torch.Tensor:
    """Rows of the work items (groups of work.block_m >= 16 rows, the rows of a tl.dot) into `out` [N, H, d]
    for a layer whose params have no pre- or post-softmax conv. q [N, H, d]: the step's queries; k_cache,
    v_cache [num_blocks, bs, G, d] already holding the step's tokens. Keys in `num_splits` splits of
    `key_tile`-key tiles (powers of two, key_tile >= 16). For 16-bit caches P'V runs as two 16-bit
    products of P' split into a head and a remainder (about fp32's accuracy), or with `pv_in_cache_dtype`
    as one, on P' rounded to the cache dtype as flash attention does (an accuracy the GPU test bounds at
    1e-2). `num_stages` buffers of each key / value tile in shared memory: Triton's Hopper default, 3,
    overflowed the H200's 227 KiB at 10 heads x 128 (16 rows, 16 keys) when P'V took the values in fp32
    (three tf32 products, before the two 16-bit ones). The last kernel casts each output row to out's dtype
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
    c = dict(H=n_heads, GROUP=n_heads // k_cache.shape[2], D=head_dim, DP=dot_width(head_dim),
             HB=triton.next_power_of_2(n_heads), BM=bm, BN=key_tile, BLOCK_SIZE=k_cache.shape[1],
             PRE_MIX=params.pre_mix is not None, FP32=q.dtype == torch.float32)
    pre_mix = dummy if params.pre_mix is None else params.pre_mix
    post_mix = dummy if params.post_mix is None else params.post_mix
    scale = 1.0 / math.sqrt(head_dim)
    launch = pdl.options(q)
    _mixed_stats_kernel[(num_items, num_splits)](q, k_cache, pre_mix, stats, scale, *seq, num_splits, **c,
                                                 num_warps=num_warps, num_stages=num_stages, **launch)
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
def _group_queries(q_ptr, rows, start, row0, last, H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   HB: tl.constexpr):
    """The group's queries [HB, BM, DP] (zero outside the heads, rows and head size)."""
    h3 = tl.arange(0, HB)[:, None, None]
    r3 = rows[None, :, None]
    d3 = tl.arange(0, DP)[None, None, :]
    ok = (h3 < H) & (r3 <= last) & (d3 < D)
    return tl.load(q_ptr + ((row0 + tl.where(ok, r3 - start, 0)) * H + h3).to(tl.int64) * D + d3, mask=ok, other=0.0)


@triton.jit
def _mixed_logits(q3, k_ptr, pre_mix_ptr, slots, keys, key_ok, rows, last, sm_scale, H: tl.constexpr,
                  GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, PRE_MIX: tl.constexpr, FP32: tl.constexpr):
    """Pre-mixed logits [HB, BM, BN] of the group's rows and the keys at cache `slots` [BN]: -inf where a key
    is after its row or a row after the group's last (spec steps 1-4 without a conv)."""
    h3 = tl.arange(0, HB)[:, None, None]
    d3 = tl.arange(0, DP)[None, :, None]
    k3 = tl.load(k_ptr + (slots[None, None, :] * (H // GROUP) + h3 // GROUP) * D + d3,
                 mask=(h3 < H) & (d3 < D) & key_ok[None, None, :], other=0.0)  # [HB, DP, BN]
    if FP32:
        s = tl.dot(q3, k3, input_precision="ieee")
    else:
        s = tl.dot(q3, k3)
    causal = (keys[None, None, :] <= rows[None, :, None]) & (rows[None, :, None] <= last)
    s = tl.where(causal, s * sm_scale, 0.0)
    if PRE_MIX:
        s = _mix(pre_mix_ptr, s, H, HB, BM, BN, True)  # exact fp32 products, as mta_attention's _logits
    return tl.where(causal, s, float("-inf"))


@triton.jit(do_not_specialize=["bt_stride", "SPLITS"])
def _mixed_stats_kernel(q_ptr, k_ptr, pre_mix_ptr, stats_ptr, sm_scale, bt_ptr, bt_stride, seq_start_ptr,
                        seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, SPLITS, H: tl.constexpr,
                        GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HB: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRE_MIX: tl.constexpr, FP32: tl.constexpr,
                        PDL: tl.constexpr):
    """This split's max and sum of exp of the group's mixed logit rows, per head."""
    pdl.wait(PDL)
    b, split = tl.program_id(0), tl.program_id(1)
    first, start, end, row0, last, bt = work_item(b, work_seq_ptr, work_first_ptr, seq_start_ptr, seq_end_ptr,
                                                  seq_row_ptr, bt_ptr, bt_stride, BM)
    rows = first + tl.arange(0, BM)
    q3 = _group_queries(q_ptr, rows, start, row0, last, H, D, DP, HB)
    m = tl.full((HB, BM), float("-inf"), tl.float32)
    l = tl.zeros((HB, BM), tl.float32)
    t0, t1 = split_key_tiles(last, split, BN, SPLITS)
    for t in range(t0, t1):
        keys = t * BN + tl.arange(0, BN)
        key_ok = keys <= last
        x = _mixed_logits(q3, k_ptr, pre_mix_ptr, cache_slots(bt, keys, key_ok, BLOCK_SIZE), keys, key_ok, rows,
                          last, sm_scale, H, GROUP, D, DP, HB, BM, BN, PRE_MIX, FP32)
        m, l = _running_max_sum(m, l, x)
    h2 = tl.arange(0, HB)[:, None]
    offs = ((b * SPLITS + split) * H + h2) * BM + tl.arange(0, BM)[None, :]
    tl.store(stats_ptr + offs, m, mask=h2 < H)
    tl.store(stats_ptr + tl.num_programs(0) * SPLITS * H * BM + offs, l, mask=h2 < H)


@triton.jit(do_not_specialize=["bt_stride", "SPLITS"])
def _mixed_pv_kernel(q_ptr, k_ptr, v_ptr, pre_mix_ptr, post_mix_ptr, norm_ptr, part_ptr, sm_scale, bt_ptr, bt_stride,
                     seq_start_ptr, seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, SPLITS,
                     H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HB: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRE_MIX: tl.constexpr,
                     POST_MIX: tl.constexpr, FP32: tl.constexpr, P16: tl.constexpr, PDL: tl.constexpr):
    """This split's sum over keys of P'[h, row, j] v_j for every head of the group (normalized already);
    P16: with P' in the values' 16-bit dtype."""
    pdl.wait(PDL)
    b, split = tl.program_id(0), tl.program_id(1)
    first, start, end, row0, last, bt = work_item(b, work_seq_ptr, work_first_ptr, seq_start_ptr, seq_end_ptr,
                                                  seq_row_ptr, bt_ptr, bt_stride, BM)
    rows = first + tl.arange(0, BM)
    q3 = _group_queries(q_ptr, rows, start, row0, last, H, D, DP, HB)
    h3 = tl.arange(0, HB)[:, None, None]
    r3 = tl.arange(0, BM)[None, :, None]
    d3 = tl.arange(0, DP)[None, None, :]
    norm_offs = (b * H + h3) * BM + r3
    m = tl.load(norm_ptr + norm_offs, mask=h3 < H, other=0.0)  # [HB, BM, 1]
    inv = tl.load(norm_ptr + tl.num_programs(0) * H * BM + norm_offs, mask=h3 < H, other=0.0)
    acc = tl.zeros((HB, BM, DP), tl.float32)
    t0, t1 = split_key_tiles(last, split, BN, SPLITS)
    for t in range(t0, t1):
        keys = t * BN + tl.arange(0, BN)
        key_ok = keys <= last
        slots = cache_slots(bt, keys, key_ok, BLOCK_SIZE)
        x = _mixed_logits(q3, k_ptr, pre_mix_ptr, slots, keys, key_ok, rows, last, sm_scale, H, GROUP, D, DP, HB,
                          BM, BN, PRE_MIX, FP32)
        p = tl.exp(x - m) * inv
        if POST_MIX:
            p = _mix(post_mix_ptr, p, H, HB, BM, BN, FP32)
        v3 = tl.load(v_ptr + (slots[None, :, None] * (H // GROUP) + h3 // GROUP) * D + d3,
                     mask=(h3 < H) & (d3 < D) & key_ok[None, :, None], other=0.0)  # [HB, BN, DP]
        if FP32:
            acc += tl.dot(p, v3, input_precision="ieee")
        elif P16:
            acc += tl.dot(p.to(v3.dtype), v3)
        else:
            acc = split_dot(p, v3, acc)
    offs = (((b * SPLITS + split) * H + h3) * BM + r3).to(tl.int64) * D + d3
    tl.store(part_ptr + offs, acc, mask=(h3 < H) & (d3 < D))
