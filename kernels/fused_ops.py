"""The transformer block's small operations fused into single Triton kernels: the `triton` backend's forward.

A decode step of a ~1B model moves little data per layer, so its time goes to kernel count: unfused, each
RMSNorm is about seven PyTorch kernels, RoPE about ten, the group norm and gate a dozen. Here each of these
is one kernel (one row, or one (row, head), per program slice), rounding to the model's dtype exactly where
the PyTorch path (`mta_serve.model`, the reference) rounds:

- `add_rms_norm`: h + delta -> (new residual h, RMSNorm(h) * weight): the residual add of the previous
  sub-layer fused into the next norm (reference: `RMSNorm.forward` after `x + delta`).
- `rope`: RoPE of the q and k parts of a fused q|k|v projection; q comes out contiguous for the attention
  kernels, k is rotated in place (reference: `apply_rope`).
- `head_norm_gate`: the attention output (fp32) cast to the model dtype, the MTA group norm with its depth
  scale and the 1-d sigmoid gate (reference: `MTAAttention.norm_and_gate`).
- `silu_mul`: silu(x1) * x3 of a fused w1|w3 projection (reference: `FeedForward.forward`'s middle).
- `write_cache`: the step's k, v (and q for key-query-conv layers) into the paged caches in one kernel
  (reference: `TorchPagedAttention._write`).
- `fill_pending_tokens`: a step's input tokens take the tokens the step before drew on the device, where
  the host holds placeholders for them (reference: `mta_serve.model_runner.fill_pending_tokens_reference`).
- `argmax_rows`: each row's first index of its maximum, the greedy token (reference: `torch.argmax`), in two
  passes over vocabulary chunks, so that one row spreads over the GPU.

Under Triton's interpreter (CPU tests) a program handles several rows, since the interpreter's cost is per
program; on a GPU one row per program.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl


def _rows_per_program(x: torch.Tensor) -> int:
    return 1 if x.is_cuda else 16


def add_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """h, delta [N, dim] (delta None: nothing to add) -> (h + delta [N, dim], RMSNorm(h + delta) [N, dim])."""
    x = h.reshape(-1, h.shape[-1]).contiguous()  # the kernel assumes rows of DIM values
    out_h = torch.empty_like(x) if delta is not None else x
    y = torch.empty_like(x)
    _launch_row_norm(x, delta, out_h, weight, y, eps, scale, norm=True, gate_w=None, gate_b=None)
    return out_h.view(h.shape), y.view(h.shape)


@dataclass(slots=True, frozen=True)
class HeadNormGate:
    """A layer's steps 8-9 as the MTA attention kernels apply them to each (row, head) of their output, the
    way head_norm_gate does: cast to the output's dtype, group norm, 1-d gate."""

    weight: torch.Tensor | None  # [d]: the group norm's weight; None: no group norm
    eps: float
    scale: float  # the group norm's depth scale
    gate_w: torch.Tensor | None  # [d]: the 1-d gate's weight row; None: no gate
    gate_b: torch.Tensor | None  # [1]: its bias

    def kernel_args(self, dummy: torch.Tensor) -> dict:
        """norm_gate's arguments, as the kernels that end in it name them."""
        return dict(nw_ptr=_or(self.weight, dummy), gw_ptr=_or(self.gate_w, dummy), gb_ptr=_or(self.gate_b, dummy),
                    eps=self.eps, scale=self.scale, NORM=self.weight is not None,
                    SCALE=self.weight is not None and self.scale != 1.0, GATE=self.gate_w is not None)


CAST_ONLY = HeadNormGate(None, 0.0, 1.0, None, None)  # no group norm, no gate: the cast alone


def _or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return dummy if t is None else t


def head_norm_gate(heads: torch.Tensor, dtype: torch.dtype, norm_weight: torch.Tensor | None, eps: float,
                   scale: float, gate_w: torch.Tensor | None, gate_b: torch.Tensor | None) -> torch.Tensor:
    """heads [N, H, d] (any float dtype) -> [N, H * d] in `dtype`: cast, then group norm (norm_weight [d],
    None: no norm) and 1-d gate (gate_w [d], gate_b [1], None: no gate)."""
    n, n_heads, head_dim = heads.shape
    x = heads.reshape(n * n_heads, head_dim).contiguous()
    y = torch.empty(x.shape, dtype=dtype, device=heads.device)
    _launch_row_norm(x, None, x, norm_weight, y, eps, scale, norm=norm_weight is not None, gate_w=gate_w,
                     gate_b=gate_b)
    return y.view(n, n_heads * head_dim)


