"""The dense reference attention and the model against the naive loop transcription of the spec."""
from __future__ import annotations

import pytest
import torch

from mta_serve.config import ModelConfig, MTAConfig
from mta_serve.dense_attention import batched_dense_attention, dense_mta_attention
from mta_serve.model import apply_rope, build_model, rope_angles
from naive_mta import naive_causal_attention, naive_mta_attention, naive_rope

# Every variant of the spec: (name, MTAConfig kwargs, n_heads, n_kv_heads, layer_id)
VARIANTS = [
    ("pre_both", dict(pre_conv=[3, 5], pad_key="both"), 4, 4, 0),
    ("pre_left", dict(pre_conv=[3, 4], pad_key="left"), 4, 4, 0),
    ("pre_right", dict(pre_conv=[2, 4], pad_key="right"), 4, 4, 0),
    ("post_only", dict(post_conv=[3, 5]), 4, 4, 0),
    ("pre_and_post", dict(pre_conv=[2, 3], post_conv=[3, 5]), 4, 4, 0),
    ("pre_and_post_left", dict(pre_conv=[2, 3], post_conv=[3, 2], pad_key="left"), 4, 4, 0),
    ("wpsm", dict(wpsm=True), 4, 4, 0),
    ("head_kernel_group2", dict(head_kernel_size=2), 4, 4, 0),
    ("head_kernel_all", dict(head_kernel_size=4), 4, 4, 0),
    ("wposm", dict(wposm=True), 4, 4, 0),
    ("group_norm", dict(group_norm=True), 4, 4, 0),
    ("group_norm_rescale", dict(group_norm=True, layer_norm_rescale=True), 4, 4, 3),
    ("gate_1d", dict(group_norm=True, gate="1d"), 4, 4, 0),
    ("gate_full", dict(gate="full"), 4, 4, 0),
    ("gqa_paper_layer", dict(pre_conv=[3, 5], post_conv=[2, 3], wpsm=True, head_kernel_size=4,
                             group_norm=True, gate="1d"), 4, 2, 2),
    ("paper_layer_6x11", dict(pre_conv=[6, 11], post_conv=[6, 11], wpsm=True, head_kernel_size=4,
                              group_norm=True, gate="1d"), 4, 4, 0),
    ("talking_heads", dict(wpsm=True, wposm=True), 4, 1, 0),
]


def _layer(mta_kwargs, n_heads, n_kv_heads, layer_id, dtype=torch.float64):
    cfg = ModelConfig(dim=16 * n_heads // 2, n_layers=layer_id + 1, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      head_dim=8, vocab_size=11, mta=MTAConfig(**mta_kwargs))
    model = build_model(cfg, seed=1234, mta_init="random", dtype=dtype)
    return model.layers[layer_id].attention


def _naive_weights(attn) -> dict:
    w = {}
    for name in ("mta_kernel", "mta_kernel_after_sm", "head_kernel"):
        if getattr(attn, name) is not None:
            w[name] = getattr(attn, name).detach()
    for name in ("wpsm", "wposm"):
        if getattr(attn, name) is not None:
            w[name] = getattr(attn, name).weight.detach()
    if attn.subln is not None:
        w["subln"] = attn.subln.weight.detach()
    if attn.gate is not None:
        w["gate_weight"], w["gate_bias"] = attn.gate.weight.detach(), attn.gate.bias.detach()
    return w


def _ours(attn, q, k, v, cu_seqlens):
    heads = dense_mta_attention(q, k, v, attn.mta_weights(), cu_seqlens)
    return attn.norm_and_gate(heads)


@pytest.mark.parametrize("name,mta,n_heads,n_kv_heads,layer_id", VARIANTS, ids=[v[0] for v in VARIANTS])
@torch.no_grad()
def test_layer_matches_naive(name, mta, n_heads, n_kv_heads, layer_id):
    attn = _layer(mta, n_heads, n_kv_heads, layer_id)
    gen = torch.Generator().manual_seed(7)
    lengths = [9, 2, 1]  # 2 and 1 are shorter than every kernel in the list
    n = sum(lengths)
    q = torch.randn(n, n_heads, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(n, n_kv_heads, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(n, n_kv_heads, 8, generator=gen, dtype=torch.float64)
    cu = [0, 9, 11, 12]
    ours = _ours(attn, q, k, v, cu)
    weights = _naive_weights(attn)
    for s, e in zip(cu[:-1], cu[1:]):
        ref = naive_mta_attention(q[s:e], k[s:e], v[s:e], weights, pad_key=attn.pad_key,
                                  layer_norm_rescale=attn.subln is not None and attn.subln.scale != 1.0,
                                  layer_id=layer_id)
        err = (ours[s:e] - ref).abs().max().item()
        print(f"{name} len={e - s}: max abs err {err:.3e}")
        assert err < 1e-10, f"{name}: sequence [{s}:{e}] differs from the naive spec by {err}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5)])
@torch.no_grad()
def test_float32_paper_layer_matches_naive(dtype, tol):
    attn = _layer(dict(pre_conv=[6, 11], post_conv=[6, 11], wpsm=True, head_kernel_size=4, group_norm=True,
                       gate="1d"), 4, 4, 0, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(12, 4, 8, generator=gen) for _ in range(3))
    ours = _ours(attn, q, k, v, [0, 12])
    ref = naive_mta_attention(q, k, v, _naive_weights(attn), pad_key="both")
    assert (ours.double() - ref).abs().max().item() < tol


@pytest.mark.parametrize("pre,post,pad_key", [((6, 11), (6, 11), "both"), ((2, 9), None, "both"),
                                             (None, (3, 5), "both"), ((3, 4), (2, 2), "left"), ((2, 4), None, "right")])
@torch.no_grad()
def test_identity_mta_is_causal_attention(pre, post, pad_key):
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=11,
                      mta=MTAConfig(pre_conv=pre, post_conv=post, pad_key=pad_key, wpsm=True, head_kernel_size=4))
    attn = build_model(cfg, seed=5, mta_init="identity").layers[0].attention
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(14, 4, 8, generator=gen) for _ in range(3))
    ours = dense_mta_attention(q, k, v, attn.mta_weights(), [0, 14])
    plain = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True).transpose(0, 1)
    assert (ours - plain).abs().max().item() < 1e-6
    assert (ours.double() - naive_causal_attention(q, k, v)).abs().max().item() < 1e-6


