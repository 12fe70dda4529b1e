"""kernels.row_linear (one-row linear layers) against torch.nn.functional.linear and the fused_ops kernels its
prologue and epilogues replace (add_rms_norm before it, silu_mul and rope after it): under
Triton's interpreter on the CPU in fp32 and fp16, compiled in bf16 on a GPU at the 830M model's shapes. The
engine tests run it too: the triton backend's fused forward sends every one-row step through it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a Linux-only dependency

from mta_serve.kernels import row_linear as rl  # noqa: E402
from mta_serve.kernels.fused_ops import add_rms_norm, rope, silu_mul  # noqa: E402
from mta_serve.kernels.row_linear import (ROPE, SWIGLU, linear, linear_silu_mul, norm_linear,  # noqa: E402
                                          norm_qkv_rope, row_linear, row_linear_silu_mul, row_norm_linear,
                                          row_tiles)
from mta_serve.model import rope_angles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tiles", [(4, 128), (2, 64), (None, None)])
@pytest.mark.parametrize("unroll", [False, True])
def test_row_linear_matches_f_linear(dtype, tiles, unroll):
    """N and K not multiples of the tiles (masked edges), a weight whose rows are strided (a view of a wider
    tensor, like the fused q|k|v weight's parts), the default tiles; the kernel's loop over pieces of K and
    its unrolled form."""
    wide = _randn(37, 310, dtype=dtype, seed=1)
    weight = wide[:, :300]
    x = _randn(1, 300, dtype=dtype)
    out = row_linear(x, weight, block_n=tiles[0], block_k=tiles[1], unroll=unroll)
    assert out.dtype == dtype and out.shape == (1, 37)
    torch.testing.assert_close(out.float(), F.linear(x.float(), weight.float()), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tiles", [(4, 128), (None, None)])
@pytest.mark.parametrize("unroll", [False, True])
def test_row_linear_silu_mul_is_row_linear_then_silu_mul(dtype, tiles, unroll):
    """The SwiGLU epilogue over a stacked w1|w3 weight equals row_linear followed by fused_ops.silu_mul bit
    for bit when both reduce over the same tiles (it rounds each product to the dtype first, as they do), and
    the fp32 SwiGLU within the dtype's rounding otherwise; hidden 37 is not a multiple of the tiles. Both
    forms of the kernels (unroll), each against the same form."""
    w13, x = _randn(74, 300, dtype=dtype, seed=4), _randn(1, 300, dtype=dtype, seed=5)
    out = row_linear_silu_mul(x, w13, block_n=tiles[0], block_k=tiles[1], unroll=unroll)
    assert out.dtype == dtype and out.shape == (1, 37)
    if tiles[0] is not None:
        assert torch.equal(out, silu_mul(row_linear(x, w13, block_n=tiles[0], block_k=tiles[1], unroll=unroll)))
    y13 = F.linear(x.float(), w13.float())
    torch.testing.assert_close(out.float(), F.silu(y13[:, :37]) * y13[:, 37:], **_tol(dtype))


def test_row_linear_refuses_more_than_one_row_and_odd_w13():
    with pytest.raises(ValueError, match="one row of 8 values"):
        row_linear(torch.ones(2, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="an even number of rows"):
        row_linear_silu_mul(torch.ones(1, 8, device=DEVICE), torch.ones(5, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"q\|k\|v rows come in pairs"):
        ones = torch.ones(1, 8, device=DEVICE)
        row_norm_linear(ones, None, ones[0], 1e-5, torch.ones(5, 8, device=DEVICE), ROPE, (ones, ones, 4))


def test_row_tiles_follow_the_measured_shapes():
    assert [row_tiles(n) for n in (1536, 4608, 8192, 128256, 16)] == [(2, 1024), (4, 512), (8, 512), (8, 512),
                                                                        (2, 1024)]
    assert [row_tiles(n) for n in (3071, 3072, 5119, 5120)] == [(2, 1024), (4, 512), (4, 512), (8, 512)]
    # the 830M's q|k|v, o and w2 products take the unrolled form, w1|w3 and the LM head the loop
    assert [rl.unrolled(n) for n in (1536, 4608, 4609, 8192, 128256)] == [True, True, False, False, False]


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


def _norm_inputs(dtype, width=300, with_delta=True):
    h = _randn(1, width, dtype=dtype, seed=6)
    delta = _randn(1, width, dtype=dtype, seed=7) if with_delta else None
    return h, delta, (1.0 + 0.2 * _randn(width, dtype=torch.float32, seed=8)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("tiles", [(4, 128), (None, None)])
@pytest.mark.parametrize("unroll", [False, True])
def test_norm_linear_is_add_rms_norm_then_the_product(dtype, silu, with_delta, tiles, unroll):
    """The residual add and RMSNorm in the product's prologue: the new residual bit-equal to add_rms_norm's
    (stored once, by the first of several programs with (4, 128) tiles), the product within the dtype's
    rounding of the product of add_rms_norm's output (K = 300: the product runs over three and two pieces of
    the row, the norm's statistics over one 512-wide load). Without a delta the residual is h itself. Both
    forms of the kernel (unroll)."""
    h, delta, norm_w = _norm_inputs(dtype, with_delta=with_delta)
    weight = _randn(74, 300, dtype=dtype, seed=9)
    h_ref, x_ref = add_rms_norm(h, delta, norm_w, 1e-5)
    h_new, y = row_norm_linear(h, delta, norm_w, 1e-5, weight, SWIGLU if silu else 0, block_n=tiles[0],
                               block_k=tiles[1], unroll=unroll)
    assert torch.equal(h_new, h_ref) and (with_delta or h_new.data_ptr() == h.data_ptr())
    expected = F.linear(x_ref.float(), weight.float())
    if silu:
        expected = F.silu(expected[:, :37]) * expected[:, 37:]
    assert y.dtype == dtype and y.shape == expected.shape
    torch.testing.assert_close(y.float(), expected, **_tol(dtype))
    if tiles[0] is None and unroll:  # the dispatcher (74 rows: unrolled): one row takes this kernel, more rows
        # the two kernels exactly
        h_one, y_one = norm_linear(h, delta, norm_w, 1e-5, weight, silu_mul=silu)
        assert torch.equal(h_one, h_new) and torch.equal(y_one, y)
        rows = torch.cat([h, h.flip(1)]), None if delta is None else torch.cat([delta, delta])
        h2, y2 = norm_linear(*rows, norm_w, 1e-5, weight, silu_mul=silu)
        h2_ref, x2_ref = add_rms_norm(*rows, norm_w, 1e-5)
        assert torch.equal(h2, h2_ref)
        assert torch.equal(y2, (linear_silu_mul if silu else F.linear)(x2_ref, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tiles", [(2, 128), (None, None)])
@pytest.mark.parametrize("unroll", [False, True])
def test_norm_qkv_rope_is_the_norm_the_product_and_rope(dtype, tiles, unroll):
    """3 query heads, 1 key/value head of 8 values: q and k rotated in interleaved pairs at position 7, v
    as the product left it, within the dtype's rounding of add_rms_norm -> F.linear -> fused_ops.rope (2 pairs
    per program with (2, 128) tiles: pairs of rows that straddle the q / k / v boundaries' programs); both
    forms of the kernel (unroll)."""
    h, delta, norm_w = _norm_inputs(dtype)
    wqkv = _randn(40, 300, dtype=dtype, seed=10)
    cos, sin = rope_angles(torch.tensor([7], device=DEVICE), 8, 10000.0)
    _, x_ref = add_rms_norm(h, delta, norm_w, 1e-5)
    qkv_ref = F.linear(x_ref.float(), wqkv.float()).to(dtype)
    expected = rope(qkv_ref, cos, sin, 3, 1, 8)
    h_new, qkv = row_norm_linear(h, delta, norm_w, 1e-5, wqkv, ROPE, (cos, sin, 32), block_n=tiles[0],
                                 block_k=tiles[1], unroll=unroll)
    assert torch.equal(h_new, add_rms_norm(h, delta, norm_w, 1e-5)[0])
    q, k, v = qkv[:, :24].view(1, 3, 8), qkv[:, 24:32].view(1, 1, 8), qkv[:, 32:].view(1, 1, 8)
    for got, want in zip((q, k, v), expected):
        torch.testing.assert_close(got.float(), want.float(), **_tol(dtype))
    if tiles[0] is None and unroll:  # the dispatcher (40 rows: unrolled)
        _, *views = norm_qkv_rope(h, delta, norm_w, 1e-5, wqkv, cos, sin, 3, 1, 8)
        assert all(torch.equal(a, b) for a, b in zip(views, (q, k, v)))
        assert [t.shape for t in views] == [(1, 3, 8), (1, 1, 8), (1, 1, 8)] and views[0].is_contiguous()
        rows = torch.cat([h, h]), torch.cat([delta, delta.flip(1)])
        cos2, sin2 = rope_angles(torch.tensor([7, 2], device=DEVICE), 8, 10000.0)
        _, *two = norm_qkv_rope(*rows, norm_w, 1e-5, wqkv, cos2, sin2, 3, 1, 8)
        _, x2 = add_rms_norm(*rows, norm_w, 1e-5)
        assert all(torch.equal(a, b) for a, b in zip(two, rope(F.linear(x2, wqkv), cos2, sin2, 3, 1, 8)))


@pytest.mark.parametrize("with_q", [False, True])
@pytest.mark.parametrize("rows", [1, 2])
def test_norm_qkv_rope_writes_the_caches_as_write_cache(with_q, rows):
    """With a cache destination, norm_qkv_rope's k and v (and q) land in the paged caches exactly as
    fused_ops.write_cache puts them (one row: from the product's epilogue; two rows: through write_cache),
    and nothing else in the caches changes; 3 query heads, 1 key/value head of 8 values, 4-slot blocks."""
    from mta_serve.kernels.fused_ops import write_cache

    h, delta, norm_w = _norm_inputs(torch.float32)
    wqkv = _randn(40, 300, dtype=torch.float32, seed=10)
    if rows == 2:
        h, delta = torch.cat([h, h.flip(1)]), torch.cat([delta, delta])
    cos, sin = rope_angles(torch.tensor([7, 2][:rows], device=DEVICE), 8, 10000.0)
    slots = torch.tensor([9, 2][:rows], dtype=torch.int32, device=DEVICE)

    def caches():  # k, v [3 blocks, 4, 1, 8], q [3, 4, 3, 8]: NaN, so a write of the wrong length shows
        return [torch.full((3, 4, n, 8), float("nan"), device=DEVICE) for n in (1, 1, 3)]

    got, want = caches(), caches()
    if not with_q:
        got[2] = want[2] = None
    _, q, k, v = norm_qkv_rope(h, delta, norm_w, 1e-5, wqkv, cos, sin, 3, 1, 8, cache=(slots, *got))
    write_cache(slots, k, v, q, *want)
    for g, w in zip(got, want):
        if w is not None:
            assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.nan_to_num(), w.nan_to_num())
    assert (got[0].view(-1, 8)[slots.long()] == k.view(rows, 8)).all()


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
    other = row_linear(x, weight, unroll=not rl.unrolled(shape[0]))  # the form the rule did not pick
    torch.testing.assert_close(other.float(), F.linear(x.float(), weight.float()), atol=1e-3, rtol=8e-3)
    if shape == (8192, 1536):
        y13 = F.linear(x.float(), weight.float())
        expected = F.silu(y13[:, :4096]) * y13[:, 4096:]
        torch.testing.assert_close(row_linear_silu_mul(x, weight).float(), expected, atol=1e-3, rtol=2e-2)


@gpu_only
def test_fused_prologue_and_epilogues_bf16_at_the_830m_shapes():
    """bf16 on the GPU, the forward's two fused batch-1 products: norm_qkv_rope over [4608, 1536] (16 + 2 x 16
    heads of 96) and norm_linear with the SwiGLU over [8192, 1536], against add_rms_norm, an fp32 product and
    fused_ops.rope / the fp32 SwiGLU."""
    h, delta = _randn(1, 1536, dtype=torch.bfloat16, seed=11), _randn(1, 1536, dtype=torch.bfloat16, seed=12)
    norm_w = (1.0 + 0.2 * _randn(1536, dtype=torch.float32, seed=13)).to(torch.bfloat16)
    h_ref, x_ref = add_rms_norm(h, delta, norm_w, 1e-5)
    wqkv, w13 = _randn(4608, 1536, dtype=torch.bfloat16) * 0.02, _randn(8192, 1536, dtype=torch.bfloat16) * 0.02
    cos, sin = rope_angles(torch.tensor([1234], device=DEVICE), 96, 100000.0)
    h_new, *qkv = norm_qkv_rope(h, delta, norm_w, 1e-5, wqkv, cos, sin, 16, 16, 96)
    assert torch.equal(h_new, h_ref)
    expected = rope(F.linear(x_ref.float(), wqkv.float()).to(torch.bfloat16), cos, sin, 16, 16, 96)
    for got, want in zip(qkv, expected):
        torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=8e-3)
    h_new, y = norm_linear(h, delta, norm_w, 1e-5, w13, silu_mul=True)
    assert torch.equal(h_new, h_ref)
    y13 = F.linear(x_ref.float(), w13.float())
    torch.testing.assert_close(y.float(), F.silu(y13[:, :4096]) * y13[:, 4096:], atol=1e-3, rtol=2e-2)


def test_pdl_level_is_validated_and_off_for_cpu_tensors(monkeypatch):
    """MTA_SERVE_PDL names a level; anything else is refused with a message naming the variable rather than
    silently ignored, and kernels on CPU tensors (Triton's interpreter) launch without PDL."""
    from mta_serve.kernels import pdl

    monkeypatch.setenv("MTA_SERVE_PDL", "on")
    pdl.level.cache_clear()
    try:
        with pytest.raises(ValueError, match="MTA_SERVE_PDL must be one of 0, 1, 2, got 'on'"):
            pdl.level(0)
    finally:
        pdl.level.cache_clear()
    assert pdl.options(torch.zeros(1)) == dict(PDL=0)
