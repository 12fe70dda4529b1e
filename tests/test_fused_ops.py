"""kernels.fused_ops against their PyTorch references (the model's own modules), and the model's fused forward
against its PyTorch forward. On the CPU under Triton's interpreter in fp32 and fp16; bf16 on the GPU
(test_kernels_gpu.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")  # a Linux-only dependency

from mta_serve.config import ModelConfig  # noqa: E402
from mta_serve.dense_attention import dense_mta_attention  # noqa: E402
from mta_serve.kernels import fused_ops  # noqa: E402
from mta_serve.model import RMSNorm, apply_rope, build_model, rope_angles  # noqa: E402
from mta_serve.paged_attention import TorchPagedAttention  # noqa: E402

from helpers import TINY_CONFIG  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 only where it computes correctly: on the GPU (Triton's interpreter holds bf16 as raw integers)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def _tol(dtype):
    # one rounding step of the output apart (summation order inside the norms differs)
    return {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
            torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}[dtype]


def assert_rounded_like(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Within one rounding step everywhere, and in 16-bit dtypes bit-equal almost everywhere: a kernel that
    skips one of the reference's intermediate roundings differs in a large share of the elements (about a
    quarter for a norm), a different summation order only where a value sits on a rounding boundary."""
    torch.testing.assert_close(got, expected, **_tol(got.dtype))
    if got.dtype != torch.float32:
        differ = (got != expected).float().mean().item()
        assert differ <= 0.01, f"{100 * differ:.1f} % of the elements differ from the reference"


