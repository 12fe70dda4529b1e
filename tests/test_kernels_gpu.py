"""The Triton kernels compiled on CUDA (skipped without a GPU), at the paper's head shapes, bf16 and fp16,
contexts up to 16k, against the PyTorch reference computed in fp32 from the same cache contents."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # a Linux-only dependency

from mta_serve.kernels.mta_attention import layer_params, mta_paged_attention  # noqa: E402
from mta_serve.kernels.work_items import build_work_items  # noqa: E402
from mta_serve.kernels.paged_flash import paged_flash_attention  # noqa: E402
from mta_serve.kernels.reference import paged_attention_reference  # noqa: E402
from test_kernels import _on_device, mta_weights  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = {"830M": (16, 96), "550M": (10, 128)}
# decode rows at contexts 1 .. 16k; prompt chunks: a whole 1500-token prompt and 512 rows after 3000 cached
DECODE = [(0, 1), (700, 701), (4095, 4096), (16383, 16384)]
PREFILL = [(0, 1500), (3000, 3512), (0, 5)]
BLOCK = 16


def _inputs(seqs, heads, dtype):
    from test_kernels import paged_inputs

    n_heads, head_dim = heads
    return paged_inputs(seqs, BLOCK, dtype, device="cuda", heads=(n_heads, n_heads, head_dim))


def _weights(layer: str, n_heads: int):
    if layer == "conv":
        return mta_weights(pre=(6, 11), post=(6, 11), wpsm=True, head_kernel=n_heads, n_heads=n_heads)
    return mta_weights(wpsm=True, head_kernel=n_heads, n_heads=n_heads)


def _reference(q, qc, kc, vc, weights, tables, starts, ends, rows, window):
    f32 = [t.float() for t in (q, qc, kc, vc)]
    return paged_attention_reference(*f32, _on_device(weights, "cuda"), tables, starts, ends, rows, window)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("layer", ["conv", "mixing"])
@pytest.mark.parametrize("tile", ["decode", "prefill"])
def test_mta_kernel_paper_shapes(dtype, shape, layer, tile):
    seqs, block_m, splits = (DECODE, 1, 8) if tile == "decode" else (PREFILL, 64, 1)
    n_heads, head_dim = SHAPES[shape]
    q, qc, kc, vc, tables, starts, ends, rows = _inputs(seqs, SHAPES[shape], dtype)
    weights = _weights(layer, n_heads)
    window = 10 if layer == "conv" else 0
    out = torch.full(q.shape, float("nan"), device="cuda")
    mta_paged_attention(q, qc if window else None, kc, vc, layer_params(weights, "cuda"),
                        build_work_items(tables, starts, ends, rows, block_m, splits, "cuda"), out)
    reference = _reference(q, qc, kc, vc, weights, tables, starts, ends, rows, window)
    torch.testing.assert_close(out, reference, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("one_pass", [(64, 8), (32, 1), (128, 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mta_one_pass_decode_paper_shapes(dtype, shape, one_pass):
    """The mixing layer's decode rows in the one-pass form (key tile, key splits), contexts up to 16k."""
    n_heads, head_dim = SHAPES[shape]
    q, qc, kc, vc, tables, starts, ends, rows = _inputs(DECODE, SHAPES[shape], dtype)
    weights = _weights("mixing", n_heads)
    out = torch.full(q.shape, float("nan"), device="cuda")
    mta_paged_attention(q, None, kc, vc, layer_params(weights, "cuda"),
                        build_work_items(tables, starts, ends, rows, 1, 8, "cuda"), out, one_pass=one_pass)
    reference = _reference(q, qc, kc, vc, weights, tables, starts, ends, rows, 0)
    torch.testing.assert_close(out, reference, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("p16", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mixing_prefill_kernel_paper_shapes(dtype, shape, p16):
    """The fused two-pass prompt kernel of mixing-only layers, 16-row groups, keys in 4 splits; P'V on fp32
    probabilities or on probabilities in the cache dtype (bounded as flash attention's prompt tiles)."""
    from mta_serve.kernels.mixing_prefill import mixing_prefill_attention

    n_heads, head_dim = SHAPES[shape]
    q, qc, kc, vc, tables, starts, ends, rows = _inputs(PREFILL, SHAPES[shape], dtype)
    weights = _weights("mixing", n_heads)
    out = torch.full(q.shape, float("nan"), device="cuda")
    mixing_prefill_attention(q, kc, vc, layer_params(weights, "cuda"),
                             build_work_items(tables, starts, ends, rows, 16, 1, "cuda"), out, key_tile=16,
                             num_splits=4, num_warps=8, pv_in_cache_dtype=p16)
    reference = _reference(q, qc, kc, vc, weights, tables, starts, ends, rows, 0)
    torch.testing.assert_close(out, reference, atol=1e-2 if p16 else 2e-3, rtol=1e-2 if p16 else 2e-3)


# (rows, rows per tile, key splits, keys per tile): decode as the engine runs it at small batches (64-key
# tiles, up to 32 splits) and at large ones (128-key tiles, one split; triton_attention.flash_block_n)
FLASH_CASES = {"decode": (DECODE, 1, 8, None), "decode_32x64": (DECODE, 1, 32, 64),
               "decode_1x128": (DECODE, 1, 1, 128), "prefill": (PREFILL, 64, 1, None)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("tile", sorted(FLASH_CASES))
def test_flash_kernel_paper_shapes(dtype, shape, tile):
    from mta_serve.dense_attention import MTAWeights

    seqs, block_m, splits, block_n = FLASH_CASES[tile]
    q, qc, kc, vc, tables, starts, ends, rows = _inputs(seqs, SHAPES[shape], dtype)
    out = torch.full(q.shape, float("nan"), device="cuda")
    paged_flash_attention(q, kc, vc, build_work_items(tables, starts, ends, rows, block_m, splits, "cuda"), out,
                          block_n=block_n)
    reference = _reference(q, qc, kc, vc, MTAWeights(), tables, starts, ends, rows, 0)
    # the prefill tiles multiply probabilities rounded to the cache dtype by V, as flash attention does
    torch.testing.assert_close(out, reference, atol=1e-2 if tile == "prefill" else 2e-3, rtol=1e-2)


@pytest.mark.parametrize("conv_splits", [None, 14])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mta_conv_state_paper_shapes(dtype, shape, conv_splits):
    """The engine's path for a paper conv layer: prompt chunks (a whole prompt, one after a cached prefix,
    a short one) write each sequence's ConvState slot, then two decode steps read it. The decode rows' conv
    and softmax kernels in the default key splits (one 32-key tile per program, 8 warps) or in 14 (several
    tiles per program, 4 warps)."""
    from mta_serve.kernels.mta_attention import ConvState
    from test_kernels import _step

    n_heads, _ = SHAPES[shape]
    chunks = [(0, 1500), (3000, 3512), (0, 5)]
    _, qc, kc, vc, tables, _, _, _ = _inputs([(0, end + 2) for _, end in chunks], SHAPES[shape], dtype)
    weights = _weights("conv", n_heads)
    params, state = layer_params(weights, "cuda"), ConvState.allocate(3, n_heads, 6, 6, 3514, "cuda")
    steps = [(64, chunks)] + [(1, [(end + i, end + i + 1) for _, end in chunks]) for i in range(2)]
    for block_m, step in steps:
        q, starts, ends, rows = _step(qc, tables, BLOCK, step)
        work = build_work_items(tables, starts, ends, rows, block_m, 8 if block_m == 1 else 1, "cuda",
                                states=[2, 0, 1])
        out = torch.full(q.shape, float("nan"), device="cuda")
        mta_paged_attention(q, qc, kc, vc, params, work, out, state=state,
                            conv_splits=conv_splits if block_m == 1 else None)
        reference = _reference(q, qc, kc, vc, weights, tables, starts, ends, rows, 10)
        torch.testing.assert_close(out, reference, atol=2e-3, rtol=2e-3)
