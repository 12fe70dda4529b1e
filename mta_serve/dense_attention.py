"""Dense reference MTA attention: materializes each sequence's full score maps.

This is the ground truth every faster path is tested against. It follows docs (MTA spec) steps 0-9 literally,
vectorized over heads and positions, one sequence at a time, in float32 (float64 if the inputs are float64).
Memory is O(H * T^2) per sequence: fine for tests and short prompts, never for serving long contexts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class MTAWeights:
    """One layer's MTA parameters; None = the step is absent."""

    pre_kernel: torch.Tensor | None = None  # [H, 1, c_q, c_k]
    post_kernel: torch.Tensor | None = None  # [H, 1, c_q', c_k']
    wpsm: torch.Tensor | None = None  # [H, H] (out, in)
    head_kernel: torch.Tensor | None = None  # [H / c_h, c_h, c_h] (group, in, out)
    wposm: torch.Tensor | None = None  # [H, H] (out, in)
    pad_key: str = "both"


def key_query_conv(scores: torch.Tensor, kernel: torch.Tensor, pad_key: str) -> torch.Tensor:
    """Causal-in-query cross-correlation of per-head score maps. scores: [..., H, Tq, Tk]; kernel:
    [H, 1, c_q, c_k]."""
    n_heads, _, c_q, c_k = kernel.shape
    left = {"both": (c_k - 1) // 2, "left": c_k - 1, "right": 0}[pad_key]
    padded = F.pad(scores, (left, c_k - 1 - left, c_q - 1, 0))
    out = F.conv2d(padded.reshape(-1, *padded.shape[-3:]), kernel.to(scores.dtype), groups=n_heads)
    return out.reshape(scores.shape)


def mix_heads(maps: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """maps: [..., H, T, T]; weight [H_out, H_in]."""
    return torch.einsum("oh,...hij->...oij", weight.to(maps.dtype), maps)


def grouped_head_conv(maps: torch.Tensor, head_kernel: torch.Tensor) -> torch.Tensor:
    """maps: [..., H, T, T]; head_kernel [H / c_h, c_h (in), c_h (out)] over contiguous groups of heads."""
    n_groups, c_h, _ = head_kernel.shape
    grouped = maps.reshape(*maps.shape[:-3], n_groups, c_h, *maps.shape[-2:])
    return torch.einsum("gro,...grij->...goij", head_kernel.to(maps.dtype), grouped).reshape(maps.shape)


def attention_probs(q: torch.Tensor, k: torch.Tensor, w: MTAWeights, first_row: int = 0) -> torch.Tensor:
    """Steps 0-6 for one sequence (or a batch of equal-length ones, with leading dims): query rows
    first_row .. first_row+R-1, q [..., R, H, d]; keys 0..T-1, k [..., T, H, d] (GQA already expanded)
    -> P' [..., H, R, T].

    With first_row > 0 the convolutions see zeros above the first row, so only rows at least
    (c_q - 1) + (c_q' - 1) below it are exact: the caller passes that many extra leading rows.
    """
    n_rows, _, head_dim = q.shape[-3:]
    scores = torch.einsum("...ihd,...jhd->...hij", q, k) / math.sqrt(head_dim)
    rows = torch.arange(first_row, first_row + n_rows, device=q.device)
    allowed = torch.arange(k.shape[-3], device=q.device)[None, :] <= rows[:, None]  # [R, T]
    if w.pre_kernel is not None:
        scores = key_query_conv(scores.masked_fill(~allowed, 0.0), w.pre_kernel, w.pad_key)
    if w.wpsm is not None:
        scores = mix_heads(scores, w.wpsm)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    if w.post_kernel is not None:
        probs = key_query_conv(probs, w.post_kernel, w.pad_key).masked_fill(~allowed, 0.0)
    if w.head_kernel is not None:
        probs = grouped_head_conv(probs, w.head_kernel)
    elif w.wposm is not None:
        probs = mix_heads(probs, w.wposm)
    return probs


def batched_dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: MTAWeights) -> torch.Tensor:
    """A batch of equal-length whole sequences (training). q [B, T, H, d]; k, v [B, T, G, d] -> [B, T, H, d],
    in the inputs' dtype promoted to at least fp32 for the softmax path."""
    group = q.shape[2] // k.shape[2]
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    k = k.repeat_interleave(group, dim=2).to(compute_dtype)
    v = v.repeat_interleave(group, dim=2).to(compute_dtype)
    probs = attention_probs(q.to(compute_dtype), k, w)  # [B, H, T, T]
    return torch.einsum("bhij,bjhd->bihd", probs, v)


def dense_mta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: MTAWeights,
                        cu_seqlens: list[int]) -> torch.Tensor:
    """Packed sequences. q: [N, H, d]; k, v: [N, G, d]; cu_seqlens: B+1 offsets -> [N, H, d] (steps 0-7).

    Each sequence is convolved on its own: nothing crosses a sequence boundary.
    """
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(q.shape, dtype=compute_dtype, device=q.device)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = (t[start:end].to(compute_dtype) for t in (q, k, v))
        ks = ks.repeat_interleave(n_heads // n_kv_heads, dim=1)
        vs = vs.repeat_interleave(n_heads // n_kv_heads, dim=1)
        probs = attention_probs(qs, ks, w)
        out[start:end] = torch.einsum("hij,jhd->ihd", probs, vs)
    return out
