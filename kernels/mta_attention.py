"""Paged MTA attention in Triton, every variant of the spec, as a pipeline over fp32 score, logit and
probability rows: decode rows and prompt chunks alike.

The spec's two-pass algorithm, each stage a simple kernel with full parallelism. A work item is a group of
consecutive query rows of one sequence (one row when decoding); for a group with rows [p0, p1) the stages
keep, per head, the rows the convolutions need over the keys 0..p1-1:

1. `_scores_kernel` (item x head, key tile x row tile): raw masked scores of rows p0-W .. p1-1, with
   W = (c_q-1) + (c_q'-1) -> S [items, H, rows + W, T];
2. `_logits_kernel` (item, split, row tile): pre-conv over S (its key halo is a shifted read), pre-mix,
   masking -> L [items, H, rows + c_q'-1, T] and each split's max and sum of exp; for prompt groups the
   pre-conv runs before it as `_prompt_conv_kernel` (item x head, key tile), which streams the rows once
   and writes the ConvState's pre-conv sums; `_normalizers_kernel` combines the splits (decode rows with
   one logit row: `_probs_kernel` does);
3. `_probs_kernel` (item, split, row tile): softmax rows -> post-conv -> post-mix -> P' [items, H, rows, T]
   (for prompt groups the post-conv is again `_prompt_conv_kernel`'s, with the ConvState's post-conv sums);
4. `_pv_kernel` (item x head, split x row tile): P' @ V per split; `_sum_splits_kernel` writes the output.

With a ConvState (layers with a post-conv over c_q' > 1 queries, as the engine runs them), a sequence's
state slot keeps, for each conv, the partial sums of the next c-1 rows' outputs over the rows computed so
far: prompt groups write them from their last rows, and a decode row computes only its own score and logit
rows, finishes its own outputs from the partial sums and adds its taps to those of the rows after it. The
paper's 6 x 11 layer then computes 1 score row and 1 pre-conv row instead of 11 and 6, and each conv reads
one shifted input row 11 times instead of 6 rows 11 times.

Decode rows of layers without a key-query conv may instead take the one-pass form (`one_pass`): after
stage 1, `_one_pass_kernel` (item, key split, value head) and `_merge_heads_kernel` (item, head) replace
stages 2-4, with per-split H x H partial products of P V merged under every head's normalizers (the
comment above `_one_pass_kernel`).

K is read once (stage 1), V once (stage 4). The rows in between are fp32, so the result is the reference's
up to summation order (for 16-bit models the post-softmax head mixing is a tf32x3 dot and prompt P'V two
16-bit dots of P' split into a 16-bit head and remainder, both about fp32's accuracy). Extra memory is
O(items x heads x rows x context): for decode O(batch x heads x context); items run in waves whose
buffers fit `budget_bytes`, so a long prompt never holds a T x T map and a large decode batch never more
than the budget. The context length is a runtime argument: new lengths do not compile new kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl
from .fused_ops import CAST_ONLY, HeadNormGate, norm_gate
from .work_items import (SPLIT_CHUNK, WorkItems, cache_slots, dot_width, exp_minus, exp_norm, qk_tile,
                         split_key_tiles, work_item)


@dataclass(slots=True)
class MTALayerParams:
    """One layer's MTA weights as the kernel reads them (fp32, contiguous); absent steps are None."""

    pre_kernel: torch.Tensor | None  # [H, c_q, c_k]
    post_kernel: torch.Tensor | None  # [H, c_q', c_k']
    pre_mix: torch.Tensor | None  # [H, H] (out, in): wpsm
    post_mix: torch.Tensor | None  # [H, H] (out, in): wposm, or head_kernel as a block-diagonal matrix
    pad_key: str = "both"

    @property
    def mixes_heads(self) -> bool:
        return self.pre_mix is not None or self.post_mix is not None


def layer_params(weights, device) -> MTALayerParams:
    """From dense_attention.MTAWeights to the kernel's form."""
    def f32(t):
        return None if t is None else t.detach().to(device=device, dtype=torch.float32).contiguous()

    post_mix = weights.wposm
    if weights.head_kernel is not None:
        post_mix = head_kernel_matrix(weights.head_kernel)
    return MTALayerParams(
        pre_kernel=None if weights.pre_kernel is None else f32(weights.pre_kernel[:, 0]),
        post_kernel=None if weights.post_kernel is None else f32(weights.post_kernel[:, 0]),
        pre_mix=f32(weights.wpsm), post_mix=f32(post_mix), pad_key=weights.pad_key)


def head_kernel_matrix(head_kernel: torch.Tensor) -> torch.Tensor:
    """head_kernel [H / c_h, c_h (in), c_h (out)] -> the equivalent [H, H] (out, in) block-diagonal matrix."""
    return torch.block_diag(*[group.t() for group in head_kernel])