def test_rope_matches_naive():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 3, 8, generator=gen, dtype=torch.float64)
    cos, sin = rope_angles(torch.arange(10), 8, 1e5)
    ours = apply_rope(x.float(), cos, sin).double()
    assert (ours - naive_rope(x, 1e5)).abs().max().item() < 1e-5


@torch.no_grad()
def test_model_with_mta_layer_subset_matches_naive_attention():
    """Whole model: only layers in mta_layers convolve; mixing, norm and gate are on every layer."""
    mta = MTAConfig(pre_conv=[2, 3], post_conv=[2, 3], mta_layers=[1], wpsm=True, head_kernel_size=2,
                    group_norm=True, gate="1d")
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=23, mta=mta)
    model = build_model(cfg, seed=11, mta_init="random", dtype=torch.float64)
    assert [layer.attention.mta_kernel is not None for layer in model.layers] == [False, True, False]
    tokens = [[3, 1, 4, 1, 5, 9, 2], [6, 5]]
    logits = model.score(tokens)
    for seq, got in zip(tokens, logits):
        assert (got - _naive_model_logits(model, seq)).abs().max().item() < 1e-9


def _naive_model_logits(model, seq):
    cfg = model.cfg
    h = model.tok_embeddings(torch.tensor(seq))
    for layer in model.layers:
        attn, x = layer.attention, layer.attention_norm(h)
        q = naive_rope(attn.wq(x).view(len(seq), cfg.n_heads, -1), cfg.rope_theta)
        k = naive_rope(attn.wk(x).view(len(seq), cfg.n_kv_heads, -1), cfg.rope_theta)
        v = attn.wv(x).view(len(seq), cfg.n_kv_heads, -1)
        heads = naive_mta_attention(q, k, v, _naive_weights(attn), pad_key=attn.pad_key)
        h = h + attn.wo(heads.flatten(-2))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.logits(model.norm(h))


@torch.no_grad()
def test_packed_sequences_do_not_interact():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=31,
                      mta=MTAConfig(pre_conv=[3, 5], post_conv=[3, 5], wpsm=True, head_kernel_size=4))
    model = build_model(cfg, seed=2, mta_init="random")
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9]
    together = model.score([a, b])
    alone = model.score([a])[0], model.score([b])[0]
    for x, y in zip(together, alone):
        assert torch.allclose(x, y, atol=1e-5, rtol=0)


@torch.no_grad()
def test_batched_dense_attention_equals_per_sequence():
    attn = _layer(dict(pre_conv=[3, 5], post_conv=[2, 3], wpsm=True, head_kernel_size=2), 4, 2, 0)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(3, 7, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(3, 7, 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    batched = batched_dense_attention(q, k, v, attn.mta_weights())
    packed = dense_mta_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), attn.mta_weights(), [0, 7, 14, 21])
    assert (batched.flatten(0, 1) - packed).abs().max().item() < 1e-12
