"""Linear layers of one-row steps (batch-1 decode) in Triton: y = x W^T for x [1, K], W [N, K], with the block's
small neighbouring operations fused in.

A one-row product only streams W, so its speed is the speed of that read. cuBLAS runs it as a tiled GEMM
whose few, large tiles read the 830M model's smaller matrices well below the copy bandwidth (H200, one CUDA
graph over 24 distinct weights, `benchmarks/row_linear.py`: the o-projection [1536, 1536] in 6.5 us, 17 %
of the copy bandwidth). Here each program reads whole rows of W in BK-wide pieces and reduces them against
x in fp32, BN rows per program, so even an N of 1536 gives hundreds of programs with their loads in flight
at once. The products up to 4608 rows (the 830M's q|k|v, o and w2) run unrolled over K, their loads issued
together; larger ones loop over the pieces (`unrolled`, with the measurements): at batch 1, 830M MTA 1.172 ->
1.108 ms per step, baseline 0.999 -> 0.933 ms (H200, `benchmarks/step_profile.py --batch 1`).

At batch 1 a step's time also goes to kernel count (each launch in a CUDA graph costs a few microseconds
of mostly idle GPU), so a second kernel, `_row_linear_fused_kernel`, takes on the work around a product:
- a prologue: the residual add and RMSNorm before it (fused_ops.add_rms_norm's work). Each program computes
  the norm's statistics itself from one load of the row (from L2), and the first program stores the new
  residual;
- an epilogue: the SwiGLU of a w1|w3 product (fused_ops.silu_mul's work), or RoPE on the q and k parts of a
  q|k|v product (fused_ops.rope's work), a program then holding pairs of rows, and optionally the k, v (and
  q) parts' paged-cache writes (fused_ops.write_cache's work; the engine's MTA layers).
The forward uses `norm_qkv_rope` and `norm_linear(..., silu_mul=True)`: H200, 6bdb142, one CUDA graph over 24
weights (`benchmarks/row_linear.py`), add_rms_norm + row_linear + rope 9.53 -> 6.93 us for q|k|v, add_rms_norm
+ row_linear + silu_mul 11.15 -> 8.93 us for w1|w3.
Every intermediate is rounded to the model's dtype where fused_ops and the PyTorch path round it.

The reference is `torch.nn.functional.linear` (and fused_ops before or after it); `linear`, `linear_silu_mul`,
`norm_linear` and `norm_qkv_rope` send every input of more than one row there. They are for the fused forward,
which runs only where Triton does (a GPU, or Triton's interpreter in the CPU tests, where a program covers
64 rows since the interpreter's cost is per program).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pdl

PLAIN, SWIGLU, ROPE = 0, 1, 2  # the kernel's epilogues


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x [M, K], weight [N, K]; through row_linear when M == 1."""
    if not _one_row(x, weight):
        return F.linear(x, weight)
    return row_linear(x, weight)


