"""kernels.row_linear (one-row linear layers) against torch.nn.functional.linear (and fused_ops.silu_mul): under
Triton's interpreter on the CPU in fp32 and fp16, compiled in bf16 on a GPU at the 830M model's shapes. The
engine tests run it too: the triton backend's fused forward sends every one-row step through it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a Linux-only dependency

from mta_serve.kernels import row_linear as rl  # noqa: E402
from mta_serve.kernels.fused_ops import silu_mul  # noqa: E402
from mta_serve.kernels.row_linear import (linear, linear_silu_mul, row_linear, row_linear_silu_mul,  # noqa: E402
                                          row_tiles)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tiles", [(4, 128), (2, 64), (None, None)])
def test_row_linear_matches_f_linear(dtype, tiles):
    """N and K not multiples of the tiles (masked edges), a weight whose rows are strided (a view of a wider
    tensor, like the fused q|k|v weight's parts), the default tiles."""
    wide = _randn(37, 310, dtype=dtype, seed=1)
    weight = wide[:, :300]
    x = _randn(1, 300, dtype=dtype)
    out = row_linear(x, weight, block_n=tiles[0], block_k=tiles[1])
    assert out.dtype == dtype and out.shape == (1, 37)
    torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float()), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tiles", [(4, 128), (None, None)])
def test_row_linear_silu_mul_is_row_linear_then_silu_mul(dtype, tiles):
    """The SwiGLU epilogue over a stacked w1|w3 weight equals row_linear followed by fused_ops.silu_mul bit
    for bit when both reduce over the same tiles (it rounds each product to the dtype first, as they do), and
    the fp32 SwiGLU within the dtype's rounding otherwise; hidden 37 is not a multiple of the tiles."""
    w13, x = _randn(74, 300, dtype=dtype, seed=4), _randn(1, 300, dtype=dtype, seed=5)
    out = row_linear_silu_mul(x, w13, block_n=tiles[0], block_k=tiles[1])
    assert out.dtype == dtype and out.shape == (1, 37)
    if tiles[0] is not None:
        assert torch.equal(out, silu_mul(row_linear(x, w13, block_n=tiles[0], block_k=tiles[1])))
    y13 = F.linear(x.float(), w13.float())
    torch.testing.assert_close(out.float(), F.silu(y13[:, :37]) * y13[:, 37:], **_tol(dtype))


def test_row_linear_refuses_more_than_one_row_and_odd_w13():
    with pytest.raises(ValueError, match="one row of 8 values"):
        row_linear(torch.ones(2, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="an even number of rows"):
        row_linear_silu_mul(torch.ones(1, 8, device=DEVICE), torch.ones(5, 8, device=DEVICE))


def test_row_tiles_follow_the_measured_shapes():
    assert [row_tiles(n) for n in (1536, 4608, 8192, 128256, 16)] == [(2, 1024), (4, 512), (8, 512), (8, 512),
                                                                        (2, 1024)]
    assert [row_tiles(n) for n in (3071, 3072, 5119, 5120)] == [(2, 1024), (4, 512), (4, 512), (8, 512)]


def test_linear_takes_the_row_kernel_for_one_row_only(monkeypatch):
    """One row: the Triton kernels; more rows: F.linear itself (bit-equal) and F.linear + silu_mul."""
    calls = []
    monkeypatch.setattr(rl, "row_linear", lambda x, w: calls.append("linear") or F.linear(x, w))
    monkeypatch.setattr(rl, "row_linear_silu_mul", lambda x, w: calls.append("silu_mul") or x)
    weight, x = _randn(40, 24, dtype=torch.float32), _randn(3, 24, dtype=torch.float32, seed=2)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    assert torch.equal(linear_silu_mul(x, weight), silu_mul(F.linear(x, weight)))
    assert calls == []
    linear(x[:1], weight)
    linear_silu_mul(x[:1], weight)
    linear(x[:1], weight.t().contiguous().t())  # columns not contiguous: F.linear
    assert calls == ["linear", "silu_mul"]


@gpu_only
@pytest.mark.parametrize("shape", [(4608, 1536), (1536, 1536), (8192, 1536), (1536, 4096)])
def test_row_linear_bf16_at_the_830m_shapes(shape):
    """bf16 on the GPU: fp32 accumulation, so within one bf16 rounding of the fp32 product; and the SwiGLU
    variant over the [8192, 1536] w1|w3 shape."""
    weight = _randn(*shape, dtype=torch.bfloat16) * 0.02
    x = _randn(1, shape[1], dtype=torch.bfloat16, seed=3)
    out = row_linear(x, weight)
    torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float()), atol=1e-3, rtol=8e-3)
    assert torch.equal(linear(x, weight), out)
    if shape == (8192, 1536):
        y13 = F.linear(x.float(), weight.float())
        expected = F.silu(y13[:, :4096]) * y13[:, 4096:]
        torch.testing.assert_close(row_linear_silu_mul(x, weight).float(), expected, atol=1e-3, rtol=2e-2)