def _launch_row_norm(x, delta, out_h, weight, y, eps, scale, norm, gate_w, gate_b) -> None:
    n_rows, dim = x.shape
    rows = _rows_per_program(x)
    dummy = y
    _row_norm_kernel[(triton.cdiv(n_rows, rows),)](
        x, dummy if delta is None else delta, out_h, dummy if weight is None else weight,
        dummy if gate_w is None else gate_w, dummy if gate_b is None else gate_b, y, n_rows, eps, scale,
        DIM=dim, BLOCK=triton.next_power_of_2(dim), ROWS=rows, HAS_DELTA=delta is not None, NORM=norm,
        SCALE=scale != 1.0, GATE=gate_w is not None, **pdl.options(x))


@triton.jit(do_not_specialize=["n_rows"])
def _row_norm_kernel(x_ptr, delta_ptr, h_ptr, w_ptr, gw_ptr, gb_ptr, y_ptr, n_rows, eps, scale,
                     DIM: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr, HAS_DELTA: tl.constexpr,
                     NORM: tl.constexpr, SCALE: tl.constexpr, GATE: tl.constexpr, PDL: tl.constexpr):
    """ROWS rows of DIM: x [n_rows, DIM] (+ delta, stored to h), cast to y's dtype, RMSNorm * w (* scale),
    then y * sigmoid(y . gw + gb); every step rounded to y's dtype as PyTorch rounds it.
    x, delta, h [n_rows, DIM]; w, gw [DIM]; gb [1]; y [n_rows, DIM]."""
    pdl.wait(PDL)
    pdl.launch_dependents(PDL)  # a row product after it (batch 1: the o-projection after a plain layer's
    # group norm or gate in an MTA model) requests its weights early
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < DIM)
    offs = rows.to(tl.int64) * DIM + cols
    out_ty = y_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(out_ty)
        tl.store(h_ptr + offs, x, mask=mask)
    x = norm_gate(x, w_ptr, gw_ptr, gb_ptr, cols, eps, scale, DIM, NORM, SCALE, GATE, out_ty)
    tl.store(y_ptr + offs, x.to(out_ty), mask=mask)


@triton.jit
def norm_gate(x, w_ptr, gw_ptr, gb_ptr, cols, eps, scale, DIM: tl.constexpr, NORM: tl.constexpr,
              SCALE: tl.constexpr, GATE: tl.constexpr, OUT_TY: tl.constexpr):
    """Rows x [R, BLOCK] (0 where cols [1, BLOCK] >= DIM) cast to OUT_TY, then RMSNorm * w (* scale) and
    x * sigmoid(x . gw + gb), each step rounded to OUT_TY as PyTorch rounds it: fp32 values of OUT_TY.
    Also the MTA attention kernels' epilogue (HeadNormGate)."""
    x = x.to(OUT_TY).to(tl.float32)
    if NORM:
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / DIM + eps)
        x = (x * inv[:, None]).to(OUT_TY).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=cols < DIM, other=0.0).to(tl.float32)
        x = (x * w).to(OUT_TY).to(tl.float32)
        if SCALE:
            x = (x * scale).to(OUT_TY).to(tl.float32)
    if GATE:
        gw = tl.load(gw_ptr + cols, mask=cols < DIM, other=0.0).to(tl.float32)
        g = (tl.sum(x * gw, axis=1) + tl.load(gb_ptr).to(tl.float32)).to(OUT_TY).to(tl.float32)
        g = tl.sigmoid(g).to(OUT_TY).to(tl.float32)
        x = x * g[:, None]
    return x


def rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int, n_kv_heads: int,
         head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [N, (H + 2G) * d] -> q [N, H, d] (new, contiguous), k [N, G, d], v [N, G, d] (views of qkv, k
    rotated in place). cos, sin [N, d / 2] fp32 (model.rope_angles); interleaved pairs as apply_rope."""
    n = qkv.shape[0]
    q = torch.empty(n, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    pairs = (n_heads + n_kv_heads) * head_dim // 2
    rows = _rows_per_program(qkv)
    _rope_kernel[(triton.cdiv(n, rows),)](
        qkv, cos, sin, q, n, QKV_STRIDE=qkv.shape[1], Q_PAIRS=n_heads * head_dim // 2, PAIRS=pairs,
        BLOCK=triton.next_power_of_2(pairs), HALF=head_dim // 2, ROWS=rows)
    k_end = (n_heads + n_kv_heads) * head_dim
    k = qkv[:, n_heads * head_dim:k_end].view(n, n_kv_heads, head_dim)
    v = qkv[:, k_end:].view(n, n_kv_heads, head_dim)
    return q, k, v


@triton.jit(do_not_specialize=["n_rows"])
def _rope_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, n_rows, QKV_STRIDE: tl.constexpr, Q_PAIRS: tl.constexpr,
                 PAIRS: tl.constexpr, BLOCK: tl.constexpr, HALF: tl.constexpr, ROWS: tl.constexpr):
    """Pairs (2j, 2j+1) of the q and k heads of ROWS rows: q's into q_ptr, k's back into qkv.
    qkv [n_rows, QKV_STRIDE]; cos, sin [n_rows, HALF] fp32; q [n_rows, 2 * Q_PAIRS]."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    j = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (j < PAIRS)
    src = qkv_ptr + rows.to(tl.int64) * QKV_STRIDE + 2 * j
    even = tl.load(src, mask=mask, other=0.0)
    odd = tl.load(src + 1, mask=mask, other=0.0)
    c = tl.load(cos_ptr + rows * HALF + j % HALF, mask=mask, other=0.0)
    s = tl.load(sin_ptr + rows * HALF + j % HALF, mask=mask, other=0.0)
    e, o = even.to(tl.float32), odd.to(tl.float32)
    # two products then one add, as PyTorch computes them: no fused multiply-add
    new_even = (tl.fma(e, c, 0.0) - tl.fma(o, s, 0.0)).to(even.dtype)
    new_odd = (tl.fma(e, s, 0.0) + tl.fma(o, c, 0.0)).to(even.dtype)
    is_q = j < Q_PAIRS
    dst_q = q_ptr + rows.to(tl.int64) * (2 * Q_PAIRS) + 2 * j
    tl.store(dst_q, new_even, mask=mask & is_q)
    tl.store(dst_q + 1, new_odd, mask=mask & is_q)
    tl.store(src, new_even, mask=mask & ~is_q)
    tl.store(src + 1, new_odd, mask=mask & ~is_q)


