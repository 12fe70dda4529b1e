"""Decode rows of MTA layers without a key-query conv (head mixing only: wpsm, head_kernel or wposm) in one
pass over the keys, flash-decoding style: two launches instead of mta_attention's five.

The post-softmax mixing needs every head's normalized probabilities, and a split knows neither the other
splits' keys nor the final softmax normalizers. But the output of head h is linear in the unnormalized
exponentials e[h', j] = exp(L[h', j] - m[h']) of every logit head h':
    out[h] = sum_h' W[h, h'] / Z[h'] * sum_j e[h', j] v_j[h]      (W: head_kernel or wposm, Z: sum of exp)
so a split keeps, per output head h and logit head h', the sum A[h, h'] = sum_j e[h', j] v_j[h] with a
running max per h' (as flash attention keeps one per head), and the combine applies the normalizers and W.
Per key tile a program computes the [heads, keys] scores (a tl.dot with the row as row 0 of 16), mixes
them across heads (wpsm), updates the running statistics, and adds e @ V for its HG output heads as a
batched tl.dot over them.

1. `_mixing_decode_kernel` (output-head group, split, row): per-split max and sum of exp of each logit
   head, and the [HG, heads, d] partial sums A of its output heads;
2. `_mixing_combine_kernel` (row, output head): merges the splits, applies the normalizers and W, then
   fused_ops.norm_gate (HeadNormGate) as mta_attention's last kernel does.

K is read once per output-head group (each program reads every head's keys; the groups of one split run
side by side, so most of those reads come from L2), V once. Extra memory: O(rows x splits x heads^2 x d)
for A. The e @ V products cost heads / HG times those of P'V, which is why the engine runs this kernel
only where launches, not bytes, bound a layer (triton_attention.one_pass_mixing).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import pdl
from .fused_ops import CAST_ONLY, HeadNormGate, norm_gate
from .mta_attention import MTALayerParams, _mix, _split_normalizers
from .work_items import SPLIT_CHUNK, WorkItems, cache_slots, dot_width, split_key_tiles, work_item


def mixing_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, params: MTALayerParams,
                            work: WorkItems, out: torch.Tensor, num_splits: int | None = None,
                            heads_per_program: int = 4, key_tile: int = 16, num_warps: int = 8,
                            num_stages: int = 2, head_norm: HeadNormGate = CAST_ONLY) -> torch.Tensor:
    """Decode rows (work.block_m == 1) of a layer without a key-query conv into `out` [N, H, d] (spec steps
    0-7, and 8-9 with `head_norm`). q [N, H, d]: the step's queries; k_cache, v_cache [num_blocks, bs, G, d]
    already holding the step's tokens. Keys in `num_splits` splits (default work.num_splits) of `key_tile`
    keys (a power of two >= 16); each program computes `heads_per_program` output heads (a power of two).
    `num_stages` buffers of each key / value tile in shared memory (32-key tiles of 8 heads overflow the
    H200's with 2). Buffer sizes and grids depend only on the number of rows and splits. For 16-bit caches the e @ V
    products are three tf32 products (about fp32's accuracy), as mta_attention's P'V; fp32 inputs use exact
    fp32 products. Nothing here synchronizes with the host."""
    if params.pre_kernel is not None or params.post_kernel is not None:
        raise ValueError("mixing_decode_attention serves layers without a key-query conv; "
                         "use mta_attention.mta_paged_attention")
    if work.block_m != 1:
        raise ValueError(f"block_m={work.block_m}: mixing_decode_attention computes decode rows (block_m 1)")
    if key_tile < 16 or key_tile & (key_tile - 1) or heads_per_program < 1 or heads_per_program & (heads_per_program - 1):
        raise ValueError(f"key_tile={key_tile}, heads_per_program={heads_per_program}: powers of two, "
                         "key_tile >= 16 (tl.dot's inner size)")
    num_rows = work.work_seq.numel()
    if num_rows == 0:
        return out
    n_heads, head_dim = q.shape[1], q.shape[2]
    splits = num_splits or work.num_splits
    hb = max(16, triton.next_power_of_2(n_heads))  # logit heads padded to tl.dot's 16 rows
    hg = min(heads_per_program, triton.next_power_of_2(n_heads))
    f32 = dict(dtype=torch.float32, device=q.device)
    stats = torch.empty(2, num_rows, splits, hb, **f32)  # per split and logit head: max, sum of exp
    partial = torch.empty(num_rows, splits, n_heads, hb, head_dim, **f32)  # A per split, output and logit head
    dummy = torch.empty(1, **f32)
    seq = dict(bt_ptr=work.block_tables, bt_stride=work.block_tables.stride(0), seq_start_ptr=work.seq_start,
               seq_end_ptr=work.seq_end, seq_row_ptr=work.seq_row, work_seq_ptr=work.work_seq,
               work_first_ptr=work.work_first)
    c = dict(H=n_heads, D=head_dim, DP=dot_width(head_dim), HB=hb, SPLITS=splits, PDL=pdl.options(q)["PDL"])
    launch = {k: v for k, v in pdl.options(q).items() if k != "PDL"}
    _mixing_decode_kernel[(triton.cdiv(n_heads, hg), splits, num_rows)](
        q, k_cache, v_cache, dummy if params.pre_mix is None else params.pre_mix, stats, partial,
        1.0 / math.sqrt(head_dim), **seq, **c, GROUP=n_heads // k_cache.shape[2], HG=hg, BN=key_tile,
        BLOCK_SIZE=k_cache.shape[1], PRE_MIX=params.pre_mix is not None, FP32=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages, **launch)
    _mixing_combine_kernel[(num_rows, n_heads)](
        stats, partial, dummy if params.post_mix is None else params.post_mix, out, **seq, **c,
        SC=SPLIT_CHUNK, POST_MIX=params.post_mix is not None, **head_norm.kernel_args(dummy), num_warps=4,
        **launch)
    return out


# ---- device code --------------------------------------------------------------------------------------
# q_ptr [N, H, D]; k_ptr, v_ptr [blocks, BLOCK_SIZE, H / GROUP, D]; pre_mix_ptr, post_mix_ptr [H, H] fp32
# (out, in); stats_ptr [2, rows, SPLITS, HB]: max, sum of exp per logit head; part_ptr [rows, SPLITS, H, HB,
# D] fp32: A; out_ptr [N, H, D]; bt_ptr [seqs, bt_stride] int32 and the other sequence / work-item arrays as
# in work_items.WorkItems (one row per work item).

@triton.jit(do_not_specialize=["bt_stride", "SPLITS"])
def _mixing_decode_kernel(q_ptr, k_ptr, v_ptr, pre_mix_ptr, stats_ptr, part_ptr, sm_scale, bt_ptr, bt_stride,
                          seq_start_ptr, seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, SPLITS,
                          H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                          HB: tl.constexpr, HG: tl.constexpr, BN: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          PRE_MIX: tl.constexpr, FP32: tl.constexpr, PDL: tl.constexpr):
    """This split's statistics of every logit head and A of output heads g * HG .. g * HG + HG - 1."""
    pdl.wait(PDL)
    g, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, start, end, row0, last, bt = work_item(b, work_seq_ptr, work_first_ptr, seq_start_ptr, seq_end_ptr,
                                                  seq_row_ptr, bt_ptr, bt_stride, 1)
    h3 = tl.arange(0, HB)[:, None, None]
    d_col = tl.arange(0, DP)[None, :, None]  # [1, DP, 1]: head size along a key tile's rows
    # the row as row 0 of a 16-row tl.dot operand [HB, 16, DP] (tl.dot has no single-row form)
    r3 = tl.arange(0, 16)[None, :, None]
    d3 = tl.arange(0, DP)[None, None, :]
    q3 = tl.load(q_ptr + ((row0 + first - start) * H + h3).to(tl.int64) * D + d3,
                 mask=(h3 < H) & (r3 == 0) & (d3 < D), other=0.0)
    o3 = g * HG + tl.arange(0, HG)[:, None, None]  # output heads
    m = tl.full((HB,), float("-inf"), tl.float32)
    l = tl.zeros((HB,), tl.float32)
    acc = tl.zeros((HG, HB, DP), tl.float32)
    t0, t1 = split_key_tiles(last, split, BN, SPLITS)
    for t in range(t0, t1):
        keys = t * BN + tl.arange(0, BN)
        key_ok = keys <= last
        slots = cache_slots(bt, keys, key_ok, BLOCK_SIZE)
        k3 = tl.load(k_ptr + (slots[None, None, :] * (H // GROUP) + h3 // GROUP) * D + d_col,
                     mask=(h3 < H) & (d_col < D) & key_ok[None, None, :], other=0.0)  # [HB, DP, BN]
        if FP32:
            s = tl.dot(q3, k3, input_precision="ieee")
        else:
            s = tl.dot(q3, k3)  # 16-bit operands: exact products, fp32 sums
        s = tl.where(key_ok[None, :], tl.sum(s, axis=1) * sm_scale, 0.0)  # row 0 alone is nonzero: [HB, BN]
        if PRE_MIX:  # exact fp32 products, as mta_attention's _logits_kernel
            s = tl.reshape(_mix(pre_mix_ptr, tl.reshape(s, (HB, 1, BN)), H, HB, 1, BN, True), (HB, BN))
        x = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))  # finite: a split's tiles start at a key <= last
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new[:, None])
        l = l * alpha + tl.sum(e, axis=1)
        v3 = tl.load(v_ptr + (slots[None, :, None] * (H // GROUP) + o3 // GROUP) * D + d3,
                     mask=(o3 < H) & (d3 < D) & key_ok[None, :, None], other=0.0)  # [HG, BN, DP]
        e3 = tl.broadcast_to(e[None, :, :], (HG, HB, BN))
        if FP32:
            acc = acc * alpha[None, :, None] + tl.dot(e3, v3, input_precision="ieee")
        else:
            acc = acc * alpha[None, :, None] + tl.dot(e3, v3.to(tl.float32), input_precision="tf32x3")
        m = m_new
    heads = tl.arange(0, HB)
    if g == 0:
        offs = (b * SPLITS + split) * HB + heads
        tl.store(stats_ptr + offs, m)
        tl.store(stats_ptr + tl.num_programs(2) * SPLITS * HB + offs, l)
    hi3 = heads[None, :, None]
    offs = (((b * SPLITS + split) * H + o3) * HB + hi3).to(tl.int64) * D + d3
    tl.store(part_ptr + offs, acc, mask=(o3 < H) & (d3 < D))


@triton.jit(do_not_specialize=["bt_stride", "SPLITS"])
def _mixing_combine_kernel(stats_ptr, part_ptr, post_mix_ptr, out_ptr, bt_ptr, bt_stride, seq_start_ptr,
                           seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, nw_ptr, gw_ptr, gb_ptr, eps,
                           scale, SPLITS, H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HB: tl.constexpr,
                           SC: tl.constexpr, POST_MIX: tl.constexpr, NORM: tl.constexpr, SCALE: tl.constexpr,
                           GATE: tl.constexpr, PDL: tl.constexpr):
    """Output head h of one row: sum_h' W[h, h'] / Z[h'] sum_splits exp(m_s[h'] - m[h']) A_s[h, h'], then
    norm_gate (nw_ptr, gw_ptr [D], gb_ptr [1])."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)  # the o-projection after it requests its weights early
    b, h = tl.program_id(0), tl.program_id(1)
    first, start, end, row0, last, bt = work_item(b, work_seq_ptr, work_first_ptr, seq_start_ptr, seq_end_ptr,
                                                  seq_row_ptr, bt_ptr, bt_stride, 1)
    hi = tl.arange(0, HB)[:, None]  # logit head
    d = tl.arange(0, DP)[None, :]
    m, inv = _split_normalizers(stats_ptr, b * SPLITS * HB + hi, hi < H, HB, tl.num_programs(0) * SPLITS * HB,
                                SPLITS, SC)  # [HB, 1]
    y = tl.zeros((HB, DP), tl.float32)
    for s in range(SPLITS):
        m_s = tl.load(stats_ptr + (b * SPLITS + s) * HB + hi, mask=hi < H, other=float("-inf"))
        a = tl.load(part_ptr + (((b * SPLITS + s) * H + h) * HB + hi).to(tl.int64) * D + d,
                    mask=(hi < H) & (d < D), other=0.0)
        y += tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - m)) * a
    y = y * inv  # [HB (logit head), DP]: sum_j P[h', j] v_j[h]
    if POST_MIX:
        w = tl.load(post_mix_ptr + h * H + hi, mask=hi < H, other=0.0)
    else:
        w = tl.where(hi == h, 1.0, 0.0)
    acc = tl.sum(w * y, axis=0)[None, :]  # [1, DP]
    out_ty = out_ptr.dtype.element_ty
    acc = norm_gate(acc, nw_ptr, gw_ptr, gb_ptr, d, eps, scale, D, NORM, SCALE, GATE, out_ty)
    tl.store(out_ptr + ((row0 + first - start) * H + h).to(tl.int64) * D + d, acc.to(out_ty), mask=d < D)
