"""Linear layers of one-row steps (batch-1 decode) in Triton: y = x W^T for x [1, K], W [N, K].

A one-row product only streams W, so its speed is the speed of that read. cuBLAS runs it as a tiled GEMM
whose few, large tiles read the 830M model's smaller matrices well below the copy bandwidth (H200, one CUDA
graph over 24 distinct weights, `benchmarks/row_linear.py`: the o-projection [1536, 1536] in 6.5 us, 17 %
of the copy bandwidth). Here each program reads whole rows of W in BK-wide pieces and reduces them against
x in fp32, BN rows per program, so even an N of 1536 gives hundreds of programs with their loads in flight
at once. `row_linear_silu_mul` does the same for the fused w1|w3 weight and applies the SwiGLU in the
epilogue (one launch instead of two, no [1, 2 * hidden] intermediate); it is not compiled on a GPU yet, so
the forward does not use it.

The reference is `torch.nn.functional.linear` (and `fused_ops.silu_mul` after it); `linear` and
`linear_silu_mul` send every input of more than one row there. They are for the fused forward, which runs
only where Triton does (a GPU, or Triton's interpreter in the CPU tests, where a program covers 64 rows
since the interpreter's cost is per program).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


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


def _one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dim() == 2 and x.shape[0] == 1 and weight.stride(1) == 1


def row_tiles(n: int) -> tuple[int, int]:
    """(rows of W per program, columns per load): 2 x 1024 below N = 3072, 4 x 512 below 5120, then 8 x 512.
    H200, 830M shapes (benchmarks/row_linear.py --sweep): the best of {2, 4, 8} x {512, 1024} for [1536, 1536]
    and [1536, 4096] was 2 x 1024, for [4608, 1536] 4 x 512, for [8192, 1536] and [128256, 1536] 8 x 512."""
    block_n = max(2, min(8, triton.next_power_of_2(max(1, n // 1024))))
    return block_n, 1024 if block_n == 2 else 512


def row_linear(x: torch.Tensor, weight: torch.Tensor, block_n: int | None = None, block_k: int | None = None,
               num_warps: int = 4) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T -> [1, N] in x's dtype, accumulated in fp32."""
    n, k = weight.shape
    block_n, block_k = _tiles(x, k, n, block_n, block_k)
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _row_linear_kernel[(triton.cdiv(n, block_n),)](x.contiguous(), weight, out, n, k, weight.stride(0),
                                                    BN=block_n, BK=block_k, num_warps=num_warps)
    return out


def row_linear_silu_mul(x: torch.Tensor, w13: torch.Tensor, block_n: int | None = None,
                        block_k: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """silu(x W1^T) * (x W3^T) -> [1, hidden] for x [1, K], w13 [2 * hidden, K]; block_n rows of W1 and the
    same rows of W3 per program (by default half of row_tiles(2 * hidden)'s, so a program reads as much as
    row_linear's over w13 would)."""
    width, k = w13.shape
    if width % 2:
        raise ValueError(f"w13 must stack W1 over W3 (an even number of rows), got {width}")
    hidden = width // 2
    halved = max(1, row_tiles(width)[0] // 2) if x.is_cuda else None  # the interpreter: _tiles' 64 rows
    block_n, block_k = _tiles(x, k, hidden, block_n or halved, block_k)
    out = torch.empty(1, hidden, dtype=x.dtype, device=x.device)
    _row_linear_silu_mul_kernel[(triton.cdiv(hidden, block_n),)](x.contiguous(), w13, out, hidden, k,
                                                                  w13.stride(0), BN=block_n, BK=block_k,
                                                                  num_warps=num_warps)
    return out


def _tiles(x: torch.Tensor, k: int, n: int, block_n: int | None, block_k: int | None) -> tuple[int, int]:
    if x.shape != (1, k):
        raise ValueError(f"row_linear takes one row of {k} values, got x of shape {tuple(x.shape)}")
    default_n, default_k = row_tiles(n) if x.is_cuda else (64, 256)
    return block_n or default_n, block_k or default_k


@triton.jit
def _row_linear_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BN: tl.constexpr, BK: tl.constexpr):
    """BN outputs: y[n] = sum_k W[n, k] x[k]. x_ptr [K]; w_ptr [N, stride_w] (unit column stride); y_ptr [N]."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    acc = tl.zeros((BN,), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_w + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K),
                    other=0.0)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    tl.store(y_ptr + n, acc.to(y_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _row_linear_silu_mul_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BN: tl.constexpr, BK: tl.constexpr):
    """BN outputs y[n] = silu(sum_k W[n, k] x[k]) * sum_k W[n + N, k] x[k], each product rounded to y's dtype
    first, as F.linear + silu_mul round. x_ptr [K]; w_ptr [2 N, stride_w] (W1 over W3, unit column stride);
    y_ptr [N]."""
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    acc1 = tl.zeros((BN,), tl.float32)
    acc3 = tl.zeros((BN,), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        offs = n[:, None].to(tl.int64) * stride_w + k[None, :]
        mask = (n[:, None] < N) & (k[None, :] < K)
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)[None, :]
        acc1 += tl.sum(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32) * x, axis=1)
        acc3 += tl.sum(tl.load(w_ptr + N.to(tl.int64) * stride_w + offs, mask=mask, other=0.0).to(tl.float32) * x,
                       axis=1)
    a = acc1.to(y_ptr.dtype.element_ty).to(tl.float32)
    act = (a / (1.0 + tl.exp(-a))).to(y_ptr.dtype.element_ty)
    y = act.to(tl.float32) * acc3.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n < N)
