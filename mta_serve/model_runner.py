"""Runs one forward over a step's mixed batch (prompt chunks and decodes alike) through the paged cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CacheConfig
from .kv_cache_manager import KVCacheManager
from .model import MTATransformer
from .paged_attention import PagedBatch, SequenceSlice, TorchPagedAttention, cache_bytes_per_token
from .scheduler import ScheduledRequest


@dataclass(slots=True)
class StepLogits:
    sample_logits: torch.Tensor  # [num_sampling, vocab] fp32, rows of the requests that sample, in order
    prompt_logits: dict[str, tuple[int, torch.Tensor]]  # request id -> (first position, [n, vocab] fp32)


def num_cache_blocks(model: MTATransformer, cache: CacheConfig, warmup_tokens: int) -> int:
    """Blocks that fit the memory budget: on CUDA, `gpu_memory_utilization` of the GPU minus what the weights
    and the activations of a warm-up forward over `warmup_tokens` tokens need; on CPU `cpu_kv_cache_bytes`."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    device = model.tok_embeddings.weight.device
    per_block = cache.block_size * cache_bytes_per_token(model.cfg, model.tok_embeddings.weight.dtype)
    if device.type == "cuda":
        budget = cache.gpu_memory_utilization * torch.cuda.mem_get_info(device)[1] - _cuda_peak_use(
            model, warmup_tokens, device)
    else:
        budget = cache.cpu_kv_cache_bytes
    if budget < per_block:
        raise RuntimeError(f"the KV-cache budget ({int(budget)} bytes) holds no block of {per_block} bytes")
    return int(budget // per_block)


@torch.no_grad()
def _cuda_peak_use(model: MTATransformer, num_tokens: int, device: torch.device) -> int:
    """Bytes in use at the peak of a warm-up forward (weights, CUDA context, activations). The dense path
    over one sequence needs at least the memory of any paged step of that many tokens."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    tokens = torch.zeros(num_tokens, dtype=torch.long, device=device)
    model.dense_logits(tokens, [0, num_tokens])
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    in_use_now = total - free
    activations = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
    torch.cuda.empty_cache()
    return in_use_now + activations


class ModelRunner:
    def __init__(self, model: MTATransformer, kv: KVCacheManager, num_blocks: int):
        self.model = model
        self.kv = kv
        self.device = model.tok_embeddings.weight.device
        self.backend = TorchPagedAttention(model.cfg, num_blocks, kv.block_size,
                                           model.tok_embeddings.weight.dtype, self.device)

    @torch.no_grad()
    def execute(self, scheduled: list[ScheduledRequest]) -> StepLogits:
        tokens, positions, slots, sequences = [], [], [], []
        for s in scheduled:
            rid = s.request.request_id
            sequences.append(SequenceSlice(s.start, s.end, len(tokens), self._block_ids(rid, s.end)))
            tokens.extend(s.request.token_ids[s.start:s.end])
            positions.extend(range(s.start, s.end))
            slots.extend(self.kv.slot(rid, p) for p in range(s.start, s.end))
        batch = PagedBatch(torch.tensor(slots, dtype=torch.long, device=self.device), sequences)

        def attend(layer_id, attn, q, k, v):
            return self.backend.attend(batch, layer_id, attn, q, k, v)

        hidden = self.model(torch.tensor(tokens, device=self.device),
                            torch.tensor(positions, device=self.device), attend)
        return self._logits(scheduled, sequences, hidden)

    def _block_ids(self, request_id: str, end: int) -> torch.Tensor:
        ids = self.kv.block_ids(request_id)[:self.kv.blocks_for(end)]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _logits(self, scheduled, sequences, hidden: torch.Tensor) -> StepLogits:
        sample_rows = [seq.row + seq.end - seq.start - 1 for s, seq in zip(scheduled, sequences) if s.samples]
        prompt_logits = {}
        for s, seq in zip(scheduled, sequences):
            request = s.request
            # Logprobs of prompt tokens 1..P-1 come from positions 0..P-2; each is computed once (a recompute
            # after preemption does not repeat them).
            if request.params.prompt_logprobs is None:
                continue
            first = max(s.start, len(request.prompt_logprobs) - 1 if request.prompt_logprobs else 0)
            last = min(s.end, request.num_prompt_tokens - 1)
            if first < last:
                rows = hidden[seq.row + first - s.start:seq.row + last - s.start]
                prompt_logits[request.request_id] = (first, self.model.logits(rows))
        return StepLogits(self.model.logits(hidden[sample_rows]), prompt_logits)