def silu_mul(x13: torch.Tensor) -> torch.Tensor:
    """x13 [N, 2 * hidden] (w1 | w3 outputs) -> silu(x1) * x3 [N, hidden], rounded like PyTorch's two ops."""
    n, width = x13.shape
    hidden = width // 2
    out = torch.empty(n, hidden, dtype=x13.dtype, device=x13.device)
    block = min(1024, triton.next_power_of_2(hidden))
    rows = _rows_per_program(x13)
    _silu_mul_kernel[(triton.cdiv(n, rows), triton.cdiv(hidden, block))](
        x13, out, n, HIDDEN=hidden, BLOCK=block, ROWS=rows)
    return out


@triton.jit(do_not_specialize=["n_rows"])
def _silu_mul_kernel(x_ptr, out_ptr, n_rows, HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    """x [n_rows, 2 * HIDDEN] -> out [n_rows, HIDDEN]."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < HIDDEN)
    src = x_ptr + rows.to(tl.int64) * (2 * HIDDEN) + cols
    a = tl.load(src, mask=mask, other=0.0)
    b = tl.load(src + HIDDEN, mask=mask, other=0.0)
    af = a.to(tl.float32)
    act = (af / (1.0 + tl.exp(-af))).to(a.dtype)
    tl.store(out_ptr + rows.to(tl.int64) * HIDDEN + cols, (act.to(tl.float32) * b.to(tl.float32)).to(a.dtype),
             mask=mask)


def write_cache(slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor | None,
                k_cache: torch.Tensor, v_cache: torch.Tensor, q_cache: torch.Tensor | None) -> None:
    """The step's tokens into the paged caches: slots [N] (int32/int64); k, v [N, G, d] with unit stride
    inside a row (views of a fused projection are fine); q [N, H, d] or None; caches [blocks, bs, heads, d]."""
    n, n_kv, head_dim = k.shape
    if n == 0:
        return
    for t in (k, v) if q_cache is None else (k, v, q):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError(f"write_cache needs rows of heads x head_dim contiguous values, got strides "
                             f"{t.stride()}")
    n_q = 0 if q_cache is None else q.shape[1]
    width = max(n_kv, n_q) * head_dim
    rows = _rows_per_program(k)
    _write_cache_kernel[(triton.cdiv(n, rows),)](
        slots, k, v, k if q_cache is None else q, k_cache, v_cache, k_cache if q_cache is None else q_cache,
        n, k.stride(0), v.stride(0), 0 if q_cache is None else q.stride(0), KV=n_kv * head_dim,
        QW=n_q * head_dim, BLOCK=triton.next_power_of_2(width), ROWS=rows, **pdl.options(k))


@triton.jit(do_not_specialize=["n_rows", "k_stride", "v_stride", "q_stride"])
def _write_cache_kernel(slot_ptr, k_ptr, v_ptr, q_ptr, kc_ptr, vc_ptr, qc_ptr, n_rows, k_stride, v_stride,
                        q_stride, KV: tl.constexpr, QW: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                        PDL: tl.constexpr):
    """Row i of k, v (KV values) and q (QW values, 0: none) to cache slot slots[i] (a cache row of KV / QW
    values). slots [n_rows]; k [n_rows, k_stride]; caches [slots, KV] and [slots, QW]."""
    pdl.wait(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    ok = rows < n_rows
    slot = tl.load(slot_ptr + rows, mask=ok, other=0).to(tl.int64)
    rows64 = rows.to(tl.int64)
    kv_mask = ok & (cols < KV)
    ty = kc_ptr.dtype.element_ty
    tl.store(kc_ptr + slot * KV + cols, tl.load(k_ptr + rows64 * k_stride + cols, mask=kv_mask).to(ty),
             mask=kv_mask)
    tl.store(vc_ptr + slot * KV + cols, tl.load(v_ptr + rows64 * v_stride + cols, mask=kv_mask).to(ty),
             mask=kv_mask)
    if QW > 0:
        q_mask = ok & (cols < QW)
        tl.store(qc_ptr + slot * QW + cols, tl.load(q_ptr + rows64 * q_stride + cols, mask=q_mask).to(ty),
                 mask=q_mask)


def fill_pending_tokens(tokens: torch.Tensor, sampled: torch.Tensor) -> None:
    """tokens [N] int32 or int64, in place: each placeholder -1 - j (Request.append_pending) becomes
    sampled[j]; sampled [M] int64: the tokens the previous step drew, on the same device."""
    n = tokens.numel()
    block = 1024 if tokens.is_cuda else max(16, triton.next_power_of_2(n))
    _fill_pending_kernel[(triton.cdiv(n, block),)](tokens, sampled, n, BLOCK=block)


@triton.jit(do_not_specialize=["n"])
def _fill_pending_kernel(tokens_ptr, sampled_ptr, n, BLOCK: tl.constexpr):
    # tokens_ptr: [n] int32 / int64, rewritten where < 0; sampled_ptr: [M] int64
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    pending = offsets < n
    token = tl.load(tokens_ptr + offsets, mask=pending, other=0)
    pending = pending & (token < 0)
    drawn = tl.load(sampled_ptr + (-1 - token), mask=pending, other=0)
    tl.store(tokens_ptr + offsets, drawn.to(token.dtype), mask=pending)


ARGMAX_CHUNK = 2048  # vocabulary entries per program of argmax_rows' first pass on a GPU


def argmax_rows(x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """x [B, V] -> [B] int64: the first index of each row's maximum, as torch.argmax(x, dim=-1), NaN counting
    as +inf (torch takes the first NaN: the two differ only in a row holding +inf before its first NaN).
    Pass 1: each program one `chunk` of one row (default ARGMAX_CHUNK); pass 2: one program per row merges
    them. (torch's reduction of one row runs in one thread block: in the 830M models' batch-1 step profile on
    the H200 at 094c412, a 27 us torch reduce kernel per step.)"""
    n, vocab = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    chunk = chunk or (ARGMAX_CHUNK if x.is_cuda else max(16, triton.next_power_of_2(vocab)))
    num_chunks = triton.cdiv(vocab, chunk)
    best = torch.empty(n, num_chunks, dtype=torch.float32, device=x.device)
    where = torch.empty(n, num_chunks, dtype=torch.int32, device=x.device)
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    if n == 0:
        return out
    _chunk_argmax_kernel[(n, num_chunks)](x, best, where, vocab, x.stride(0), num_chunks, CHUNK=chunk)
    _merge_argmax_kernel[(n,)](best, where, out, num_chunks, CP=triton.next_power_of_2(num_chunks))
    return out


@triton.jit(do_not_specialize=["vocab", "stride", "num_chunks"])
def _chunk_argmax_kernel(x_ptr, best_ptr, where_ptr, vocab, stride, num_chunks, CHUNK: tl.constexpr):
    """Max and its first index of one chunk of one row. x_ptr [B, stride]; best_ptr [B, num_chunks] fp32,
    where_ptr [B, num_chunks] int32."""
    row, c = tl.program_id(0), tl.program_id(1)
    cols = c * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row.to(tl.int64) * stride + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)
    i = tl.argmax(x, axis=0, tie_break_left=True)
    tl.store(best_ptr + row * num_chunks + c, tl.max(x, axis=0))
    tl.store(where_ptr + row * num_chunks + c, c * CHUNK + i)


@triton.jit(do_not_specialize=["num_chunks"])
def _merge_argmax_kernel(best_ptr, where_ptr, out_ptr, num_chunks, CP: tl.constexpr):
    """One row: the largest chunk maximum, the first chunk holding it on a tie. out_ptr [B] int64."""
    row = tl.program_id(0)
    c = tl.arange(0, CP)
    best = tl.load(best_ptr + row * num_chunks + c, mask=c < num_chunks, other=float("-inf"))
    where = tl.load(where_ptr + row * num_chunks + c, mask=c < num_chunks, other=0)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where((best == top) & (c < num_chunks), c, CP), axis=0)
    tl.store(out_ptr + row, tl.sum(tl.where(c == first, where, 0), axis=0).to(tl.int64))