def linear_silu_mul(x: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """silu(x W1^T) * (x W3^T) for x [M, K] and w13 [2 * hidden, K] (W1 over W3), rounded like F.linear
    followed by fused_ops.silu_mul; through row_linear_silu_mul when M == 1."""
    if not _one_row(x, w13):
        from .fused_ops import silu_mul

        return silu_mul(F.linear(x, w13))
    return row_linear_silu_mul(x, w13)


def norm_linear(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                weight: torch.Tensor, silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, x W^T) where x = RMSNorm(h + delta) * norm_weight, h and delta [M, K] (delta None: h alone):
    fused_ops.add_rms_norm followed by linear (with silu_mul, by linear_silu_mul and w13 = W1 over W3); one
    kernel when M == 1."""
    if not _one_row(h, weight):
        from .fused_ops import add_rms_norm

        h, x = add_rms_norm(h, delta, norm_weight, eps)
        return h, (linear_silu_mul if silu_mul else linear)(x, weight)
    return row_norm_linear(h, delta, norm_weight, eps, weight, SWIGLU if silu_mul else PLAIN)


def norm_qkv_rope(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  wqkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
                  head_dim: int, cache: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
    """(h + delta, q [M, H, d], k [M, G, d], v [M, G, d]): norm_linear's product with the fused q|k|v weight
    followed by fused_ops.rope (cos, sin [M, d / 2] fp32); one kernel when M == 1, where q, k and v are
    views of one [1, (H + 2G) d] row. With `cache` = (slots [M] int, k_cache, v_cache, q_cache or None;
    caches [blocks, block_size, heads, d]) k, v (and q) also go to those cache slots, as
    fused_ops.write_cache writes them: in the same kernel when M == 1 (one launch fewer per layer)."""
    if not _one_row(h, wqkv):
        from .fused_ops import rope, write_cache

        h, qkv = norm_linear(h, delta, norm_weight, eps, wqkv)
        q, k, v = rope(qkv, cos, sin, n_heads, n_kv_heads, head_dim)
        if cache is not None:
            write_cache(cache[0], k, v, q, *cache[1:])
        return h, q, k, v
    rotary = (cos, sin, (n_heads + n_kv_heads) * head_dim)
    h, qkv = row_norm_linear(h, delta, norm_weight, eps, wqkv, ROPE, rotary,
                             cache=None if cache is None else (*cache, n_heads * head_dim))
    q_end, k_end = n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
    return (h, qkv[:, :q_end].view(1, n_heads, head_dim), qkv[:, q_end:k_end].view(1, n_kv_heads, head_dim),
            qkv[:, k_end:].view(1, n_kv_heads, head_dim))


def _one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] == 1 and weight.stride(1) == 1


def row_tiles(n: int) -> tuple[int, int]:
    """(rows of W per program, columns per load): 2 x 1024 below N = 3072, 4 x 512 below 5120, then 8 x 512.
    H200, 830M shapes (benchmarks/row_linear.py --sweep): the best of {2, 4, 8} x {512, 1024} for [1536, 1536]
    and [1536, 4096] was 2 x 1024, for [4608, 1536] 4 x 512, for [8192, 1536] and [128256, 1536] 8 x 512."""
    block_n = max(2, min(8, triton.next_power_of_2(max(1, n // 1024))))
    return block_n, 1024 if block_n == 2 else 512


UNROLL_MAX_ROWS = 4608


def unrolled(n: int) -> bool:
    """Whether a product over N rows of W takes the kernels' unrolled form (up to UNROLL_MAX_ROWS rows) or
    their loop over pieces of K. The unrolled form (K known when compiling) sums the products per element
    and reduces across threads once, so nothing holds a program's loads back and the compiler issues them
    together; the loop reduces each piece, behind a barrier, before it loads the next. Small products are
    bound by that chain of waits, large ones by the bytes, where the unrolled form's x tiles (loaded per row
    of W, not once) cost more than they save. H200, 830M shapes, one CUDA graph over 24 weights
    (benchmarks/row_linear.py), loop -> a first unrolled build for every shape: q|k|v with norm and RoPE 6.70
    -> 5.25 us, o 2.96 -> 2.49, w2 5.73 -> 4.29; but w1|w3 with norm and SwiGLU 7.45 -> 8.98 (8.11 at the best
    tiles of 12) and w1|w3 alone 6.69 -> 7.30 (row_linear_h200_ab_loop_unrolled.json). As committed
    (row_linear_h200_7be6ea7.json): q|k|v 5.25, o 2.40, w2 4.58, w1|w3 (the loop) 7.43 us. Requesting all of
    a program's pieces before the PDL wait instead was slower (q|k|v 6.95, o 2.63, w2 4.91 us; batch-1 step
    of the baseline 0.982 / 0.981 ms against 0.966 / 0.963 for the first unrolled build, same session)."""
    return n <= UNROLL_MAX_ROWS


def row_linear(x: torch.Tensor, weight: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
               num_warps: int = 4, unroll: bool | None = None) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T -> [1, N] in x's dtype, accumulated in fp32. unroll: the kernel's form
    (None: unrolled(N))."""
    return _launch(x, weight, PLAIN, block_n, block_k, num_warps, unroll)[1]


