"""Linear layers of one-row steps (batch-1 decode) in Triton: y = x W^T for x [1, K], W [N, K].

A one-row product only streams W, so its speed is the speed of that read. cuBLAS runs it as a tiled GEMM
whose few, large tiles read the 830M model's smaller matrices well below the copy bandwidth (H200, one CUDA
graph over 24 distinct weights, `benchmarks/row_linear.py`: the o-projection [1536, 1536] in 6.5 us, 17 %
of the copy bandwidth). Here each program reads whole rows of W in BK-wide pieces and reduces them against x in fp32,
BN rows per program, so even an N of 1536 gives hundreds of programs with their loads in flight at once.
The reference is `torch.nn.functional.linear`; `linear` sends everything but one-row CUDA inputs there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight) for x [M, K], weight [N, K]; through row_linear when M == 1 on a GPU."""
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_cuda or weight.stride(1) != 1:
        return F.linear(x, weight)
    return row_linear(x, weight)


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
    if x.shape != (1, k):
        raise ValueError(f"row_linear takes one row of {k} values, got x of shape {tuple(x.shape)}")
    default_n, default_k = row_tiles(n)
    block_n, block_k = block_n or default_n, block_k or default_k
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _row_linear_kernel[(triton.cdiv(n, block_n),)](x, weight, out, n, k, weight.stride(0), BN=block_n,
                                                    BK=block_k, num_warps=num_warps)
    return out


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
