"""kernels.row_linear (one-row linear layers) against torch.nn.functional.linear: under Triton's interpreter on
the CPU in fp32 and fp16, compiled in bf16 on a GPU at the 830M model's shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a Linux-only dependency

from mta_serve.kernels.row_linear import linear, row_linear, row_tiles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tiles", [(4, 128), (2, 64), (None, None)])
def test_row_linear_matches_f_linear(dtype, tiles):
    """N and K not multiples of the tiles (masked edges), a weight whose rows are strided (a view of a wider
    tensor, like the fused q|k|v weight's parts), the default tiles for N = 37."""
    wide = _randn(37, 310, dtype=dtype, seed=1)
    weight = wide[:, :300]
    x = _randn(1, 300, dtype=dtype)
    out = row_linear(x, weight, block_n=tiles[0], block_k=tiles[1])
    expected = F.linear(x.float(), weight.float())
    assert out.dtype == dtype and out.shape == (1, 37)
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(out.float(), expected, **tol)


def test_row_linear_refuses_more_than_one_row():
    with pytest.raises(ValueError, match="one row of 8 values"):
        row_linear(torch.ones(2, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE))


def test_row_tiles_follow_the_measured_shapes():
    assert [row_tiles(n) for n in (1536, 4608, 8192, 128256, 16)] == [(2, 1024), (4, 512), (8, 512), (8, 512),
                                                                        (2, 1024)]
    assert [row_tiles(n) for n in (3071, 3072, 5119, 5120)] == [(2, 1024), (4, 512), (4, 512), (8, 512)]


def test_linear_keeps_f_linear_off_the_gpu_and_for_several_rows():
    """On the CPU, and for M > 1 anywhere, `linear` is F.linear itself (bit-equal)."""
    weight, x = _randn(40, 24, dtype=torch.float32), _randn(3, 24, dtype=torch.float32, seed=2)
    assert torch.equal(linear(x, weight), F.linear(x, weight))
    if DEVICE == "cpu":
        assert torch.equal(linear(x[:1], weight), F.linear(x[:1], weight))


@gpu_only
@pytest.mark.parametrize("shape", [(4608, 1536), (1536, 1536), (8192, 1536), (1536, 4096)])
def test_row_linear_bf16_at_the_830m_shapes(shape):
    """bf16 on the GPU: fp32 accumulation, so within one bf16 rounding of the fp32 product; `linear` takes
    this path for one row."""
    weight = _randn(*shape, dtype=torch.bfloat16) * 0.02
    x = _randn(1, shape[1], dtype=torch.bfloat16, seed=3)
    out = row_linear(x, weight)
    torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float()), atol=1e-3, rtol=8e-3)
    assert torch.equal(linear(x, weight), out)
