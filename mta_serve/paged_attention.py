"""The `torch` attention backend: a paged K/V/Q cache and exact MTA attention over it, in pure PyTorch.

Cache layout, per layer: K and V as [num_blocks, block_size, G, d]; for layers with a key-query conv also the
queries (after RoPE) as [num_blocks, block_size, H, d]. Keeping every token's query in the paged cache is the
MTA state: a step computing rows [s, e) of a sequence recomputes the score rows of the W = (c_q-1)+(c_q'-1)
queries before s from the cache, so chunk boundaries, prefix-cache hits and recompute after preemption are
invisible (see docs/mta_state.md). Memory per sequence and step is O(H x (e - s + W) x e): a few score rows
during decode, never a T x T map unless a whole prompt is computed in one chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .dense_attention import attention_probs


@dataclass(slots=True)
class SequenceSlice:
    """One sequence's part of a step: it computes positions [start, end) = batch rows [row, row + end - start)."""

    start: int
    end: int
    row: int
    block_ids: torch.Tensor  # [num_blocks_used] int64, the first ceil(end / block_size) of its table


@dataclass(slots=True)
class PagedBatch:
    slot_mapping: torch.Tensor  # [N] int64: cache slot (block_id * block_size + offset) of each new token
    sequences: list[SequenceSlice]


def query_window(cfg: ModelConfig, layer_id: int) -> int:
    """How many queries before a row its MTA output depends on (0 for layers without key-query convs)."""
    mta = cfg.mta
    if not mta.has_conv(layer_id):
        return 0
    return sum(conv[0] - 1 for conv in (mta.pre_conv, mta.post_conv) if conv is not None)


def stores_queries(cfg: ModelConfig, layer_id: int) -> bool:
    return query_window(cfg, layer_id) > 0


def cache_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    per_layer = [2 * cfg.n_kv_heads * cfg.head_dim + (cfg.n_heads * cfg.head_dim if stores_queries(cfg, i) else 0)
                 for i in range(cfg.n_layers)]
    return sum(per_layer) * elem


class TorchPagedAttention:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.cfg, self.block_size = cfg, block_size
        kv_shape = (num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        q_shape = (num_blocks, block_size, cfg.n_heads, cfg.head_dim)
        self.k_cache = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v_cache = [torch.zeros(kv_shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.q_cache = [torch.zeros(q_shape, dtype=dtype, device=device) if stores_queries(cfg, i) else None
                        for i in range(cfg.n_layers)]
        self.windows = [query_window(cfg, i) for i in range(cfg.n_layers)]

    def prepare(self, tokens: list[int], positions: list[int], slots: list[int], specs):
        """A step's inputs on the device: (tokens [N], positions [N], PagedBatch)."""
        device = self.k_cache[0].device
        batch = self.make_batch(torch.tensor(slots, dtype=torch.long, device=device), specs)
        return torch.tensor(tokens, device=device), torch.tensor(positions, device=device), batch

    def make_batch(self, slot_mapping: torch.Tensor, specs) -> PagedBatch:
        """A step's batch from its sequences (triton_attention.SequenceSpec: start, end, row, block_ids)."""
        return PagedBatch(slot_mapping, [
            SequenceSlice(s.start, s.end, s.row, torch.tensor(s.block_ids, dtype=torch.long,
                                                               device=slot_mapping.device)) for s in specs])

    def attend(self, batch: PagedBatch, layer_id: int, attn, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """q [N, H, d], k, v [N, G, d] of the step's new tokens -> heads [N, H, d]. Writes them to the cache
        first, so a sequence reads its own new tokens (and any shared prefix) through its block table."""
        self._write(self.k_cache[layer_id], batch.slot_mapping, k)
        self._write(self.v_cache[layer_id], batch.slot_mapping, v)
        if self.q_cache[layer_id] is not None:
            self._write(self.q_cache[layer_id], batch.slot_mapping, q)
        weights = attn.mta_weights()
        compute_dtype = torch.promote_types(q.dtype, torch.float32)
        out = torch.empty(q.shape, dtype=compute_dtype, device=q.device)
        for seq in batch.sequences:
            out[seq.row:seq.row + seq.end - seq.start] = self._sequence(seq, layer_id, q, weights, compute_dtype)
        return out

    def _write(self, cache: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, values.to(cache.dtype))

    def _gather(self, cache: torch.Tensor, seq: SequenceSlice, first: int, dtype: torch.dtype) -> torch.Tensor:
        """Positions [first, seq.end) of one sequence: [end - first, heads, d]."""
        return cache[seq.block_ids].flatten(0, 1)[first:seq.end].to(dtype)

    def _sequence(self, seq: SequenceSlice, layer_id: int, q_new: torch.Tensor, weights, dtype) -> torch.Tensor:
        n_new = seq.end - seq.start
        first_row = max(0, seq.start - self.windows[layer_id])
        if first_row < seq.start:  # the window's earlier queries come from the cache
            q = self._gather(self.q_cache[layer_id], seq, first_row, dtype)
        else:
            q = q_new[seq.row:seq.row + n_new].to(dtype)
        group = self.cfg.n_heads // self.cfg.n_kv_heads
        k = self._gather(self.k_cache[layer_id], seq, 0, dtype).repeat_interleave(group, dim=1)
        v = self._gather(self.v_cache[layer_id], seq, 0, dtype).repeat_interleave(group, dim=1)
        probs = attention_probs(q, k, weights, first_row=first_row)[:, seq.start - first_row:]  # [H, n_new, end]
        return torch.einsum("hij,jhd->ihd", probs, v)