def _randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_the_residual_add_and_rmsnorm(dtype, with_delta):
    h, delta = _randn(19, 40, dtype=dtype), _randn(19, 40, dtype=dtype, seed=1)
    norm = RMSNorm(40, eps=1e-5).to(device=DEVICE, dtype=dtype)
    norm.weight.data = _randn(40, dtype=dtype, seed=2)
    new_h, y = fused_ops.add_rms_norm(h, delta if with_delta else None, norm.weight, norm.eps)
    expected_h = h + delta if with_delta else h
    torch.testing.assert_close(new_h, expected_h, atol=0, rtol=0)
    assert_rounded_like(y, norm(expected_h))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_head_norm_gate_matches_group_norm_and_gate(dtype, gate, scale):
    """The MTA group norm (with a depth scale) and 1-d gate of fp32 attention rows, cast to the model dtype."""
    heads = _randn(7, 4, 24, dtype=torch.float32)
    norm = RMSNorm(24, eps=1e-5, scale=scale).to(device=DEVICE, dtype=dtype)
    norm.weight.data = _randn(24, dtype=dtype, seed=3)
    lin = torch.nn.Linear(24, 1).to(device=DEVICE, dtype=dtype)
    expected = norm(heads.to(dtype))
    if gate:
        expected = expected * torch.sigmoid(lin(expected))
    out = fused_ops.head_norm_gate(heads, dtype, norm.weight, norm.eps, scale,
                                   lin.weight[0] if gate else None, lin.bias if gate else None)
    assert out.dtype == dtype and out.shape == (7, 96)
    assert_rounded_like(out, expected.flatten(-2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_rotates_q_and_k_of_the_fused_projection(dtype):
    n, heads, kv_heads, d = 9, 4, 2, 16
    qkv = _randn(n, (heads + 2 * kv_heads) * d, dtype=dtype)
    cos, sin = rope_angles(torch.arange(5, 5 + n, device=DEVICE), d, 10000.0)
    q_ref = apply_rope(qkv[:, :heads * d].unflatten(-1, (heads, d)), cos, sin)
    k_ref = apply_rope(qkv[:, heads * d:(heads + kv_heads) * d].unflatten(-1, (kv_heads, d)), cos, sin)
    v_ref = qkv[:, (heads + kv_heads) * d:].unflatten(-1, (kv_heads, d)).clone()
    q, k, v = fused_ops.rope(qkv, cos, sin, heads, kv_heads, d)
    assert q.is_contiguous() and k.data_ptr() == qkv.data_ptr() + heads * d * qkv.element_size()
    assert_rounded_like(q, q_ref)
    assert_rounded_like(k, k_ref)
    torch.testing.assert_close(v, v_ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_the_mlp_activation(dtype):
    x13 = _randn(5, 2 * 48, dtype=dtype)
    expected = F.silu(x13[:, :48]) * x13[:, 48:]
    assert_rounded_like(fused_ops.silu_mul(x13), expected)


@pytest.mark.parametrize("with_q", [False, True])
def test_write_cache_writes_each_token_to_its_slot_only(with_q):
    """Every token lands in its slot of k, v (and q) caches; every other slot keeps its value."""
    blocks, block_size, kv_heads, heads, d, n = 5, 4, 2, 4, 8, 6
    k_cache, v_cache = torch.zeros(blocks, block_size, kv_heads, d, device=DEVICE), torch.zeros(
        blocks, block_size, kv_heads, d, device=DEVICE)
    q_cache = torch.zeros(blocks, block_size, heads, d, device=DEVICE) if with_q else None
    qkv = _randn(n, (heads + 2 * kv_heads) * d, dtype=torch.float32)
    q = qkv[:, :heads * d].unflatten(-1, (heads, d)).contiguous()
    k = qkv[:, heads * d:(heads + kv_heads) * d].unflatten(-1, (kv_heads, d))  # strided views, as in the model
    v = qkv[:, (heads + kv_heads) * d:].unflatten(-1, (kv_heads, d))
    slots = torch.tensor([17, 3, 0, 19, 8, 9], dtype=torch.int32, device=DEVICE)
    fused_ops.write_cache(slots, k, v, q, k_cache, v_cache, q_cache)
    expected = [torch.zeros_like(c) for c in (k_cache, v_cache)]
    TorchPagedAttention._write(None, expected[0], slots.long(), k)
    TorchPagedAttention._write(None, expected[1], slots.long(), v)
    torch.testing.assert_close(k_cache, expected[0], atol=0, rtol=0)
    torch.testing.assert_close(v_cache, expected[1], atol=0, rtol=0)
    if with_q:
        expected_q = torch.zeros_like(q_cache)
        TorchPagedAttention._write(None, expected_q, slots.long(), q)
        torch.testing.assert_close(q_cache, expected_q, atol=0, rtol=0)


def test_write_cache_rejects_rows_that_are_not_contiguous():
    cache = torch.zeros(2, 4, 2, 8, device=DEVICE)
    k = torch.zeros(3, 8, 2, device=DEVICE).transpose(1, 2)  # [3, 2, 8] with a non-unit inner stride
    with pytest.raises(ValueError, match="contiguous"):
        fused_ops.write_cache(torch.zeros(3, dtype=torch.int32, device=DEVICE), k, k, None, cache, cache, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gate", ["1d", "full"])
@pytest.mark.parametrize("one_row", [False, True])
def test_fused_forward_equals_the_pytorch_forward(dtype, gate, one_row):
    """The whole model (tiny config: GQA, MTA convs, group norm, gate) through the dense attention, fused
    against unfused; the fused weights leave the state dict unchanged. One row (a one-token sequence at
    position 0) takes kernels.row_linear with the norms, RoPE and SwiGLU fused into its products; RoPE at
    position 0 is the identity, so its epilogue is checked by tests/test_row_linear.py and the engine tests."""
    cfg_dict = ModelConfig.from_yaml(TINY_CONFIG).to_dict()
    cfg_dict["mta"]["gate"] = gate
    cfg_dict["mta"]["layer_norm_rescale"] = True  # group-norm depth scales != 1
    cfg = ModelConfig.from_dict(cfg_dict)
    model = build_model(cfg, seed=0, mta_init="random", device=DEVICE, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, cfg.vocab_size, (13,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cu = [0, 8, 13]
    positions = torch.cat([torch.arange(8), torch.arange(5)]).to(DEVICE)
    if one_row:
        tokens, cu, positions = tokens[:1], [0, 1], positions[:1]

    def attend(layer_id, attn, q, k, v):
        return dense_mta_attention(q, k, v, attn.mta_weights(), cu)

    with torch.no_grad():
        expected = model(tokens, positions, attend)
        model.fuse_projections()
        model.fuse_projections()  # idempotent
        got = model(tokens, positions, attend, fused=True)
    assert model.state_dict().keys() == before.keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], atol=0, rtol=0)
    tol = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-2, rtol=2e-2),
           torch.bfloat16: dict(atol=1e-1, rtol=5e-2)}[dtype]  # bf16: 4 layers of one-ulp (2^-8) differences
    torch.testing.assert_close(got, expected, **tol)


def test_fuse_projections_fuses_again_after_the_weights_move():
    """After .to() the parameters are new tensors: fusing again must follow them, not keep stale weights."""
    model = build_model(ModelConfig.from_yaml(TINY_CONFIG), seed=0, device=DEVICE)
    model.fuse_projections()
    model.half()
    attn = model.layers[0].attention
    assert attn.wqkv.dtype == torch.float32  # stale until fused again
    model.fuse_projections()
    assert attn.wqkv.dtype == torch.float16
    assert attn.wk.weight.data_ptr() == attn.wqkv[attn.wq.weight.shape[0]:].data_ptr()
    torch.testing.assert_close(attn.wqkv, torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_fill_pending_tokens_replaces_placeholders_only(dtype):
    """Placeholders -1 - j take sampled[j] (any row of it, in any order); real tokens, 0 included, stay."""
    from mta_serve.model_runner import fill_pending_tokens_reference

    sampled = torch.tensor([41, 7, 0, 1999, 5], dtype=torch.int64, device=DEVICE)
    tokens = torch.tensor([3, -1, 0, -4, 12, -2, -5, 9, 1998, -1, 0, 77, -3, 2, 8, 6, 4, -4, 11],
                          dtype=dtype, device=DEVICE)  # 19 tokens: more than the CPU's smallest block
    expected = tokens.clone()
    fill_pending_tokens_reference(expected, sampled)
    assert expected.tolist() == [3, 41, 0, 1999, 12, 7, 5, 9, 1998, 41, 0, 77, 0, 2, 8, 6, 4, 1999, 11]
    fused_ops.fill_pending_tokens(tokens, sampled)
    assert tokens.dtype == dtype and tokens.tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
def test_argmax_rows_is_torch_argmax(dtype):
    """The greedy token of each row, with 64-entry chunks over a 1000-entry vocabulary (16 chunks, the last
    partial): random rows, the maximum tied across chunks and inside one (the first index wins), the maximum
    in the last partial chunk, a row of -inf, a row holding NaN; on the GPU also the 830M's vocabulary in
    the default chunks."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1000, generator=gen).to(dtype)
    x[1, [70, 900]] = 50.0  # tied across chunks
    x[2, [130, 131]] = 50.0  # tied inside a chunk
    x[3, 999] = 50.0  # in the last, partial chunk
    x[4] = float("-inf")
    x[5, [300, 700]] = float("nan")  # torch: the first NaN
    x = x.to(DEVICE)
    expected = torch.argmax(x.float(), dim=-1)
    assert expected[[1, 2, 3, 4, 5]].tolist() == [70, 130, 999, 0, 300]
    got = fused_ops.argmax_rows(x, chunk=64)
    assert got.dtype == torch.int64 and got.tolist() == expected.tolist()
    if DEVICE == "cuda":
        logits = torch.randn(64, 128256, device=DEVICE).to(dtype)
        assert fused_ops.argmax_rows(logits).tolist() == torch.argmax(logits, dim=-1).tolist()