def left_pad(pad_key: str, c_k: int) -> int:
    return {"both": (c_k - 1) // 2, "left": c_k - 1, "right": 0}[pad_key]


RING_ALIGN = 128  # ConvState rows are a multiple of every key tile long


@dataclass(slots=True)
class ConvState:
    """What a post-conv layer keeps of each sequence across steps (the spec's decode state), per conv over
    c > 1 queries: for each of the c - 1 rows after the last one computed, the partial sum of its conv
    output (before head mixing and masking) over the taps of rows already computed. Output row u of a conv
    over rows u - c + 1 .. u is then the kept partial sum plus the taps of row u itself, which a decode row
    computes from its own score (pre-conv) or probability (post-conv) row; it adds those taps to the
    partial sums of rows u + 1 .. u + c - 1 too. So a decode row reads its own input row at the c_k shifts
    and c - 1 partial rows once, instead of c input rows at c_k shifts each, and never recomputes earlier
    rows. Slot s keeps row u's partial sums at row u % c (c rows: the one a step reads is not the one it
    starts); a row holds garbage beyond key u. A prompt launch writes the partial sums after the last row
    of each of its sequences; a decode launch reads them and writes the next ones, so the caller must only
    put a sequence in a decode launch when the previous step that computed it wrote its slot
    (kv_cache_manager tracks that)."""

    post: torch.Tensor  # [num_slots, H, c_q', length] fp32, length a multiple of RING_ALIGN: post-conv sums
    pre: torch.Tensor | None  # [num_slots, H, c_q, length] fp32, None without a pre-conv over c_q > 1

    @classmethod
    def allocate(cls, num_slots: int, n_heads: int, c_q: int, c_q2: int, max_len: int, device) -> "ConvState":
        length = triton.cdiv(max_len, RING_ALIGN) * RING_ALIGN
        f32 = dict(dtype=torch.float32, device=device)
        pre = torch.zeros(num_slots, n_heads, c_q, length, **f32) if c_q > 1 else None
        return cls(torch.zeros(num_slots, n_heads, c_q2, length, **f32), pre)

    @staticmethod
    def num_bytes(num_slots: int, n_heads: int, c_q: int, c_q2: int, max_len: int) -> int:
        length = triton.cdiv(max_len, RING_ALIGN) * RING_ALIGN
        return 4 * num_slots * n_heads * length * (c_q2 + (c_q if c_q > 1 else 0))


def mta_paged_attention(q: torch.Tensor, q_cache: torch.Tensor | None, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, params: MTALayerParams, work: WorkItems, out: torch.Tensor,
                       key_tile: int | None = None, num_warps: int | dict | None = None, budget_bytes: int = 512 << 20,
                       max_len: int | None = None, prompt_splits: int | None = None,
                       stream_tile: int | None = None, state: ConvState | None = None,
                       num_splits: int | None = None, head_norm: HeadNormGate = CAST_ONLY,
                       conv_splits: int | None = None, pv_splits: int | None = None,
                       one_pass: tuple[int, int] | None = None) -> torch.Tensor:
    """Rows of the work items (groups of work.block_m rows) into `out` [N, H, d] (spec steps 0-7, and 8-9
    with `head_norm`).

    q [N, H, d]: the step's new queries; q_cache [num_blocks, bs, H, d] or None (no key-query conv);
    k_cache, v_cache [num_blocks, bs, G, d], already holding the step's tokens. Buffer sizes and grids
    depend only on the number of work items and `max_len` (default: the longest sequence; pass a fixed
    bound such as the model's max_seq_len for launches that must keep their shapes, e.g. in a CUDA graph).
    Decode rows use `num_splits` key splits (default work.num_splits); prompt groups `prompt_splits`, by
    default enough to fill the GPU, in their conv and softmax kernels and `pv_splits` (default
    _prompt_pv_splits) in P'V. Decode rows finishing their convs from a `state` split the keys of the
    conv and softmax kernels (_logits, _probs) `conv_splits` ways (default _ring_splits), P'V's
    `num_splits` ways. `key_tile` keys per tile in the conv and softmax kernels, `stream_tile`
    in the two that read K and V (powers of two; by default 128, and `key_tile` for prompt groups' P'V);
    unless `key_tile` is given, decode rows' probabilities kernel uses 128-key tiles (32 with a ConvState).
    Prompt groups' key-query convs run in _prompt_conv_kernel's CONV_BN-key tiles. `num_warps` for every
    kernel (or a dict by kernel name), by default 4 but for decode rows DECODE_WARPS' (with a ConvState
    RING_DECODE_WARPS', or RING_ONE_TILE_WARPS' where the conv and softmax programs hold one key tile each
    and number at most four per SM) and for prompt groups PROMPT_WARPS'.
    With a `state` (post-conv layers; work.seq_state names each sequence's slot) prompt groups also write
    the conv partial sums after their sequences' last rows there, and decode rows finish their outputs from
    it and write the next partial sums.
    `one_pass` = (key tile, key splits), for decode rows of layers without key-query convs: after
    _scores_kernel, the one-pass form (_one_pass_kernel, _merge_heads_kernel) in place of the four kernels
    after it.
    The last kernel casts each output row to out's dtype and applies `head_norm` (steps 8-9) to it.
    Nothing here synchronizes with the host.
    """
    num_items = work.work_seq.numel()
    if num_items == 0:
        return out
    n_heads, head_dim = q.shape[1], q.shape[2]
    cq, ck = (1, 1) if params.pre_kernel is None else params.pre_kernel.shape[1:]
    cq2, ck2 = (1, 1) if params.post_kernel is None else params.post_kernel.shape[1:]
    rows_o = work.block_m
    decode = rows_o == 1
    ring = 0 if state is None or cq2 == 1 else 1 if decode else 2  # 1: decode rows read it; 2: prompts write it
    if ring and work.seq_state is None:
        raise ValueError("a ConvState needs work.seq_state, the state slot of each sequence")
    if ring:
        kept = (1 if state.pre is None else state.pre.shape[2], state.post.shape[2])
        if kept != (cq, cq2):
            raise ValueError(f"the ConvState is for convs over {kept[0]} (pre) and {kept[1]} (post) queries; "
                             f"the layer's are over {cq}, {cq2}")
    if one_pass is not None and not (decode and cq == 1 and cq2 == 1):
        raise ValueError("one_pass is for decode rows of layers without key-query convs")
    if one_pass is not None and (one_pass[1] < 1 or one_pass[0] & (one_pass[0] - 1)):
        raise ValueError(f"one_pass = (key tile, key splits) needs a power-of-two tile and at least one split, "
                         f"got {one_pass}")
    # Decode rows that finish their convs from the state compute only their own score and logit rows.
    rows_s, rows_l = (1, 1) if ring == 1 else (rows_o + cq - 1 + cq2 - 1, rows_o + cq2 - 1)
    # Measured on the H200 (benchmarks/kernels.py --sweep); prompt groups use narrow key tiles so that the
    # [heads, 16 rows, keys] head-mixing product fits in shared memory.
    # (conv layer at 64 x 2048: _logits 67 -> 61 us with 32-key tiles rather than 64; but decode rows that
    # recompute their earlier rows, without a ConvState, went 510 -> 785 us: they keep 64)
    bn = key_tile or (128 if decode and cq == 1 and cq2 == 1 else 64 if decode and ring == 0 else 32)
    # _scores_kernel and _pv_kernel stream K and V and keep no head or row tile of the convs, so decode
    # rows use wide key tiles there (conv layer at 64 x 2048: _pv 213 us with 64-key tiles, 141 with 128).
    # Prompt groups' _scores_kernel too (H200, prefill at 8192 tokens: 2.25 -> 1.56 ms for a mixing layer
    # with 128-key tiles rather than 32), but not their _pv_kernel (4.97 -> 7.25 ms).
    scores_tile = stream_tile or 128
    pv_tile = stream_tile or (128 if decode else bn)
    # the decode post-conv likewise (with 8 warps: 64 x 2048, 128 -> 106 us), but not that of decode rows
    # finishing it from a ConvState, whose [heads, c_q', keys] partial sums take 32-key tiles (RING_DECODE_WARPS)
    probs_tile = 128 if decode and ring != 1 and not key_tile else bn
    hb = triton.next_power_of_2(n_heads)
    probs_rows = 1 if decode else 16
    widest = max(bn, scores_tile, pv_tile, probs_tile, CONV_BN, one_pass[0] if one_pass else 1)
    # prompt groups that write a ConvState fill its rows after their last at keys up to c - 1 past it
    reach = max(cq, cq2) - 1 if ring == 2 else 0
    length = triton.cdiv(max(max_len or 0, work.max_len) + reach, widest) * widest
    # prompt groups' pre-conv output (rows_l rows) goes where P' later does
    rows_p = rows_l if not decode and params.pre_kernel is not None else rows_o
    per_item = 4 * n_heads * length * (rows_s + rows_l + rows_p)
    if one_pass:  # a score row and one [heads (out), heads (in), d] partial product per key split
        per_item = 4 * n_heads * (length * rows_s + n_heads * head_dim * one_pass[1])
    wave = max(1, min(num_items, budget_bytes // per_item))
    if decode:
        splits = num_splits or work.num_splits
    else:
        splits = prompt_splits or _prompt_splits(q.device, wave, rows_l, length, bn)
    conv_splits = splits if ring != 1 else conv_splits or _ring_splits(q.device, wave, length, splits, bn)
    if not decode:  # P'V's own split count; the conv and softmax kernels keep `splits`
        splits = pv_splits or _prompt_pv_splits(q.device, wave, n_heads, splits)
    pv_rows = 1 if decode else max(16, min(PROMPT_PV_ROWS, rows_o))  # rows per _pv_kernel program
    dummy = torch.empty(1, dtype=torch.float32, device=q.device)
    c = dict(
        H=n_heads, GROUP=n_heads // k_cache.shape[2], D=head_dim, DP=dot_width(head_dim), BN=bn,
        NUM_TILES=length // bn, SCORES_BN=scores_tile, PV_BN=pv_tile, PROBS_BN=probs_tile,
        BLOCK_SIZE=k_cache.shape[1], HB=hb, RO=rows_o, R=rows_s, RL=rows_l,
        RT=1 if rows_s == 1 else max(16, min(32, triton.next_power_of_2(rows_s))),
        RLT=min(8, triton.next_power_of_2(rows_l)), RLP=triton.next_power_of_2(rows_l), OT=pv_rows,
        PROBS_OT=probs_rows, SPLITS=splits, CSPLITS=conv_splits, SC=SPLIT_CHUNK,
        CQ=cq, CK=ck, PL=left_pad(params.pad_key, ck), CQ2=cq2, CK2=ck2, PL2=left_pad(params.pad_key, ck2),
        PRE_CONV=params.pre_kernel is not None, POST_CONV=params.post_kernel is not None,
        PRE_MIX=params.pre_mix is not None, POST_MIX=params.post_mix is not None,
        QCACHE=q_cache is not None, FP32=q.dtype == torch.float32, RING=ring, SRING=ring if cq > 1 else 0,
        ONE_PASS=one_pass is not None, OP_BN=one_pass[0] if one_pass else 0,
        OP_SPLITS=one_pass[1] if one_pass else 0, TC=8,
        NORM_HERE=decode and rows_l == 1 and (ring == 1 or params.post_kernel is None),
        # PROBS_IN: False here, True in the prompt path's _probs launch; present in every launch's arguments
        # because _named_args keeps the names a kernel's first launch offered
        PROBS_IN=False)
    weights = dict(pre_w_ptr=_or(params.pre_kernel, dummy), post_w_ptr=_or(params.post_kernel, dummy),
                   pre_mix_ptr=_or(params.pre_mix, dummy), post_mix_ptr=_or(params.post_mix, dummy),
                   **_state_args(state if ring else None, work, bn, widest, dummy), **head_norm.kernel_args(dummy))
    f32 = dict(dtype=torch.float32, device=q.device)
    scores = torch.empty(wave, n_heads, rows_s, length, **f32)
    if one_pass:  # per-split statistics [2, items, splits, HB] and products; no logit or P' rows
        logits = probs = norms = dummy
        stats = torch.empty(2, wave, one_pass[1], hb, **f32)
        partial = torch.empty(wave, one_pass[1], n_heads, n_heads, head_dim, **f32)
    else:
        logits = torch.empty(wave, n_heads, rows_l, length, **f32)
        probs = torch.empty(wave, n_heads, rows_p, length, **f32)
        stats = torch.empty(2, wave, conv_splits, n_heads, rows_l, **f32)
        norms = torch.empty(2, wave, n_heads, rows_l, **f32)
        partial = torch.empty(wave, splits, n_heads, rows_o, head_dim, **f32)
    for item0 in range(0, num_items, wave):
        items = min(wave, num_items - item0)
        seq = dict(item0=item0, bt_ptr=work.block_tables, bt_stride=work.block_tables.stride(0),
                   seq_start_ptr=work.seq_start, seq_end_ptr=work.seq_end, seq_row_ptr=work.seq_row,
                   work_seq_ptr=work.work_seq, work_first_ptr=work.work_first)
        _launch(q, q_cache, k_cache, v_cache, out, scores, logits, probs, stats, norms, partial, items, seq,
                weights, c, 1.0 / math.sqrt(head_dim),
                num_warps or _default_warps(decode, ring,
                                            ring == 1 and _one_tile_each(q.device, wave, conv_splits, bn, length)))
    return out


# _prompt_conv_kernel's key tile and warps: H200, the conv layer's prefill at 8192 tokens (both convs):
# 15.4 ms at 64 keys x 1 warp, 128 x 2 and 256 x 4 alike, 18.7-19.0 ms at twice those warps.
# The other prompt kernels' warps (4 unless named), H200 at 8192 tokens, each against 4 warps: conv layer
# _scores 3.86 -> 3.25 ms (8 warps: 6.66; the mixing layer's row pipeline 1.91 -> 2.10), _pv (16-row programs
# then) 2.84 -> 2.63 ms with 2 (8: 3.48); _probs 2.32 -> 2.25 ms (mixing row pipeline 4.65 -> 3.49); _logits
# slower with 8 (2.20 -> 2.49 ms). Whole layer: conv 25.30 -> 24.38 ms, mixing row pipeline 11.80 -> 10.60 ms.
CONV_BN = 128
PROMPT_WARPS = {"_prompt_conv_kernel": 2, "_scores_kernel": 2, "_pv_kernel": 4, "_probs_kernel": 8}
# Rows per _pv_kernel program of prompt groups (a group's 64 rows in one); its key splits: _prompt_pv_splits.
# H200, conv layer prefill at 8192 / 2048 tokens, 830M heads (results/kernels_h200_prompt_pv_sweep.json):
# 16 rows, 2 warps and the conv kernels' splits (15 / 2) 23.51 / 1.555 ms; 64 rows, 4 warps and 4 splits
# 22.19 / 1.504 ms (_pv 2,633 -> 1,738 us, _sum_splits 596 -> 148 us at 8192); 32 rows, 2 warps, 4 splits
# 22.15 / 1.529; 2 splits 23.27 ms at 8192 (64 rows).
PROMPT_PV_ROWS = 64


# Warps per kernel of decode rows (the others: 4). H200, conv layer at 64 x 2048 (benchmarks/kernels.py
# --breakdown): _pv 129 -> 108 us with 2 warps (more programs resident per SM), _probs 128 -> 106 us with 8
# (its [heads, keys] tiles of 128 keys). Decode rows finishing their convs from a ConvState: _probs in 4
# warps over 32-key tiles (--kernel-sweep at 64 x 2048: 59 us, against 62 / 96 with 2 / 8 warps and
# 67-70 us with 64- or 128-key tiles at their best warp count).
# Where each of their programs holds a single key tile and there are at most four programs per SM (small
# batches up to 2048 keys), 8 warps for _logits and _probs: a program's loads (its tile's c - 1 partial
# sums per conv) are all it waits on, and more threads have more of them in flight. benchmarks/kernels.py
# --conv-tile-sweep at d01c563 (H200, conv layer, K and V from HBM, both kernels in 8 warps against 4, two
# runs each): at those 10 shapes 8 x 2048 62.1 / 62.0 -> 59.4 / 59.4 us, 32 x 512 61.9 / 61.7 -> 60.3 /
# 60.4, 8 x 512 31.4 / 31.4 -> 31.4 / 30.1, the 7 others within 0.6 % (1 x 2048 28.0 / 28.0 -> 28.1 / 28.2);
# 8 warps were slower at 16 x 2048 and 64 x 512 (one tile, 1,024 programs: +1.1 %, +1.7 %) and at every
# shape with several tiles per program (up to +9.5 %).
DECODE_WARPS = {"_pv_kernel": 2, "_probs_kernel": 8}
RING_DECODE_WARPS = {"_pv_kernel": 2}
RING_ONE_TILE_WARPS = {"_pv_kernel": 2, "_logits_kernel": 8, "_probs_kernel": 8}


def _one_tile_each(device: torch.device, items: int, conv_splits: int, key_tile: int, length: int) -> bool:
    """Whether a launch's conv and softmax programs (items x conv_splits) hold one key tile each and number
    at most four per SM."""
    return conv_splits * key_tile >= length and items * conv_splits <= 4 * _num_sms(device)


def _default_warps(decode: bool, ring: int, one_tile: bool) -> dict:
    """Warps per kernel: prompt groups, decode rows, decode rows finishing their convs from a ConvState
    (ring 1) whose conv and softmax programs hold one key tile each or several."""
    if ring == 1:
        return RING_ONE_TILE_WARPS if one_tile else RING_DECODE_WARPS
    return DECODE_WARPS if decode else PROMPT_WARPS


def _state_args(state: ConvState | None, work: WorkItems, key_tile: int, widest: int, dummy: torch.Tensor) -> dict:
    """The kernels' ConvState arguments (placeholders without one); RING_TILES counts key_tile-key tiles,
    and every kernel's tile (at most `widest` keys) must divide the rows."""
    if state is None:
        return dict(seq_state_ptr=work.work_seq, ring_ptr=dummy, sring_ptr=dummy, RING_TILES=1)
    if state.post.shape[-1] % widest:
        raise ValueError(f"key tiles of {widest} keys do not divide the ConvState rows "
                         f"({state.post.shape[-1]} keys)")
    return dict(seq_state_ptr=work.seq_state, ring_ptr=state.post, sring_ptr=_or(state.pre, dummy),
                RING_TILES=state.post.shape[-1] // key_tile)


def _prompt_splits(device: torch.device, items: int, rows_l: int, length: int, key_tile: int) -> int:
    """Key splits for a wave of prompt groups: its (item, split, 8-row tile) programs should fill every SM
    four times over, with at least four key tiles per split."""
    programs = items * triton.cdiv(rows_l, 8)
    num_sms = _num_sms(device)
    return max(1, min(16, triton.cdiv(4 * num_sms, programs), length // (4 * key_tile)))


def _prompt_pv_splits(device: torch.device, items: int, n_heads: int, splits: int) -> int:
    """Key splits of prompt groups' P'V: at most 4 (fewer partial rows to write and add up; the conv
    kernels' count, `splits`, is higher where they fill the GPU four times over), more where the (item,
    head, split) programs would not cover every SM."""
    return min(splits, max(4, triton.cdiv(_num_sms(device), items * n_heads)))


def _ring_splits(device: torch.device, items: int, length: int, splits: int, key_tile: int) -> int:
    """Key splits of the conv and softmax kernels of decode rows finishing their convs from a ConvState:
    P'V's `splits`, raised so that a split holds at most 256 keys (8 of the 32-key tiles, which a program
    runs one after another, each waiting on its loads of the state's partial sums), and, where P'V's
    programs fill the GPU less than four times over, to sixteen (item, split) programs per SM of at least
    one `key_tile`-key tile, at most 128 splits. From benchmarks/kernels.py --conv-split-sweep (H200, conv
    layer): 64 x 8192 1.385 -> 1.254 ms, 256 x 8192 5.233 -> 4.813, 1 x 8192 0.092 -> 0.052 (128 splits);
    one tile per split at small contexts: 1 x 2048 0.032 -> 0.027 ms (64 splits), 1 x 512 0.030 -> 0.019
    (16), 16 x 512 0.051 -> 0.041 (16), 16 x 2048 0.107 -> 0.103 (64), 64 x 512 0.111 -> 0.107 (16); 64 x
    2048 keeps its 9 splits (0.333 ms; 32: 0.341)."""
    num_sms = _num_sms(device)
    count = max(splits, triton.cdiv(length, 256))
    if items * splits < 4 * num_sms:
        count = max(count, min(triton.cdiv(16 * num_sms, items), length // key_tile, 128))
    return count


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _or(t, dummy):
    return dummy if t is None else t


_NAMED_ARGS: dict = {}


def _named_args(kernel, available: dict) -> tuple[str, ...]:
    """The keyword arguments of `kernel` among `available`'s keys, computed once per kernel (every layer
    of every step launches the same six kernels with the same argument names)."""
    if kernel not in _NAMED_ARGS:
        _NAMED_ARGS[kernel] = tuple(k for k in available if k in kernel.arg_names)
    return _NAMED_ARGS[kernel]


def _launch(q, q_cache, k_cache, v_cache, out, scores, logits, probs, stats, norms, partial, items, seq,
            weights, c, sm_scale, num_warps: int | dict):
    out_tiles = triton.cdiv(c["RO"], c["OT"])
    launch = pdl.options(q)
    every = dict(**seq, **weights, **c, sm_scale=sm_scale, PDL=launch.pop("PDL"))

    def streaming(tile):  # the arguments with `tile`-key tiles
        return dict(every, BN=tile, NUM_TILES=c["NUM_TILES"] * c["BN"] // tile,
                    RING_TILES=every["RING_TILES"] * c["BN"] // tile)

    def run(kernel, grid, *tensors, args=every):
        warps = num_warps if isinstance(num_warps, int) else num_warps.get(kernel.__name__, 4)
        kernel[grid](*tensors, num_warps=warps, **launch, **{k: args[k] for k in _named_args(kernel, args)})

    def conv(x, w_ptr, y, rows_in, rows_out, cq, ck, pl, softmax, state):  # prompt groups' key-query convs
        args = dict(streaming(CONV_BN), ROWS_IN=rows_in, ROWS_OUT=rows_out, C=cq, CK=ck, PL=pl, SOFTMAX=softmax,
                    STATE=state is not None)
        run(_prompt_conv_kernel, (items * c["H"], args["NUM_TILES"]), x, norms, weights[w_ptr], y,
            weights[state or "ring_ptr"], args=args)

    # heads fastest in the grid of the kernels that stream K or V, as in paged_flash
    scores_args = streaming(c["SCORES_BN"])
    run(_scores_kernel, (items * c["H"], scores_args["NUM_TILES"] * triton.cdiv(c["R"], c["RT"])), q,
        q if q_cache is None else q_cache, k_cache, scores, args=scores_args)
    if c["ONE_PASS"]:
        one_pass_args = dict(streaming(c["OP_BN"]), SPLITS=c["OP_SPLITS"])
        run(_one_pass_kernel, (items, c["OP_SPLITS"], c["H"]), scores, v_cache, stats, partial, args=one_pass_args)
        run(_merge_heads_kernel, (items, c["H"]), stats, partial, out, args=one_pass_args)
        return
    prompt = c["RO"] > 1  # prompt groups run their key-query convs in _prompt_conv_kernel
    conv_splits = dict(SPLITS=c["CSPLITS"])  # the key splits of _logits, its statistics and _probs
    logits_in, logits_args = scores, dict(streaming(c["BN"]), **conv_splits)
    if prompt and c["PRE_CONV"]:  # the conv's output rows (RL) go to `probs`, free until P'
        conv(scores, "pre_w_ptr", probs, c["R"], c["RL"], c["CQ"], c["CK"], c["PL"], False,
             "sring_ptr" if c["SRING"] == 2 else None)
        logits_in, logits_args = probs, dict(logits_args, PRE_CONV=False, R=c["RL"])
    run(_logits_kernel, (items, c["CSPLITS"], triton.cdiv(c["RL"], c["RLT"])), logits_in, logits, stats,
        args=logits_args)
    if not c["NORM_HERE"]:
        run(_normalizers_kernel, (items, c["H"]), stats, norms, args=dict(every, **conv_splits))
    probs_in, probs_args = logits, dict(streaming(c["PROBS_BN"]), OT=c["PROBS_OT"], **conv_splits)
    if prompt and c["POST_CONV"]:  # the conv's output rows (RO) go to `scores`, read no more
        conv(logits, "post_w_ptr", scores, c["RL"], c["RO"], c["CQ2"], c["CK2"], c["PL2"], True,
             "ring_ptr" if c["RING"] == 2 else None)
        probs_in, probs_args = scores, dict(probs_args, POST_CONV=False, PROBS_IN=True, RL=c["RO"])
    run(_probs_kernel, (items, c["CSPLITS"], triton.cdiv(c["RO"], c["PROBS_OT"])), probs_in, norms, stats, probs,
        args=probs_args)
    run(_pv_kernel, (items * c["H"], c["SPLITS"] * out_tiles), probs, v_cache, partial, args=streaming(c["PV_BN"]))
    run(_sum_splits_kernel, (items, c["H"]), partial, out)


# ---- device code --------------------------------------------------------------------------------------
# Arguments shared by the kernels (items = the wave's work items, fp32 unless noted):
#   q_ptr [N, H, D] (cache dtype): the step's queries    qc_ptr [blocks, BLOCK_SIZE, H, D]: the query cache
#   k_ptr, v_ptr [blocks, BLOCK_SIZE, H / GROUP, D]       bt_ptr [seqs, bt_stride] int32: block tables
#   seq_start_ptr, seq_end_ptr, seq_row_ptr [seqs] int32  work_seq_ptr, work_first_ptr [all items] int32
#   s_ptr [items, H, R, LENGTH]: scores                   l_ptr [items, H, RL, LENGTH]: logits
#   p_ptr [items, H, RO, LENGTH]: P'                      stats_ptr [2, items, SPLITS, H, RL]: max, sum exp
#   norm_ptr [2, items, H, RL]: max, 1 / sum exp          part_ptr [items, SPLITS, H, RO, D]: partial P'V
#   pre_w_ptr [H, CQ, CK], post_w_ptr [H, CQ2, CK2]       pre_mix_ptr, post_mix_ptr [H, H] (out, in)
#   out_ptr [N, H, D] (the output's dtype); item0: the wave's first work item
#   SC: splits a decode row's merge reads per load (work_items.SPLIT_CHUNK, a power of two)
#   LENGTH = NUM_TILES * BN keys per fp32 row: computed in the kernel from the unspecialized tile count, so
#   that new lengths compile nothing and the compiler still knows the row stride's divisibility (a runtime
#   LENGTH made the prompt path 2.6-3.7x slower on the H200: unaligned, unvectorized row accesses).

@triton.jit(do_not_specialize=["item0", "bt_stride", "NUM_TILES"])
def _scores_kernel(q_ptr, qc_ptr, k_ptr, s_ptr, sm_scale, item0, bt_ptr, bt_stride, seq_start_ptr, seq_end_ptr,
                   seq_row_ptr, work_seq_ptr, work_first_ptr, H: tl.constexpr, GROUP: tl.constexpr,
                   D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, NUM_TILES, BLOCK_SIZE: tl.constexpr,
                   RO: tl.constexpr, R: tl.constexpr, RT: tl.constexpr, QCACHE: tl.constexpr, FP32: tl.constexpr,
                   PDL: tl.constexpr):
    """S[i, h, r, j] = q . k / sqrt(d) of row first - W + r and key j, 0 unless 0 <= j <= row."""
    pdl.wait(PDL)
    LENGTH = NUM_TILES * BN  # row stride of the fp32 buffers; a product, so its divisibility is known
    b, h = tl.program_id(0) // H, tl.program_id(0) % H
    key_tile, row_tile = tl.program_id(1) % NUM_TILES, tl.program_id(1) // NUM_TILES
    first, start, end, row0, last, bt = work_item(item0 + b, work_seq_ptr, work_first_ptr, seq_start_ptr,
                                                  seq_end_ptr, seq_row_ptr, bt_ptr, bt_stride, RO)
    r = row_tile * RT + tl.arange(0, RT)
    rows = first - (R - RO) + r  # positions
    if key_tile * BN > tl.minimum(first - (R - RO) + row_tile * RT + RT - 1, last):
        return  # above the diagonal: never read
    offs_d = tl.arange(0, DP)
    dmask = offs_d[None, :] < D
    row_ok = (rows >= 0) & (rows <= last) & (r < R)
    new = row_ok & (rows >= start)
    q = tl.load(q_ptr + ((row0 + tl.where(new, rows - start, 0)) * H + h).to(tl.int64)[:, None] * D
                + offs_d[None, :], mask=new[:, None] & dmask, other=0.0)
    if QCACHE:
        old = row_ok & (rows < start)
        q_slots = cache_slots(bt, rows, old, BLOCK_SIZE)
        q += tl.load(qc_ptr + (q_slots * H + h)[:, None] * D + offs_d[None, :], mask=old[:, None] & dmask,
                     other=0.0)
    keys = key_tile * BN + tl.arange(0, BN)
    key_ok = keys <= last
    k_slots = cache_slots(bt, keys, key_ok, BLOCK_SIZE)
    k = tl.load(k_ptr + (k_slots * (H // GROUP) + h // GROUP)[:, None] * D + offs_d[None, :],
                mask=key_ok[:, None] & dmask, other=0.0)
    s = qk_tile(q, k, RT == 1, FP32)
    s = tl.where((keys[None, :] <= rows[:, None]) & row_ok[:, None], s * sm_scale, 0.0)
    tl.store(s_ptr + ((b * H + h) * R + r).to(tl.int64)[:, None] * LENGTH + keys[None, :], s,
             mask=(r[:, None] < R) & key_ok[None, :])


@triton.jit
def _item_slot(seq_state_ptr, work_seq_ptr, w):
    """The ConvState slot of work item w's sequence."""
    return tl.load(seq_state_ptr + tl.load(work_seq_ptr + w))


@triton.jit
def _ring_row(slot, heads, rows, H: tl.constexpr, ROWS: tl.constexpr):
    """Row index (int64) of positions `rows` (negative ones clamped to 0) and `heads` in a ConvState tensor
    [slots, H, ROWS, ...], which keeps position p at row p % ROWS."""
    return ((slot * H + heads) * ROWS + tl.where(rows < 0, 0, rows) % ROWS).to(tl.int64)


@triton.jit
def _mix(w_ptr, x, H: tl.constexpr, HB: tl.constexpr, RT: tl.constexpr, BN: tl.constexpr, FP32: tl.constexpr):
    """y[o] = sum_i W[o, i] x[i] over heads; x [HB, RT, BN], W [H, H] (out, in)."""
    o = tl.arange(0, HB)
    w = tl.load(w_ptr + o[:, None] * H + o[None, :], mask=(o[:, None] < H) & (o[None, :] < H), other=0.0)
    if HB >= 16:
        # fp32 models: exact fp32 products; 16-bit models: three tf32 tensor-core products (about fp32's
        # accuracy, far above the model's) instead of the FMA loop of "ieee" (likewise in _pv_kernel).
        if FP32:
            y = tl.dot(w, tl.reshape(x, (HB, RT * BN)), input_precision="ieee")
        else:
            y = tl.dot(w, tl.reshape(x, (HB, RT * BN)), input_precision="tf32x3")
        return tl.reshape(y, (HB, RT, BN))
    return tl.sum(w[:, :, None, None] * x[None, :, :, :], axis=1)


@triton.jit
def _row_conv(x_ptr, w_ptr, b, out0, pos0, last, key0, H: tl.constexpr, HB: tl.constexpr, ROWS: tl.constexpr,
              OUT: tl.constexpr, BN: tl.constexpr, CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr,
              LENGTH, SOFTMAX: tl.constexpr, norm_ptr=None, inv_base=0):
    """Key-query conv (spec steps 2 and 5) of decode rows without a ConvState (the row itself, or the logit
    rows it recomputes) for output rows out0 .. out0 + OUT - 1 over keys key0 + [0, BN):
    y[h, r, j] = sum_{a, c} w[h, a, c] x[h, out0 + r + a, j - PL + c] -> [HB, OUT, BN], where input row i
    of x [items, H, ROWS, LENGTH] is position pos0 + i and reads 0 where its key is outside 0..position.

    Each input row is loaded once per kernel column c and added to every output row it feeds (a rank-1
    update with the weights w[h, i - r, c]), so a row is read CK times instead of CQ x CK times. With
    SOFTMAX, x holds logits and each row is first normalized: exp(x - max) / sum from norm_ptr."""
    heads = tl.arange(0, HB)[:, None]
    r = tl.arange(0, OUT)[None, :]
    keys = key0 + tl.arange(0, BN)[None, :]
    y = tl.zeros((HB, OUT, BN), tl.float32)
    for i in range(out0, out0 + OUT + CQ - 1):
        a = i - out0 - r  # kernel row of input row i for each output row: [1, OUT]
        row_base, row_ok, m, inv = _conv_input_row(x_ptr, norm_ptr, inv_base, b, heads, i, pos0, H, ROWS, LENGTH,
                                                   SOFTMAX)
        if OUT > 1:  # several rows: unrolled (as it sped up prompt tiles once: _logits at 8192 tokens 31.7 -> 25.8 ms)
            for c in tl.static_range(CK):
                y += _conv_column(row_base, w_ptr, heads, a, keys - PL + c, row_ok, pos0 + i, last, c, m, inv,
                                  H, CQ, CK, SOFTMAX)
        else:  # decode rows: a loop (unrolled, the post-conv's probabilities kernel was 1.7x slower)
            for c in range(CK):
                y += _conv_column(row_base, w_ptr, heads, a, keys - PL + c, row_ok, pos0 + i, last, c, m, inv,
                                  H, CQ, CK, SOFTMAX)
    return y


@triton.jit
def _conv_input_row(x_ptr, norm_ptr, inv_base, b, heads, i, pos0, H: tl.constexpr, ROWS: tl.constexpr, LENGTH,
                    SOFTMAX: tl.constexpr):
    """Input row i of _row_conv: (pointers [HB, 1], which heads hold it, its max and 1 / sum of exp)."""
    # (the position broadcast over heads first: Triton's interpreter rejects a scalar mask term)
    row_ok = (heads < H) & (heads * 0 + i < ROWS) & (heads * 0 + pos0 + i >= 0)
    row_base = x_ptr + ((b * H + heads) * ROWS + i).to(tl.int64) * LENGTH
    m = tl.zeros(heads.shape, tl.float32)
    inv = tl.zeros(heads.shape, tl.float32)
    if SOFTMAX:
        norm_offs = (b * H + heads) * ROWS + i
        m = tl.load(norm_ptr + norm_offs, mask=row_ok, other=0.0)
        inv = tl.load(norm_ptr + inv_base + norm_offs, mask=row_ok, other=0.0)
    return row_base, row_ok, m, inv


@triton.jit
def _input_values(ptrs, ok, m, inv, SOFTMAX: tl.constexpr):
    """A conv's input values at `ptrs`, 0 where not `ok`; under SOFTMAX logits, normalized with their max m
    and 1 / sum of exp inv."""
    if SOFTMAX:
        x = exp_norm(tl.load(ptrs, mask=ok, other=float("-inf")), m, inv)
    else:
        x = tl.load(ptrs, mask=ok, other=0.0)
    return x


@triton.jit
def _conv_column(row_base, w_ptr, heads, a, shifted, row_ok, pos, last, c, m, inv, H: tl.constexpr,
                 CQ: tl.constexpr, CK: tl.constexpr, SOFTMAX: tl.constexpr):
    """One input row (position pos, pointers row_base [HB, 1]) at the keys `shifted` [1, BN], weighted for
    every output row by kernel column c: w[h, a, c] x[h, shifted] -> [HB, OUT, BN] (a [1, OUT])."""
    x = _input_values(row_base + shifted, row_ok & (shifted >= 0) & (shifted <= tl.minimum(pos, last)), m, inv,
                      SOFTMAX)
    w = tl.load(w_ptr + heads * (CQ * CK) + a * CK + c, mask=(heads < H) & (a >= 0) & (a < CQ), other=0.0)
    return w[:, :, None] * x[:, None, :]


@triton.jit(do_not_specialize=["item0", "bt_stride", "NUM_TILES", "SPLITS"])
def _logits_kernel(s_ptr, l_ptr, stats_ptr, pre_w_ptr, pre_mix_ptr, item0, bt_ptr,
                   bt_stride, seq_start_ptr, seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, seq_state_ptr,
                   sring_ptr, RING_TILES, H: tl.constexpr, BN: tl.constexpr, NUM_TILES, HB: tl.constexpr,
                   RO: tl.constexpr, R: tl.constexpr, RL: tl.constexpr, RLT: tl.constexpr, SPLITS,
                   CQ: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr, PRE_CONV: tl.constexpr,
                   PRE_MIX: tl.constexpr, SRING: tl.constexpr, PDL: tl.constexpr):
    """L rows first - (c_q'-1) + r over this split's keys (steps 2-4 before the softmax), with max and sum.
    SRING 1 (decode rows with a ConvState): the pre-conv is finished from the sequence's ConvState, whose
    partial sums of the next rows (keys up to last + CQ - 1) this row's taps go into."""
    pdl.wait(PDL)
    LENGTH = NUM_TILES * BN  # row stride of the fp32 buffers; a product, so its divisibility is known
    b, split, row_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, start, end, row0, last, bt = work_item(item0 + b, work_seq_ptr, work_first_ptr, seq_start_ptr,
                                                  seq_end_ptr, seq_row_ptr, bt_ptr, bt_stride, RO)
    heads = tl.arange(0, HB)
    h3 = heads[:, None, None]
    r3 = row_tile * RLT + tl.arange(0, RLT)[None, :, None]
    j3 = tl.arange(0, BN)[None, None, :]
    rows = first - (RL - RO) + r3
    ok = (h3 < H) & (r3 < RL)
    dst = l_ptr + ((b * H + h3) * RL + r3).to(tl.int64) * LENGTH
    if SRING == 1:
        slot = _item_slot(seq_state_ptr, work_seq_ptr, item0 + b)
    m = tl.full((HB, RLT), float("-inf"), tl.float32)
    l = tl.zeros((HB, RLT), tl.float32)
    last_key = tl.minimum(first - (RL - RO) + row_tile * RLT + RLT - 1, last)
    t0, t1 = split_key_tiles(last_key + (CQ - 1 if SRING == 1 else 0), split, BN, SPLITS)
    for t in range(t0, t1):
        keys = t * BN + j3
        if SRING == 1:
            x = _decode_conv(s_ptr, sring_ptr, pre_w_ptr, slot, b, first, t * BN, 0.0, 0.0, H, HB, BN, CQ, CK, PL,
                             RING_TILES * BN, LENGTH, False)
        elif PRE_CONV:
            x = _row_conv(s_ptr, pre_w_ptr, b, row_tile * RLT, first - (R - RO), last, t * BN, H, HB, R, RLT, BN,
                          CQ, CK, PL, LENGTH, False)
        else:
            x = tl.load(s_ptr + ((b * H + h3) * R + r3).to(tl.int64) * LENGTH + keys,
                        mask=(h3 < H) & (r3 < R) & (keys <= rows) & (rows <= last), other=0.0)
        if PRE_MIX:
            # exact fp32 products: the tf32x3 tl.dot made this kernel slower on the H200 (a mixing layer's
            # prefill at 8192 tokens: 2.2 -> 3.2 ms), unlike the post-mix in _probs_kernel
            x = _mix(pre_mix_ptr, x, H, HB, RLT, BN, True)
        x = tl.where((keys <= rows) & (rows >= 0) & (rows <= last) & (r3 < RL), x, float("-inf"))
        tl.store(dst + keys, x, mask=ok & (keys < LENGTH))
        m, l = _running_max_sum(m, l, x)
    r2 = row_tile * RLT + tl.arange(0, RLT)[None, :]
    offs = ((b * SPLITS + split) * H + heads[:, None]) * RL + r2
    ok2 = (heads[:, None] < H) & (r2 < RL)
    tl.store(stats_ptr + offs, m, mask=ok2)
    tl.store(stats_ptr + tl.num_programs(0) * SPLITS * H * RL + offs, l, mask=ok2)


@triton.jit
def _running_max_sum(m, l, x):
    """Online softmax statistics: the running max m and sum of exp l [HB, R] of rows after the keys of x
    [HB, R, BN] (-inf where masked) are added; rows without keys keep (-inf, 0)."""
    m_new = tl.maximum(m, tl.max(x, axis=2))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l * exp_minus(m, m_safe) + tl.sum(exp_minus(x, m_safe[:, :, None]), axis=2)


@triton.jit
def _split_normalizers(stats_ptr, base, ok, split_stride, sums, SPLITS, SC: tl.constexpr):
    """(max, 1 / sum of exp) [X, 1] of logit rows over the key splits, from each split's max at stats_ptr +
    base + s * split_stride and its sum of exp `sums` further (base, ok [X, 1]), SC splits per load; rows
    without keys get (0, 0)."""
    m = tl.full(base.shape, float("-inf"), tl.float32)
    l = tl.zeros(base.shape, tl.float32)
    s = tl.arange(0, SC)[None, :]
    for s0 in range(0, SPLITS, SC):
        in_range = ok & (s0 + s < SPLITS)
        m_s = tl.load(stats_ptr + base + (s0 + s) * split_stride, mask=in_range, other=float("-inf"))  # [X, SC]
        l_s = tl.load(stats_ptr + sums + base + (s0 + s) * split_stride, mask=in_range, other=0.0)
        m_new = tl.maximum(m, tl.max(m_s, axis=1)[:, None])
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_s = tl.where(m_s == float("-inf"), 0.0, l_s * exp_minus(m_s, m_safe))
        l = l * exp_minus(m, m_safe) + tl.sum(l_s, axis=1)[:, None]
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.where(l == 0.0, 0.0, 1.0 / tl.where(l == 0.0, 1.0, l))


@triton.jit(do_not_specialize=["SPLITS"])
def _normalizers_kernel(stats_ptr, norm_ptr, H: tl.constexpr, RL: tl.constexpr, SPLITS, RLP: tl.constexpr,
                        SC: tl.constexpr, PDL: tl.constexpr):
    """Per logit row of one item and head: the max over splits and 1 / (sum of exp)."""
    pdl.wait(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    r = tl.arange(0, RLP)[:, None]
    ok = r < RL
    m, inv_l = _split_normalizers(stats_ptr, (b * SPLITS * H + h) * RL + r, ok, H * RL,
                                  tl.num_programs(0) * SPLITS * H * RL, SPLITS, SC)
    tl.store(norm_ptr + (b * H + h) * RL + r, m, mask=ok)
    tl.store(norm_ptr + tl.num_programs(0) * H * RL + (b * H + h) * RL + r, inv_l, mask=ok)


@triton.jit(do_not_specialize=["item0", "bt_stride", "NUM_TILES", "SPLITS"])
def _probs_kernel(l_ptr, norm_ptr, stats_ptr, p_ptr, post_w_ptr, post_mix_ptr, item0, bt_ptr,
                  bt_stride, seq_start_ptr, seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, seq_state_ptr,
                  ring_ptr, RING_TILES, H: tl.constexpr, BN: tl.constexpr, NUM_TILES,
                  HB: tl.constexpr, RO: tl.constexpr, RL: tl.constexpr, OT: tl.constexpr, SPLITS,
                  CQ2: tl.constexpr, CK2: tl.constexpr, PL2: tl.constexpr,
                  POST_CONV: tl.constexpr, POST_MIX: tl.constexpr, FP32: tl.constexpr, RING: tl.constexpr,
                  NORM_HERE: tl.constexpr, SC: tl.constexpr, PDL: tl.constexpr, PROBS_IN: tl.constexpr = False):
    """P' rows first + r over this split's keys: normalized probabilities -> post-conv -> post-mix
    (PROBS_IN: l_ptr [items, H, RO, LENGTH] holds prompt groups' post-conv output, _prompt_conv_kernel's). RING 1
    (decode rows): the post-conv is finished from the sequence's ConvState, whose partial sums of the next
    rows (keys up to last + CQ2 - 1) this row's taps go into. NORM_HERE (decode rows with one logit
    row of their own): the row's normalizers come from the splits' stats here, not from _normalizers_kernel
    (one launch fewer per layer and step)."""
    pdl.wait(PDL)
    LENGTH = NUM_TILES * BN  # row stride of the fp32 buffers; a product, so its divisibility is known
    b, split, row_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, start, end, row0, last, bt = work_item(item0 + b, work_seq_ptr, work_first_ptr, seq_start_ptr,
                                                  seq_end_ptr, seq_row_ptr, bt_ptr, bt_stride, RO)
    heads = tl.arange(0, HB)
    h3 = heads[:, None, None]
    r3 = row_tile * OT + tl.arange(0, OT)[None, :, None]  # output row; logit row r3 + a
    j3 = tl.arange(0, BN)[None, None, :]
    rows = first + r3
    inv_base = tl.num_programs(0) * H * RL
    cur_m = tl.zeros((HB, 1), tl.float32)
    cur_inv = tl.zeros((HB, 1), tl.float32)
    if RING == 1:
        slot = _item_slot(seq_state_ptr, work_seq_ptr, item0 + b)
    if NORM_HERE:
        hs = tl.arange(0, HB)[:, None]
        cur_m, cur_inv = _split_normalizers(stats_ptr, (b * SPLITS * H + hs) * RL, hs < H, H * RL,
                                            tl.num_programs(0) * SPLITS * H * RL, SPLITS, SC)
    last_key = tl.minimum(first + row_tile * OT + OT - 1, last)
    t0, t1 = split_key_tiles(last_key + (CQ2 - 1 if RING == 1 else 0), split, BN, SPLITS)
    for t in range(t0, t1):
        keys = t * BN + j3
        if RING == 1:
            p = _decode_conv(l_ptr, ring_ptr, post_w_ptr, slot, b, first, t * BN, cur_m, cur_inv, H, HB, BN, CQ2,
                             CK2, PL2, RING_TILES * BN, LENGTH, True)
        elif POST_CONV:
            p = _row_conv(l_ptr, post_w_ptr, b, row_tile * OT, first - (CQ2 - 1), last, t * BN, H, HB, RL, OT, BN,
                          CQ2, CK2, PL2, LENGTH, True, norm_ptr, inv_base)
        else:
            # One-iteration loops, as the code was before _row_conv: with the load straight in the tile loop,
            # prefill of a mixing layer at 8192 tokens took 32 ms instead of 5.3 on the H200 (commit c220ecb;
            # likely software pipelining of a load that feeds the post-mix tl.dot).
            p = tl.zeros((HB, OT, BN), tl.float32)
            for a in range(1):
                norm_offs = (b * H + h3) * RL + r3
                norm_ok = (h3 < H) & (r3 < RL)
                if NORM_HERE:
                    m, inv = cur_m[:, :, None], cur_inv[:, :, None]
                else:
                    m = tl.load(norm_ptr + norm_offs, mask=norm_ok, other=0.0)
                    inv = tl.load(norm_ptr + inv_base + norm_offs, mask=norm_ok, other=0.0)
                for c in range(1):
                    if PROBS_IN:
                        p += tl.load(l_ptr + ((b * H + h3) * RL + r3).to(tl.int64) * LENGTH + keys,
                                     mask=norm_ok & (keys <= rows) & (rows <= last), other=0.0)
                    else:
                        x = tl.load(l_ptr + ((b * H + h3) * RL + r3).to(tl.int64) * LENGTH + keys,
                                    mask=norm_ok & (keys <= tl.minimum(rows, last)), other=float("-inf"))
                        p += exp_norm(x, m, inv)
        p = tl.where((keys <= rows) & (rows <= last), p, 0.0)
        if POST_MIX:
            p = _mix(post_mix_ptr, p, H, HB, OT, BN, FP32)
        tl.store(p_ptr + ((b * H + h3) * RO + r3).to(tl.int64) * LENGTH + keys, p,
                 mask=(h3 < H) & (r3 < RO) & (keys < LENGTH))


@triton.jit(do_not_specialize=["item0", "bt_stride", "NUM_TILES"])
def _prompt_conv_kernel(x_ptr, norm_ptr, w_ptr, y_ptr, state_ptr, item0, bt_ptr, bt_stride, seq_start_ptr,
                        seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, seq_state_ptr, RING_TILES,
                        H: tl.constexpr, BN: tl.constexpr, NUM_TILES, RO: tl.constexpr, ROWS_IN: tl.constexpr,
                        ROWS_OUT: tl.constexpr, C: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr,
                        SOFTMAX: tl.constexpr, STATE: tl.constexpr, PDL: tl.constexpr):
    """Key-query conv of a prompt group's rows for one head and one BN-key tile (spec step 2, or step 5 with
    SOFTMAX; before head mixing and masking): y[r, j] = sum_{a, c} w[h, a, c] x[r + a, j - PL + c], input
    row i of x [items, H, ROWS_IN, LENGTH] being position first - (ROWS_IN - RO) + i and reading 0 where
    its key is outside 0..min(position, last) (logits normalized with norm_ptr [2, items, H, ROWS_IN] under
    SOFTMAX) -> y_ptr [items, H, ROWS_OUT, LENGTH], ROWS_OUT = ROWS_IN - (C - 1).

    The input rows stream through once, C per loop iteration: each is read at its CK key shifts ([BN] loads)
    and its taps go into the C output rows it feeds, kept in registers as a ring (output row r in slot r % C)
    until the row's last input, when it is stored and its slot starts row r + C. The loop starts at a
    multiple of C, so every row's slots and kernel rows are known when compiling, and the C x CK weights are
    loaded once per program. An input value is read CK times, not C x CK, and no tap of a row outside the
    kernel window is computed. (Before, one [CKP, BN] load and one [CP, CKP, BN] product per row over
    runtime slots, the taps padded to powers of two (8 x 16 for 6 x 11): an sm_90 build's row loop took
    402 (pre-conv) and 531 (post-conv) instructions per row, now 239 and 312; H200, conv layer prefill at
    8192 tokens, both convs 12.88 -> 10.29 ms (benchmarks/results/kernels_h200_ab_unrolled_prompt_conv.json),
    then 10.32 -> 9.57 ms with each key's bounds as one unsigned comparison
    (kernels_h200_ab_unsigned_key_bounds.json). Under the CPU tests' interpreter, which pays per operation,
    it is about twice as slow.)

    STATE (state_ptr: the conv's ConvState tensor [slots, H, C, RING_TILES * BN]): where the item ends its
    sequence, the partial sums of the C - 1 rows after its last row over the rows up to it go to the
    sequence's slot, keys up to each row's position: the rows left in the ring after the last input row.
    (Folded in here rather than computed again from the input rows by a kernel of its own: H200, conv
    layer prefill at 8192 tokens, 703 us of the last wave's _normalizers_kernel, whose 16 programs per
    sequence did it.)"""
    pdl.wait(PDL)
    LENGTH = NUM_TILES * BN  # row stride of the fp32 buffers; a product, so its divisibility is known
    b, h = tl.program_id(0) // H, tl.program_id(0) % H
    key0 = tl.program_id(1) * BN
    first, start, end, row0, last, bt = work_item(item0 + b, work_seq_ptr, work_first_ptr, seq_start_ptr,
                                                  seq_end_ptr, seq_row_ptr, bt_ptr, bt_stride, RO)
    pos0 = first - (ROWS_IN - RO)  # position of input row 0
    to_state = last < 0  # (False)
    if STATE:
        to_state = last == end - 1
    # keys after every row's are never read, but the ConvState's rows after the last reach C - 1 keys further
    if key0 > last + tl.where(to_state, C - 1, 0):
        return
    j = tl.arange(0, BN)
    x_base = x_ptr + (b * H + h).to(tl.int64) * ROWS_IN * LENGTH
    y_base = y_ptr + (b * H + h).to(tl.int64) * ROWS_OUT * LENGTH
    norm_base = norm_ptr + (b * H + h) * ROWS_IN
    inv_base = tl.num_programs(0) * ROWS_IN
    ws = _conv_weights(w_ptr + h * C * CK, C, CK)
    ys = (tl.zeros((BN,), tl.float32),) * C  # output row r in slot r % C
    # rows before the sequence or wholly before the tile's keys add nothing, and so do rows after the item's
    # last (they read 0); the outputs of neither are read. So the ring ends holding the rows after the last.
    i_start = tl.maximum(0, tl.maximum(-pos0, key0 - PL - pos0))
    rows_end = tl.minimum(ROWS_IN, last - pos0 + 1)
    # C rows per iteration, from a multiple of C, so that each row's slots are known when compiling
    for i0 in range(i_start - i_start % C, rows_end, C):
        for u in tl.static_range(C):
            i = i0 + u
            active = (j * 0 + i >= i_start) & (j * 0 + i < rows_end)  # ([BN]: the interpreter rejects scalar masks)
            xs = _conv_row_shifts(x_base + i * LENGTH, norm_base + tl.minimum(i, ROWS_IN - 1), inv_base,
                                  key0 - PL + j, active, tl.minimum(pos0 + i, last), CK, SOFTMAX)
            ys = _conv_row_taps(ys, ws, xs, u, C, CK)
            r = i - (C - 1)  # the output row input row i completes: slot (u + 1) % C, then free for r + C
            done = ys[(u + 1) % C]
            tl.store(y_base + r * LENGTH + key0 + j, done, mask=(key0 + j < LENGTH) & active & (j * 0 + r >= 0))
            # (rows past the last, in the last iteration, leave the ring as it is: it holds the state's rows)
            ys = _ring_set(ys, (u + 1) % C, tl.where(active, 0.0, done), C)
    if to_state:
        slot = _item_slot(seq_state_ptr, work_seq_ptr, item0 + b)
        # the ring holds output rows up to the one at position last + C - 1; that at position p (row p - pos0 -
        # (C - 1)) in slot (p - pos0 + 1) mod C
        for d in tl.static_range(1, C):
            _state_row_store(state_ptr, slot, h, last + d + j * 0, key0 + j,
                             _ring_get(ys, (last + d - pos0 + 1) % C, C), RING_TILES * BN, H, C)


@triton.jit
def _conv_weights(w_ptr, C: tl.constexpr, CK: tl.constexpr):
    """The C x CK kernel weights at w_ptr as a tuple of scalars, row-major: loaded once per program."""
    ws = ()
    for t in tl.static_range(C * CK):
        ws = ws + (tl.load(w_ptr + t),)
    return ws


@triton.jit
def _conv_row_shifts(row_ptr, norm_ptr, inv_base, keys, active, lim, CK: tl.constexpr, SOFTMAX: tl.constexpr):
    """One input row at the CK key shifts keys + c ([BN] each, a tuple), 0 where the row is not `active` or a
    key is outside 0..lim; under SOFTMAX the logits normalized with the row's max and 1 / sum of exp (at
    norm_ptr and norm_ptr + inv_base, which must be readable even where the row is not active)."""
    xs = ()
    m = 0.0
    inv = 0.0
    if SOFTMAX:
        m = tl.load(norm_ptr)
        inv = tl.load(norm_ptr + inv_base)
    for c in tl.static_range(CK):
        ok = ((keys + c).to(tl.uint32) <= lim.to(tl.uint32)) & active  # 0 <= key <= lim (lim >= 0 where active)
        xs = xs + (_input_values(row_ptr + keys + c, ok, m, inv, SOFTMAX),)
    return xs


@triton.jit
def _conv_row_taps(ys, ws, xs, u: tl.constexpr, C: tl.constexpr, CK: tl.constexpr):
    """The taps of input row i (i % C == u; its shifts xs) added to the ring ys: the output row in slot s
    takes it as kernel row (u - s) mod C."""
    out = ()
    for s in tl.static_range(C):
        y = ys[s]
        for c in tl.static_range(CK):
            y += ws[((u - s + C) % C) * CK + c] * xs[c]
        out = out + (y,)
    return out


@triton.jit
def _ring_set(ys, s: tl.constexpr, value, C: tl.constexpr):
    """The ring ys with slot s (known when compiling) replaced by value."""
    out = ()
    for t in tl.static_range(C):
        if t == s:
            out = out + (value,)
        else:
            out = out + (ys[t],)
    return out


@triton.jit
def _ring_get(ys, s, C: tl.constexpr):
    """Ring slot s (a runtime value) of ys."""
    y = ys[0]
    for t in tl.static_range(1, C):
        y = tl.where(s == t, ys[t], y)
    return y


@triton.jit
def split_dot(p, v, acc):
    """acc + p @ v for fp32 p and 16-bit v: p as a head and a remainder, each in v's dtype, two 16-bit
    tensor-core products with fp32 sums, about fp32's accuracy (p alone rounded to bf16 missed a 1e-2 bound
    against the fp32 reference on the H200 for the conv layer, whose post-conv weights give P' of both
    signs). Faster than three tf32 products of fp32 values: conv layer prefill at 8192 tokens, README."""
    p_hi = p.to(v.dtype)
    acc = tl.dot(p_hi, v, acc)
    return tl.dot((p - p_hi.to(tl.float32)).to(v.dtype), v, acc)


@triton.jit
def _state_row_store(state_ptr, slot, h, pos, keys, y, RING_LENGTH, H: tl.constexpr, C: tl.constexpr):
    """Partial conv sums y [1, BN] of the row at position pos ([1, BN]) over keys [1, BN] into ConvState
    slot `slot` (state_ptr [slots, H, C, RING_LENGTH], row u at u % C), keys up to pos."""
    tl.store(state_ptr + _ring_row(slot, h, pos, H, C) * RING_LENGTH + keys, y,
             mask=(keys <= pos) & (keys < RING_LENGTH))


@triton.jit
def _decode_conv(x_ptr, ring_ptr, w_ptr, slot, b, pos, key0, m, inv, H: tl.constexpr, HB: tl.constexpr,
                 BN: tl.constexpr, C: tl.constexpr, CK: tl.constexpr, PL: tl.constexpr, RING_LENGTH, LENGTH,
                 SOFTMAX: tl.constexpr):
    """Key-query conv (step 2 or 5) of decode row `pos` over keys key0 + [0, BN) -> [HB, 1, BN]. The row's
    own input row is item b's at x_ptr [items, H, 1, LENGTH] (logits normalized with their max m and 1 / sum
    of exp inv [HB, 1] when SOFTMAX); the taps of the C - 1 rows before it are the partial sum the ConvState
    `slot` (ring_ptr [slots, H, C, RING_LENGTH], row u at u % C) keeps for it. The row's taps also go into
    the partial sums of rows pos + 1 .. pos + C - 1 (that of pos + C - 1 starts here), at their keys up to
    their positions, so the caller's tiles must reach key pos + C - 1."""
    heads = tl.arange(0, HB)[:, None]
    keys = key0 + tl.arange(0, BN)[None, :]
    h_ok = heads < H
    # Output row pos + k's sums as slot k of a tuple of [HB, BN] tiles, all in the input row's layout. As one
    # [HB, next_power_of_2(C), BN] tensor they took four barriers per kernel column in the sm_90 build, to
    # broadcast the row to it, and 117 / 114 registers (_logits / _probs) against 96 / 80 now. H200, conv
    # layer decode (benchmarks/results/kernels_h200_decode_conv_state_experiments.json): 64 x 2048 0.331 ->
    # 0.320 ms (_logits 51 -> 46 us, _probs 57 -> 50), 256 x 8192 4.86 -> 4.66 ms, 1 x 2048 27 -> 26 us.
    # Rows pos .. pos + C - 2 have partial sums; row pos + C - 1's ring row held row pos - 1's, read by no one.
    # Loaded before the taps, so that their memory latency overlaps them (H200, 64 x 2048, against loading
    # them after: _probs 108 -> 59 us, _logits 93 -> 52 us at 32-key tiles and 4 warps; 70 -> 59 and 56 -> 51
    # us at each order's best tiles and warps).
    ys = ()
    for k in tl.static_range(C):
        if k < C - 1:
            ptrs, ok = _sum_row(ring_ptr, slot, heads, keys, pos + k, H, C, RING_LENGTH)
            ys = ys + (tl.load(ptrs, mask=ok, other=0.0),)
        else:
            ys = ys + (tl.zeros((HB, BN), tl.float32),)
    row_base = x_ptr + (b * H + heads).to(tl.int64) * LENGTH
    for c in range(CK):
        shifted = keys - PL + c
        x = _input_values(row_base + shifted, h_ok & (shifted >= 0) & (shifted <= pos), m, inv, SOFTMAX)
        out = ()
        for k in tl.static_range(C):  # this row is kernel row C - 1 - k of output row pos + k
            w = tl.load(w_ptr + heads * (C * CK) + (C - 1 - k) * CK + c, mask=h_ok, other=0.0)
            out = out + (ys[k] + w * x,)
        ys = out
    for k in tl.static_range(1, C):
        ptrs, ok = _sum_row(ring_ptr, slot, heads, keys, pos + k, H, C, RING_LENGTH)
        tl.store(ptrs, ys[k], mask=ok)
    return ys[0][:, None, :]


@triton.jit
def _sum_row(ring_ptr, slot, heads, keys, row, H: tl.constexpr, C: tl.constexpr, RING_LENGTH):
    """Pointers [HB, BN] to the ConvState's partial sums of output row `row` at `keys`, and where they are
    kept (real heads, keys up to the row). Computed where used rather than held across the kernel-column
    loop, which would keep [HB, BN] pointers per row in registers."""
    ptrs = ring_ptr + _ring_row(slot, heads, row, H, C) * RING_LENGTH + keys
    return ptrs, (heads < H) & (keys <= row) & (keys < RING_LENGTH)


@triton.jit(do_not_specialize=["item0", "bt_stride", "NUM_TILES", "SPLITS"])
def _pv_kernel(p_ptr, v_ptr, part_ptr, item0, bt_ptr, bt_stride, seq_start_ptr, seq_end_ptr, seq_row_ptr,
               work_seq_ptr, work_first_ptr, H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
               DP: tl.constexpr, BN: tl.constexpr, NUM_TILES, BLOCK_SIZE: tl.constexpr,
               RO: tl.constexpr, OT: tl.constexpr, SPLITS, FP32: tl.constexpr, PDL: tl.constexpr):
    """This split's sum over keys of P'[h, row, j] v_j for one head and row tile."""
    pdl.wait(PDL)
    LENGTH = NUM_TILES * BN  # row stride of the fp32 buffers; a product, so its divisibility is known
    b, h = tl.program_id(0) // H, tl.program_id(0) % H
    split, row_tile = tl.program_id(1) % SPLITS, tl.program_id(1) // SPLITS
    first, start, end, row0, last, bt = work_item(item0 + b, work_seq_ptr, work_first_ptr, seq_start_ptr,
                                                  seq_end_ptr, seq_row_ptr, bt_ptr, bt_stride, RO)
    r = row_tile * OT + tl.arange(0, OT)
    offs_d = tl.arange(0, DP)
    dmask = offs_d[None, :] < D
    acc = tl.zeros((OT, DP), tl.float32)
    t0, t1 = split_key_tiles(tl.minimum(first + row_tile * OT + OT - 1, last), split, BN, SPLITS)
    for t in range(t0, t1):
        keys = t * BN + tl.arange(0, BN)
        key_ok = keys <= last
        # causal mask too: _probs_kernel may tile rows more finely, writing each row only up to its tile's
        # last row
        p = tl.load(p_ptr + ((b * H + h) * RO + r).to(tl.int64)[:, None] * LENGTH + keys[None, :],
                    mask=(r[:, None] < RO) & key_ok[None, :] & (keys[None, :] <= first + r[:, None]), other=0.0)
        slots = cache_slots(bt, keys, key_ok, BLOCK_SIZE)
        v = tl.load(v_ptr + (slots * (H // GROUP) + h // GROUP)[:, None] * D + offs_d[None, :],
                    mask=key_ok[:, None] & dmask, other=0.0)
        if OT == 1:
            acc += tl.sum(tl.trans(p) * v.to(tl.float32), axis=0)[None, :]
        elif FP32:
            acc += tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = split_dot(p, v, acc)
    tl.store(part_ptr + (((b * SPLITS + split) * H + h) * RO + r).to(tl.int64)[:, None] * D + offs_d[None, :],
             acc, mask=(r[:, None] < RO) & dmask)


# The one-pass form of a decode row in a layer that mixes heads but has no key-query conv. The post-softmax
# head mixing is linear, so with per-split softmax statistics (m_gt, s_gt) of each logit head g and the
# merged ones (m_g, s_g):
#   O_h = sum_g W[h, g] / s_g sum_j exp(L_gj - m_g) v_hj = sum_t sum_g W[h, g] exp(m_gt - m_g) / s_g U_tgh,
#   U_tgh = sum_{j in split t} exp(L_gj - m_gt) v_hj,
# the H x H partial products that the spec's decode-state analysis names, here per key split t (an online
# softmax over its tiles). A split's program needs every head's scores of its keys, but no normalizer of
# other splits: two kernels after _scores_kernel instead of four (one-row steps spend most of a mixing
# layer's time between kernels).

@triton.jit(do_not_specialize=["item0", "bt_stride", "NUM_TILES", "SPLITS"])
def _one_pass_kernel(s_ptr, v_ptr, stats_ptr, part_ptr, pre_mix_ptr, item0, bt_ptr, bt_stride, seq_start_ptr,
                     seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, H: tl.constexpr, GROUP: tl.constexpr,
                     D: tl.constexpr, DP: tl.constexpr, HB: tl.constexpr, BN: tl.constexpr, NUM_TILES,
                     BLOCK_SIZE: tl.constexpr, SPLITS, PRE_MIX: tl.constexpr, FP32: tl.constexpr,
                     PDL: tl.constexpr):
    """Key split `split` of one decode row, for value head h: over its BN-key tiles, the logits L [HB, BN]
    (pre-mixed scores), their running per-head max and sum of exp -> stats_ptr [2, items, SPLITS, HB] (the
    h = 0 programs), and U[g] = sum_j exp(L[g, j] - max_g) v_hj -> part_ptr [items, SPLITS, H (h), H (g), D]."""
    pdl.wait(PDL)
    LENGTH = NUM_TILES * BN  # row stride of the fp32 buffers; a product, so its divisibility is known
    b, split, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first, start, end, row0, last, bt = work_item(item0 + b, work_seq_ptr, work_first_ptr, seq_start_ptr,
                                                  seq_end_ptr, seq_row_ptr, bt_ptr, bt_stride, 1)
    t0, t1 = split_key_tiles(last, split, BN, SPLITS)
    g = tl.arange(0, HB)
    offs_d = tl.arange(0, DP)
    m = tl.full((HB,), float("-inf"), tl.float32)
    l = tl.zeros((HB,), tl.float32)
    acc = tl.zeros((HB, DP), tl.float32)
    for t in range(t0, t1):
        keys = t * BN + tl.arange(0, BN)
        ok = (g[:, None] < H) & (keys[None, :] <= last)
        x = tl.load(s_ptr + (b * H + g).to(tl.int64)[:, None] * LENGTH + keys[None, :], mask=ok, other=0.0)
        if PRE_MIX:  # exact fp32 products, as in _logits_kernel
            x = tl.reshape(_mix(pre_mix_ptr, tl.reshape(x, (HB, 1, BN)), H, HB, 1, BN, True), (HB, BN))
        x = tl.where(ok, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # heads past H: no keys
        alpha = exp_minus(m, m_safe)
        e = exp_minus(x, m_safe[:, None])  # [HB, BN], 0 where masked
        l = l * alpha + tl.sum(e, axis=1)
        slots = cache_slots(bt, keys, keys <= last, BLOCK_SIZE)
        v = tl.load(v_ptr + (slots * (H // GROUP) + h // GROUP)[:, None] * D + offs_d[None, :],
                    mask=(keys <= last)[:, None] & (offs_d[None, :] < D), other=0.0)
        acc = acc * alpha[:, None]
        if HB < 16:  # too few rows for tl.dot
            acc += tl.sum(e[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        elif FP32:
            acc = tl.dot(e, v, acc, input_precision="ieee")
        else:
            acc = split_dot(e, v, acc)
        m = m_new
    if h == 0:
        base = (b * SPLITS + split) * HB + g
        tl.store(stats_ptr + base, m)
        tl.store(stats_ptr + tl.num_programs(0) * SPLITS * HB + base, l)
    rows = ((b * SPLITS + split) * H + h) * H + g
    tl.store(part_ptr + rows.to(tl.int64)[:, None] * D + offs_d[None, :], acc,
             mask=(g[:, None] < H) & (offs_d[None, :] < D))


@triton.jit(do_not_specialize=["item0", "bt_stride", "SPLITS"])
def _merge_heads_kernel(stats_ptr, part_ptr, out_ptr, post_mix_ptr, item0, bt_ptr, bt_stride, seq_start_ptr,
                        seq_end_ptr, seq_row_ptr, work_seq_ptr, work_first_ptr, nw_ptr, gw_ptr, gb_ptr, eps, scale,
                        H: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HB: tl.constexpr, BN: tl.constexpr,
                        SPLITS, TC: tl.constexpr, POST_MIX: tl.constexpr, NORM: tl.constexpr,
                        SCALE: tl.constexpr, GATE: tl.constexpr, PDL: tl.constexpr):
    """Output head h of one decode row from _one_pass_kernel's splits (TC per load; splits without keys
    skipped): the merged normalizers, then sum over splits s and heads g of W[h, g] exp(m_gs - m_g) / l_g
    U[s, h, g], then norm_gate."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)  # the o-projection after it requests its weights early
    b, h = tl.program_id(0), tl.program_id(1)
    first, start, end, row0, last, bt = work_item(item0 + b, work_seq_ptr, work_first_ptr, seq_start_ptr,
                                                  seq_end_ptr, seq_row_ptr, bt_ptr, bt_stride, 1)
    num_tiles = tl.cdiv(last + 1, BN)
    used = tl.cdiv(num_tiles, tl.cdiv(num_tiles, SPLITS))  # splits with keys (split_key_tiles)
    g = tl.arange(0, HB)[:, None]
    ss = tl.arange(0, TC)[None, :]
    m, inv = _split_normalizers(stats_ptr, b * SPLITS * HB + g, g < H, HB, tl.num_programs(0) * SPLITS * HB,
                                used, TC)  # [HB, 1]
    if POST_MIX:
        w = tl.load(post_mix_ptr + h * H + g, mask=g < H, other=0.0) * inv
    else:
        w = tl.where(g == h, inv, 0.0)
    offs_d = tl.arange(0, DP)
    d3 = offs_d[None, None, :]
    acc = tl.zeros((DP,), tl.float32)
    for s0 in range(0, used, TC):
        ok = (s0 + ss < used) & (g < H)
        m_s = tl.load(stats_ptr + (b * SPLITS + s0 + ss) * HB + g, mask=ok, other=0.0)
        c = tl.where(ok, exp_minus(m_s, m) * w, 0.0)  # [HB, TC]
        rows = ((b * SPLITS + s0 + ss) * H + h) * H + g
        u = tl.load(part_ptr + rows.to(tl.int64)[:, :, None] * D + d3, mask=ok[:, :, None] & (d3 < D), other=0.0)
        acc += tl.sum(tl.sum(c[:, :, None] * u, axis=1), axis=0)
    out_ty = out_ptr.dtype.element_ty
    y = norm_gate(acc[None, :], nw_ptr, gw_ptr, gb_ptr, offs_d[None, :], eps, scale, D, NORM, SCALE, GATE, out_ty)
    tl.store(out_ptr + ((row0 + first - start) * H + h).to(tl.int64) * D + offs_d[None, :], y.to(out_ty),
             mask=offs_d[None, :] < D)


@triton.jit(do_not_specialize=["item0", "bt_stride", "SPLITS"])
def _sum_splits_kernel(part_ptr, out_ptr, item0, bt_ptr, bt_stride, seq_start_ptr, seq_end_ptr, seq_row_ptr,
                       work_seq_ptr, work_first_ptr, nw_ptr, gw_ptr, gb_ptr, eps, scale, H: tl.constexpr,
                       D: tl.constexpr, DP: tl.constexpr, RO: tl.constexpr, SPLITS, SC: tl.constexpr,
                       NORM: tl.constexpr, SCALE: tl.constexpr, GATE: tl.constexpr, PDL: tl.constexpr):
    """Output rows of one item and head: the sum of its splits (each already normalized; a decode row
    reads SC splits at once), then fused_ops.norm_gate (HeadNormGate: nw_ptr, gw_ptr [D], gb_ptr [1])."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)  # the o-projection after it requests its weights early
    b, h = tl.program_id(0), tl.program_id(1)
    first, start, end, row0, last, bt = work_item(item0 + b, work_seq_ptr, work_first_ptr, seq_start_ptr,
                                                  seq_end_ptr, seq_row_ptr, bt_ptr, bt_stride, RO)
    r = tl.arange(0, RO)[:, None]
    offs_d = tl.arange(0, DP)[None, :]
    acc = tl.zeros((RO, DP), tl.float32)
    if RO == 1:
        s = tl.arange(0, SC)[:, None]
        for s0 in range(0, SPLITS, SC):
            part = tl.load(part_ptr + ((b * SPLITS + s0 + s) * H + h).to(tl.int64) * D + offs_d,
                           mask=(s0 + s < SPLITS) & (offs_d < D), other=0.0)  # [SC, DP]
            acc += tl.sum(part, axis=0)[None, :]
    else:
        for s in range(SPLITS):
            acc += tl.load(part_ptr + (((b * SPLITS + s) * H + h) * RO + r).to(tl.int64) * D + offs_d,
                           mask=offs_d < D, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    acc = norm_gate(acc, nw_ptr, gw_ptr, gb_ptr, offs_d, eps, scale, D, NORM, SCALE, GATE, out_ty)
    out_row = row0 + first - start + r
    tl.store(out_ptr + (out_row * H + h).to(tl.int64) * D + offs_d, acc.to(out_ty),
             mask=(first + r <= last) & (offs_d < D))