def row_linear_silu_mul(x: torch.Tensor, w13: torch.Tensor, block_n: int | None = None,
                        block_k: int | None = None, num_warps: int = 4, unroll: bool | None = None) -> torch.Tensor:
    """silu(x W1^T) * (x W3^T) -> [1, hidden] for x [1, K], w13 [2 * hidden, K]; block_n rows of W1 and the
    same rows of W3 per program (by default half of row_tiles(2 * hidden)'s, so a program reads as much as
    row_linear's over w13 would)."""
    return _launch(x, w13, SWIGLU, block_n, block_k, num_warps, unroll)[1]


def row_norm_linear(h: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, epilogue: int = PLAIN, rotary: tuple | None = None,
                    block_n: int | None = None, block_k: int | None = None, num_warps: int = 4,
                    cache: tuple | None = None, unroll: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta [1, K], the product of RMSNorm(h + delta) * norm_weight with weight, then `epilogue`).
    With ROPE, rotary = (cos, sin [1, d / 2] fp32, the number of leading outputs rotated in interleaved pairs
    of each d-value head) and block_n pairs of rows per program, and with `cache` (_launch's) the k, v (and
    q) outputs also go to the paged caches."""
    return _launch(h, weight, epilogue, block_n, block_k, num_warps, unroll, delta, (norm_weight, eps), rotary,
                   cache)


def _launch(x, weight, epilogue, block_n, block_k, num_warps, unroll, delta=None, norm=None, rotary=None,
            cache=None):
    """(new residual, or x without a norm; y) of the kernel over x [1, K] and weight [N, K]; with ROPE and
    cache = (slots, k_cache, v_cache, q_cache or None, H * d) y's k, v (and q) parts also go to the caches."""
    width, k = weight.shape
    if x.shape != (1, k):
        raise ValueError(f"row_linear takes one row of {k} values, got x of shape {tuple(x.shape)}")
    if epilogue != PLAIN and width % 2:
        raise ValueError(f"{'w13 must stack W1 over W3' if epilogue == SWIGLU else 'q|k|v rows come in pairs'} "
                         f"(an even number of rows), got {width}")
    n_out = width // 2 if epilogue == SWIGLU else width
    default_n, default_k = row_tiles(width) if x.is_cuda else (64, 256)
    # a program reads as many rows of W as row_linear's would: the fastest of {1, 2, 4} x {512, 1024} x {4, 8
    # warps} at the 830M's q|k|v (RoPE: 2 pairs x 512) and w1|w3 (SwiGLU: 4 x 512) in benchmarks/row_linear.py
    if epilogue != PLAIN and x.is_cuda:
        default_n = max(1, default_n // 2)
    block_n, block_k = block_n or default_n, block_k or default_k
    unroll = unrolled(width) if unroll is None else unroll
    x = x.contiguous()
    h_out = torch.empty_like(x) if delta is not None else x
    y = torch.empty(1, n_out, dtype=x.dtype, device=x.device)
    cos, sin, rotated = rotary if rotary is not None else (y, y, 0)
    slots, k_cache, v_cache, q_cache, q_width = cache if cache is not None else (y, y, y, None, 0)
    if epilogue == PLAIN and norm is None:
        _row_linear_kernel[(triton.cdiv(n_out, block_n),)](x, weight, y, n_out, k, weight.stride(0), BN=block_n,
                                                            BK=block_k, KU=k if unroll else 0,
                                                            num_warps=num_warps, **pdl.options(x))
        return h_out, y
    pairs = 2 if epilogue == ROPE else 1
    _row_linear_fused_kernel[(triton.cdiv(n_out, pairs * block_n),)](
        x, x if delta is None else delta.contiguous(), h_out, y if norm is None else norm[0], weight, cos, sin, y,
        slots, k_cache, v_cache, k_cache if q_cache is None else q_cache, n_out, k, weight.stride(0),
        0.0 if norm is None else norm[1], rotated, q_width, HALF=cos.shape[-1] if rotary is not None else 1,
        BN=block_n, BK=block_k, KP=triton.next_power_of_2(k) if norm is not None else 1, ADD=delta is not None,
        NORM=norm is not None, EPILOGUE=epilogue, CACHE=0 if cache is None else 1 if q_cache is None else 2,
        KU=k if unroll else 0, num_warps=num_warps, **pdl.options(x))
    return h_out, y


# ---- device code ----------------------------------------------------------------------------------------
# x_ptr [K]: the input row (with a NORM prologue: the residual h); delta_ptr [K]: added to it (ADD), the sum
# stored to h_ptr [K] by program 0; nw_ptr [K]: the RMSNorm weight; w_ptr [rows, stride_w], unit column
# stride; y_ptr [N]; cos_ptr, sin_ptr [HALF] fp32; slot_ptr [1] int: the row's cache slot; kc_ptr, vc_ptr
# [slots, KD], qc_ptr [slots, QD] (QD = H d, KD = G d = (N - QD) / 2): the paged caches, each slot one row.
# Intermediates are rounded to y's dtype.

@triton.jit
def _row_linear_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BN: tl.constexpr, BK: tl.constexpr, KU: tl.constexpr,
                       PDL: tl.constexpr):
    """BN outputs: y[n] = sum_k W[n, k] x[k]. x_ptr [K]; w_ptr [N, stride_w] (unit column stride); y_ptr [N].
    KU: K for the unrolled form (unrolled()), 0 for the loop, which stays one build for every K."""
    if KU > 0:  # K known when compiling: the pieces' masks fold away
        K = KU
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    k = tl.arange(0, BK)
    if PDL < 2:
        pdl.wait(PDL)
    w = _w_piece(w_ptr, n, k, N, K, stride_w)
    if PDL >= 2:  # W is not written while the model runs: its first piece is requested before the wait
        pdl.launch_dependents(PDL)
        pdl.wait(PDL)
    y, _ = _products(x_ptr, x_ptr, x_ptr, 1.0, w_ptr, stride_w, w, w, n, n, N, N, k, K, BK, KU, False, False,
                     False, y_ptr.dtype.element_ty)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _row_linear_fused_kernel(x_ptr, delta_ptr, h_ptr, nw_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, slot_ptr, kc_ptr,
                             vc_ptr, qc_ptr, N, K, stride_w, eps, ROTATED, QD, HALF: tl.constexpr, BN: tl.constexpr,
                             BK: tl.constexpr, KP: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr,
                             EPILOGUE: tl.constexpr, CACHE: tl.constexpr, KU: tl.constexpr, PDL: tl.constexpr):
    """_row_linear_kernel's product with a prologue and an epilogue. BN outputs y[n] = sum_k W[n, k] x[k]
    (PLAIN); with SWIGLU (W1 over W3, N = hidden) y[n] = silu(W1 x)[n] * (W3 x)[n]; with ROPE (N even) the BN
    pairs of outputs (2j, 2j + 1), rotated where below ROTATED, and with CACHE 1 (2) the k and v (and q)
    outputs also stored to the caches. With NORM, x is first RMSNorm(x (+ delta)) * nw.
    (Requesting each piece of W one iteration ahead, the first before the norm's statistics, was slower on
    the H200 in 35 of 36 measured tile and variant pairs, e.g. q|k|v with norm and RoPE at 2 x 512 6.94 ->
    7.27 us: a one-off sweep during 6bdb142's development, not kept. Only the first piece is requested
    early, and only at PDL level 2, where it overlaps the kernel before.)"""
    TY: tl.constexpr = y_ptr.dtype.element_ty
    if KU > 0:  # K known when compiling: the pieces' masks fold away
        K = KU
    pid = tl.program_id(0)
    if EPILOGUE == 2:  # ROPE: even rows in acc_a, their odd partners in acc_b
        rows_a = pid * 2 * BN + 2 * tl.arange(0, BN)
        rows_b, w_rows = rows_a + 1, N
    else:  # SWIGLU: W1's rows in acc_a, W3's in acc_b
        rows_a = pid * BN + tl.arange(0, BN)
        rows_b, w_rows = rows_a + N, 2 * N
    k = tl.arange(0, BK)
    if PDL < 2:
        pdl.wait(PDL)
    w_a = _w_piece(w_ptr, rows_a, k, N, K, stride_w)
    w_b = w_a
    if EPILOGUE != 0:
        w_b = _w_piece(w_ptr, rows_b, k, w_rows, K, stride_w)
    if PDL >= 2:  # W is not written while the model runs: its first piece is requested before the wait
        pdl.launch_dependents(PDL)
        pdl.wait(PDL)
    inv = 1.0
    if NORM:
        inv = _rms_inverse(x_ptr, delta_ptr, h_ptr, K, eps, ADD, KP, TY)
    acc_a, acc_b = _products(x_ptr, delta_ptr, nw_ptr, inv, w_ptr, stride_w, w_a, w_b, rows_a, rows_b, N, w_rows,
                             k, K, BK, KU, ADD, NORM, EPILOGUE != 0, TY)
    a = acc_a.to(TY)
    if EPILOGUE == 0:
        tl.store(y_ptr + rows_a, a, mask=rows_a < N)
    elif EPILOGUE == 1:
        af = a.to(tl.float32)
        act = (af / (1.0 + tl.exp(-af))).to(TY)
        tl.store(y_ptr + rows_a, (act.to(tl.float32) * acc_b.to(TY).to(tl.float32)).to(TY), mask=rows_a < N)
    else:
        e, o = _rotated(cos_ptr, sin_ptr, rows_a, a.to(tl.float32), acc_b.to(TY).to(tl.float32), ROTATED, HALF)
        _store_qkv(y_ptr, slot_ptr, kc_ptr, vc_ptr, qc_ptr, rows_a, e.to(TY), N, QD, CACHE)
        _store_qkv(y_ptr, slot_ptr, kc_ptr, vc_ptr, qc_ptr, rows_a + 1, o.to(TY), N, QD, CACHE)


