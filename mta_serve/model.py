"""Llama-style decoder with MTA attention (PyTorch).

Parameter names equal the reference implementation's plain layout (`tok_embeddings.weight`,
`layers.N.attention.wq.weight`, `layers.N.attention.mta_kernel`, ...), so a native checkpoint and a reference
state dict differ only in the reference's aliases. The forward pass takes packed sequences (`cu_seqlens`) and
runs the dense reference attention; faster backends plug in later behind the same weights.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .dense_attention import MTAWeights, dense_mta_attention

# (layer_id, attention module, q [N, H, d], k [N, G, d], v [N, G, d]) -> heads [N, H, d]. For the fused
# forward it may instead return [N, H * d] in the model's dtype with the layer's steps 8-9 (group norm, gate)
# already applied: the triton backend does, in its attention kernels' epilogue.
AttendFn = Callable[[int, "MTAAttention", torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (layer_id, attention module) -> where the fused forward writes the step's k, v (and q) before attend:
# (slots [N] int, k_cache, v_cache, q_cache or None), caches [blocks, block_size, heads, d]
# (kernels.row_linear.norm_qkv_rope's cache), or None where attend writes them itself
CacheFn = Callable[[int, "MTAAttention"], tuple | None]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, scale: float = 1.0):
        super().__init__()
        self.eps = eps
        self.scale = scale  # depth scaling of the MTA group norm; 1.0 elsewhere
        self.weight = nn.Parameter(torch.ones(dim))  # [dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in (at least) fp32, cast back, then scale: the reference's order of roundings.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        out = normed * self.weight
        return out * self.scale if self.scale != 1.0 else out


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [N] -> cos, sin [N, head_dim / 2], computed in fp32 like the reference (fp64 for fp64 models)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation. x [N, n, d]; cos, sin [N, d / 2]."""
    pairs = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (-1, 2))  # [N, n, d/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1)
    return rotated.flatten(-2).type_as(x)


class MTAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        mta, n_heads, head_dim = cfg.mta, cfg.n_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, cfg.n_kv_heads, head_dim
        self.pad_key = mta.pad_key
        self.wq = nn.Linear(cfg.dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, cfg.dim, bias=False)
        conv = mta.has_conv(layer_id)
        self.mta_kernel = _kernel(n_heads, mta.pre_conv) if conv else None  # [H, 1, c_q, c_k]
        self.mta_kernel_after_sm = _kernel(n_heads, mta.post_conv) if conv else None  # [H, 1, c_q', c_k']
        self.wpsm = nn.Linear(n_heads, n_heads, bias=False) if mta.wpsm else None  # weight [H, H]
        self.wposm = nn.Linear(n_heads, n_heads, bias=False) if mta.wposm else None  # weight [H, H]
        self.head_kernel = None  # [H / c_h, c_h, c_h]
        if mta.head_kernel_size is not None:
            c_h = mta.head_kernel_size
            self.head_kernel = nn.Parameter(torch.empty(n_heads // c_h, c_h, c_h))
        self.subln = None
        if mta.group_norm:
            scale = 1.0 - (0.8 - 0.6 * math.exp(-0.3 * layer_id)) if mta.layer_norm_rescale else 1.0
            self.subln = RMSNorm(head_dim, eps=1e-5, scale=scale)
        self.gate = {"none": None, "1d": nn.Linear(head_dim, 1), "full": nn.Linear(head_dim, head_dim)}[mta.gate]

    def mta_weights(self) -> MTAWeights:
        return MTAWeights(
            pre_kernel=self.mta_kernel, post_kernel=self.mta_kernel_after_sm,
            wpsm=None if self.wpsm is None else self.wpsm.weight, head_kernel=self.head_kernel,
            wposm=None if self.wposm is None else self.wposm.weight, pad_key=self.pad_key,
        )

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [N, dim] -> q [N, H, d], k [N, G, d] (both after RoPE), v [N, G, d]."""
        q = apply_rope(self.wq(x).unflatten(-1, (self.n_heads, self.head_dim)), cos, sin)
        k = apply_rope(self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim)), cos, sin)
        return q, k, self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim))

    def norm_and_gate(self, heads: torch.Tensor) -> torch.Tensor:
        """Steps 8-9 per (token, head). heads [N, H, d] -> [N, H, d]."""
        if self.subln is not None:
            heads = self.subln(heads)
        if self.gate is not None:
            heads = heads * torch.sigmoid(self.gate(heads))
        return heads

    def forward(self, x, cos, sin, attend: "AttendFn", layer_id: int) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        heads = attend(layer_id, self, q, k, v)
        return self.wo(self.norm_and_gate(heads.to(x.dtype)).flatten(-2))

    def forward_fused(self, h, delta, norm: RMSNorm, cos, sin, attend: "AttendFn", layer_id: int,
                      cache_of: "CacheFn | None" = None):
        """(h + delta, forward(norm(h + delta))) through kernels.fused_ops, kernels.row_linear (which takes
        the residual add, the norm, RoPE and, with cache_of, the cache write into the q|k|v product of
        one-row steps) and the fused q|k|v weight (MTATransformer.fuse_projections)."""
        from .kernels import fused_ops
        from .kernels.row_linear import linear, norm_qkv_rope

        cache = None if cache_of is None else cache_of(layer_id, self)
        h, q, k, v = norm_qkv_rope(h, delta, norm.weight, norm.eps, self.wqkv, cos, sin, self.n_heads,
                                   self.n_kv_heads, self.head_dim, cache)
        heads = attend(layer_id, self, q, k, v)
        if heads.dim() == 2:  # the backend applied steps 8-9 in its kernels (see AttendFn)
            return h, linear(heads, self.wo.weight)
        one_d_gate = self.gate is not None and self.gate.out_features == 1
        sub = self.subln
        mixed = fused_ops.head_norm_gate(
            heads, h.dtype, None if sub is None else sub.weight, 1e-5 if sub is None else sub.eps,
            1.0 if sub is None else sub.scale, self.gate.weight[0] if one_d_gate else None,
            self.gate.bias if one_d_gate else None)
        if self.gate is not None and not one_d_gate:  # the full gate is a GEMM: PyTorch
            gated = mixed.unflatten(-1, (self.n_heads, self.head_dim))
            mixed = (gated * torch.sigmoid(self.gate(gated))).flatten(-2)
        return h, linear(mixed, self.wo.weight)


def _kernel(n_heads: int, size: tuple[int, int] | None) -> nn.Parameter | None:
    return None if size is None else nn.Parameter(torch.empty(n_heads, 1, *size))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward_fused(self, h: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm):
        """(h + delta, forward(norm(h + delta))) with the w1|w3 weight (MTATransformer.fuse_projections);
        one-row steps take the residual add, the norm and the SwiGLU into the w1|w3 product
        (kernels.row_linear)."""
        from .kernels.row_linear import linear, norm_linear

        h, x = norm_linear(h, delta, norm.weight, norm.eps, self.w13, silu_mul=True)
        return h, linear(x, self.w2.weight)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention = MTAAttention(cfg, layer_id)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, cos, sin, attend: "AttendFn", layer_id: int) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, attend, layer_id)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward_fused(self, h, delta, cos, sin, attend: "AttendFn", layer_id: int, cache_of: "CacheFn | None" = None):
        """The block's input is h + delta (delta None: h), and so is its output: each residual add is
        fused into the norm that follows it."""
        h, delta = self.attention.forward_fused(h, delta, self.attention_norm, cos, sin, attend, layer_id,
                                                cache_of)
        return self.feed_forward.forward_fused(h, delta, self.ffn_norm)


class MTATransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attend: "AttendFn",
                fused: bool = False, cache_of: "CacheFn | None" = None) -> torch.Tensor:
        """tokens, positions [N] -> final hidden states [N, dim] (after the last norm).

        `attend(layer_id, attention_module, q, k, v) -> heads [N, H, d]` is the attention backend: the dense
        reference here, the paged cache in the engine. `fused`: norms, RoPE, gate and SiLU as Triton kernels
        (kernels.fused_ops) and fused q|k|v and w1|w3 GEMMs; needs fuse_projections() first. The PyTorch
        path is the reference it is tested against. `cache_of` (fused only): each layer's cache destination
        (CacheFn), written from the q|k|v product before `attend` is called.
        """
        h = self.tok_embeddings(tokens)
        cos, sin = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_theta,
                               torch.promote_types(h.dtype, torch.float32))
        if fused:
            return self._forward_fused(h, cos, sin, attend, cache_of)
        for layer_id, layer in enumerate(self.layers):
            h = layer(h, cos, sin, attend, layer_id)
        return self.norm(h)

    def _forward_fused(self, h, cos, sin, attend: "AttendFn", cache_of: "CacheFn | None") -> torch.Tensor:
        from .kernels import fused_ops

        delta = None
        for layer_id, layer in enumerate(self.layers):
            h, delta = layer.forward_fused(h, delta, cos, sin, attend, layer_id, cache_of)
        return fused_ops.add_rms_norm(h, delta, self.norm.weight, self.norm.eps)[1]

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate each layer's wq|wk|wv and w1|w3 weights into one matrix, for one GEMM each in the
        fused forward; the original parameters become views of it, so no memory is added and the state
        dict is unchanged. Idempotent; fuses again where a parameter no longer views its fused matrix (after
        .to(), or a load_state_dict that assigns new tensors)."""
        for layer in self.layers:
            attn, ff = layer.attention, layer.feed_forward
            if not _views_of(getattr(attn, "wqkv", None), [attn.wq, attn.wk, attn.wv]):
                attn.wqkv = _concat_into_views([attn.wq, attn.wk, attn.wv])  # [(H + 2G) d, dim]
            if not _views_of(getattr(ff, "w13", None), [ff.w1, ff.w3]):
                ff.w13 = _concat_into_views([ff.w1, ff.w3])  # [2 hidden, dim]

    def dense_logits(self, tokens: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        """The ground truth: tokens [N] of packed whole sequences (cu_seqlens B+1 offsets) -> logits [N, vocab]
        (at least fp32), every layer through the dense reference attention."""
        positions = torch.cat([torch.arange(e - s, device=tokens.device)
                               for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])])

        def attend(layer_id, attn, q, k, v):
            return dense_mta_attention(q, k, v, attn.mta_weights(), cu_seqlens)

        return self.logits(self(tokens, positions, attend))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(h, weight).to(torch.promote_types(h.dtype, torch.float32))

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """Logits for each token sequence: a list of [T_i, vocab] tensors."""
        device = self.tok_embeddings.weight.device
        cu = [0]
        for seq in sequences:
            cu.append(cu[-1] + len(seq))
        tokens = torch.tensor([t for seq in sequences for t in seq], dtype=torch.long, device=device)
        logits = self.dense_logits(tokens, cu)
        return [logits[s:e] for s, e in zip(cu[:-1], cu[1:])]


def _views_of(fused: torch.Tensor | None, linears: list[nn.Linear]) -> bool:
    """Whether each linear's weight is still the matching rows of `fused`."""
    if fused is None:
        return False
    first = 0
    for lin in linears:
        expected = fused[first:first + lin.weight.shape[0]]
        if lin.weight.data_ptr() != expected.data_ptr() or lin.weight.shape != expected.shape:
            return False
        first += lin.weight.shape[0]
    return True


def _concat_into_views(linears: list[nn.Linear]) -> torch.Tensor:
    weight = torch.cat([lin.weight for lin in linears])
    first = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight.data = weight[first:first + rows]
        first += rows
    return weight


# ---- initialization ---------------------------------------------------------------------------------

@torch.no_grad()
def init_weights(model: MTATransformer, seed: int, mta_init: str = "identity", mta_noise: float = 0.05) -> None:
    """Seeded init: truncated-normal projections (std dim^-0.5), unit norms, and MTA weights that are the
    identity (`mta_init="identity"`) or the identity plus seeded noise (`"random"`), so that tests exercise
    every weight of a variant rather than only its identity."""
    if mta_init not in ("identity", "random"):
        raise ValueError(f"invalid mta_init={mta_init!r}: allowed 'identity' or 'random'")
    gen = torch.Generator().manual_seed(seed)
    std = model.cfg.dim ** -0.5
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("subln.weight"):
            param.fill_(1.0)
        elif param.dim() == 2 and ".gate." not in name and not _is_head_mixing(name):
            param.copy_(_trunc_normal(param.shape, std, gen))
    for layer in model.layers:
        _init_mta(layer.attention, gen, noise=mta_noise if mta_init == "random" else 0.0)


def _trunc_normal(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * std).clamp_(-3 * std, 3 * std)


def _is_head_mixing(name: str) -> bool:
    return ".wpsm." in name or ".wposm." in name


def _init_mta(attn: MTAAttention, gen: torch.Generator, noise: float) -> None:
    def set_(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value + noise * torch.randn(value.shape, generator=gen))

    for kernel in (attn.mta_kernel, attn.mta_kernel_after_sm):
        if kernel is not None:
            set_(kernel, identity_conv_kernel(kernel.shape[0], kernel.shape[2], kernel.shape[3], attn.pad_key))
    for mix in (attn.wpsm, attn.wposm):
        if mix is not None:
            set_(mix.weight, torch.eye(attn.n_heads))
    if attn.head_kernel is not None:
        n_groups, c_h, _ = attn.head_kernel.shape
        set_(attn.head_kernel, torch.eye(c_h).repeat(n_groups, 1, 1))
    if attn.subln is not None:
        set_(attn.subln.weight, torch.ones_like(attn.subln.weight))
    if attn.gate is not None:
        std = attn.head_dim ** -0.5
        attn.gate.weight.copy_(_trunc_normal(attn.gate.weight.shape, std, gen))
        attn.gate.bias.copy_(_trunc_normal(attn.gate.bias.shape, std, gen))


def identity_conv_kernel(n_heads: int, c_q: int, c_k: int, pad_key: str = "both") -> torch.Tensor:
    """[H, 1, c_q, c_k] that passes every score through unchanged: 1 at the current query (row c_q - 1) and
    the same key (column p_L: c_k // 2 under 'both', c_k - 1 under 'left', 0 under 'right')."""
    kernel = torch.zeros(n_heads, 1, c_q, c_k)
    kernel[:, 0, c_q - 1, {"both": (c_k - 1) // 2, "left": c_k - 1, "right": 0}[pad_key]] = 1.0
    return kernel


def build_model(cfg: ModelConfig, seed: int | None = 0, mta_init: str = "identity",
                device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> MTATransformer:
    """A model with seeded weights (seed=None leaves them uninitialized, for loading a checkpoint)."""
    with torch.device("meta" if seed is None else "cpu"):
        model = MTATransformer(cfg)
    if seed is None:
        model = model.to_empty(device=device)
    else:
        init_weights(model, seed, mta_init)
        model = model.to(device)
    return model.to(dtype or DTYPES[cfg.dtype]).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
