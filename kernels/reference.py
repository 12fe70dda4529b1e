"""PyTorch references for the Triton kernels: the same paged inputs, computed through the dense MTA path.

Each sequence's keys and the queries of its conv window are gathered through its block table and passed to
`dense_attention.attention_probs`, the spec's steps 0-6 literally, in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import torch

from mta_serve.dense_attention import MTAWeights, attention_probs


def gather(cache: torch.Tensor, block_table: torch.Tensor, first: int, end: int) -> torch.Tensor:
    """Positions [first, end) of one sequence from a paged cache [num_blocks, bs, heads, d]."""
    blocks = block_table[:(end + cache.shape[1] - 1) // cache.shape[1]].long()
    return cache[blocks].flatten(0, 1)[first:end]


def paged_attention_reference(q: torch.Tensor, q_cache: torch.Tensor | None, k_cache: torch.Tensor,
                              v_cache: torch.Tensor, weights: MTAWeights, block_tables: torch.Tensor,
                              starts: list[int], ends: list[int], rows: list[int], window: int) -> torch.Tensor:
    """q [N, H, d] new queries; caches as the kernels take them; sequence i computes positions
    [starts[i], ends[i]) into rows rows[i].. of the result [N, H, d] (fp32 or fp64), reading the `window`
    queries before starts[i] from q_cache."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    group = q.shape[1] // k_cache.shape[2]
    for table, start, end, row in zip(block_tables, starts, ends, rows):
        first = max(0, start - window)
        queries = [q[row:row + end - start]]
        if first < start:
            queries.insert(0, gather(q_cache, table, first, start))
        qs = torch.cat(queries).to(dtype)
        k = gather(k_cache, table, 0, end).to(dtype).repeat_interleave(group, dim=1)
        v = gather(v_cache, table, 0, end).to(dtype).repeat_interleave(group, dim=1)
        probs = attention_probs(qs, k, weights, first_row=first)[:, start - first:]
        out[row:row + end - start] = torch.einsum("hij,jhd->ihd", probs, v)
    return out