@triton.jit
def _products(x_ptr, delta_ptr, nw_ptr, inv, w_ptr, stride_w, w_a, w_b, rows_a, rows_b, N_A, N_B, k, K,
              BK: tl.constexpr, KU: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr, TWO: tl.constexpr,
              TY: tl.constexpr):
    """(W[rows_a] x, W[rows_b] x) [BN] fp32 (the second only with TWO, else the first again), x as
    _normed_input gives it, from each product's first piece w_a, w_b [BN, BK] (loaded by the caller, before
    its PDL wait) on. KU > 0 (= K): the unrolled form, products summed per element and reduced once; else
    the loop, which reduces each piece (unrolled())."""
    if KU > 0:
        x = _normed_input(x_ptr, delta_ptr, nw_ptr, rows_a[:, None] * 0 + k[None, :], K, inv, ADD, NORM, TY)
        acc_a = w_a.to(tl.float32) * x
        acc_b = acc_a
        if TWO:
            acc_b = w_b.to(tl.float32) * x
        for k0 in tl.static_range(BK, KU, BK):
            w_a = _w_piece(w_ptr, rows_a, k0 + k, N_A, K, stride_w)
            if TWO:
                w_b = _w_piece(w_ptr, rows_b, k0 + k, N_B, K, stride_w)
            x = _normed_input(x_ptr, delta_ptr, nw_ptr, rows_a[:, None] * 0 + (k0 + k)[None, :], K, inv, ADD, NORM,
                              TY)
            acc_a += w_a.to(tl.float32) * x
            if TWO:
                acc_b += w_b.to(tl.float32) * x
        sum_a = tl.sum(acc_a, axis=1)
        if TWO:
            return sum_a, tl.sum(acc_b, axis=1)
        return sum_a, sum_a
    x = _normed_input(x_ptr, delta_ptr, nw_ptr, k, K, inv, ADD, NORM, TY)[None, :]
    acc_a = tl.sum(w_a.to(tl.float32) * x, axis=1)
    acc_b = acc_a
    if TWO:
        acc_b = tl.sum(w_b.to(tl.float32) * x, axis=1)
    for k0 in range(BK, K, BK):
        w_a = _w_piece(w_ptr, rows_a, k0 + k, N_A, K, stride_w)
        if TWO:
            w_b = _w_piece(w_ptr, rows_b, k0 + k, N_B, K, stride_w)
        x = _normed_input(x_ptr, delta_ptr, nw_ptr, k0 + k, K, inv, ADD, NORM, TY)[None, :]
        acc_a += tl.sum(w_a.to(tl.float32) * x, axis=1)
        if TWO:
            acc_b += tl.sum(w_b.to(tl.float32) * x, axis=1)
    return acc_a, acc_b


@triton.jit
def _w_piece(w_ptr, rows, k, N, K, stride_w):
    """W[rows, k]: [len(rows), len(k)] in W's dtype, 0 outside [N, K]."""
    return tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + k[None, :],
                   mask=(rows[:, None] < N) & (k[None, :] < K), other=0.0)


@triton.jit
def _input_row(x_ptr, delta_ptr, k, mask, ADD: tl.constexpr, TY: tl.constexpr):
    """x[k] (+ delta[k], rounded as fused_ops' residual add) in fp32."""
    x = tl.load(x_ptr + k, mask=mask, other=0.0).to(tl.float32)
    if ADD:
        x = (x + tl.load(delta_ptr + k, mask=mask, other=0.0).to(tl.float32)).to(TY).to(tl.float32)
    return x


@triton.jit
def _normed_input(x_ptr, delta_ptr, nw_ptr, k, K, inv, ADD: tl.constexpr, NORM: tl.constexpr, TY: tl.constexpr):
    """The product's input x[k] in fp32: with NORM, RMSNorm(x + delta)[k] * nw[k] rounded as fused_ops'
    add_rms_norm rounds it (inv: 1 / RMS)."""
    x = _input_row(x_ptr, delta_ptr, k, k < K, ADD, TY)  # ADD comes with NORM
    if NORM:
        x = (x * inv).to(TY).to(tl.float32)
        x = (x * tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)).to(TY).to(tl.float32)
    return x


@triton.jit
def _rms_inverse(x_ptr, delta_ptr, h_ptr, K, eps, ADD: tl.constexpr, KP: tl.constexpr, TY: tl.constexpr):
    """1 / RMS of the input row, read in one [KP >= K] load (one round trip, not one per BK-wide piece); the
    first program also stores the row (h + delta) to h_ptr."""
    k = tl.arange(0, KP)
    x = _input_row(x_ptr, delta_ptr, k, k < K, ADD, TY)
    if ADD:
        if tl.program_id(0) == 0:
            tl.store(h_ptr + k, x.to(TY), mask=k < K)
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / K + eps)


@triton.jit
def _rotated(cos_ptr, sin_ptr, rows, e, o, ROTATED, HALF: tl.constexpr):
    """Pairs (e, o) of outputs (rows, rows + 1) rotated as fused_ops' _rope_kernel rotates them (two products
    then one add, no fused multiply-add) where rows < ROTATED, else as they are."""
    j = (rows // 2) % HALF
    c = tl.load(cos_ptr + j)
    s = tl.load(sin_ptr + j)
    turn = rows < ROTATED
    new_e = tl.where(turn, tl.fma(e, c, 0.0) - tl.fma(o, s, 0.0), e)
    new_o = tl.where(turn, tl.fma(e, s, 0.0) + tl.fma(o, c, 0.0), o)
    return new_e, new_o


@triton.jit
def _store_qkv(y_ptr, slot_ptr, kc_ptr, vc_ptr, qc_ptr, n, value, N, QD, CACHE: tl.constexpr):
    """Outputs n of a q|k|v row (QD q values, then k and v, KD each) to y and, with CACHE 1 (2), the k and v
    (and q) ones to their cache rows at slot slot_ptr[0], converted as fused_ops' _write_cache_kernel
    converts them."""
    tl.store(y_ptr + n, value, mask=n < N)
    if CACHE == 0:
        return
    slot = tl.load(slot_ptr).to(tl.int64)
    kd = (N - QD) // 2
    value = value.to(kc_ptr.dtype.element_ty)
    tl.store(kc_ptr + slot * kd + (n - QD), value, mask=(n >= QD) & (n < QD + kd))
    tl.store(vc_ptr + slot * kd + (n - QD - kd), value, mask=(n >= QD + kd) & (n < N))
    if CACHE == 2:
        tl.store(qc_ptr + slot * QD + n, value, mask=n < QD)
