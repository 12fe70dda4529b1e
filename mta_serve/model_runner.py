"""Runs one forward over a step's mixed batch (prompt chunks and decodes alike) through the paged cache."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .config import CacheConfig
from .cuda_graphs import DecodeGraphs, DecodeRow, graph_pool_bytes
from .kv_cache_manager import KVCacheManager
from .model import MTATransformer
from .paged_attention import TorchPagedAttention, cache_bytes_per_token
from .triton_attention import SequenceSpec, TritonPagedAttention, conv_state_bytes, triton_available
from .scheduler import ScheduledRequest


@dataclass(slots=True)
class StepLogits:
    sample_logits: torch.Tensor  # [num_sampling, vocab] fp32, rows of the requests that sample, in order
    prompt_logits: dict[str, tuple[int, torch.Tensor]]  # request id -> (first position, [n, vocab] fp32)


def num_cache_blocks(model: MTATransformer, cache: CacheConfig, warmup_tokens: int, max_num_seqs: int) -> int:
    """Blocks that fit the memory budget: on CUDA, `gpu_memory_utilization` of the GPU minus what the weights,
    the activations of a warm-up forward over `warmup_tokens` tokens, the triton backend's MTA state slots
    and the decode graphs' memory pool (captured after the cache is allocated) need; on CPU
    `cpu_kv_cache_bytes`."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    device = model.tok_embeddings.weight.device
    per_block = cache.block_size * cache_bytes_per_token(model.cfg, model.tok_embeddings.weight.dtype)
    if device.type == "cuda":
        budget = cache.gpu_memory_utilization * torch.cuda.mem_get_info(device)[1] - _cuda_peak_use(
            model, warmup_tokens, device)
        if resolve_backend(cache.attention_backend, device) == "triton":
            budget -= conv_state_bytes(model.cfg, max_num_seqs)
            if not cache.enforce_eager:
                budget -= graph_pool_bytes(model.cfg, max_num_seqs)
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


def fill_pending_tokens_reference(tokens: torch.Tensor, sampled: torch.Tensor) -> None:
    """tokens [N] int, in place: each placeholder -1 - j (Request.append_pending) becomes sampled[j] [M]."""
    pending = tokens < 0
    tokens[pending] = sampled[-1 - tokens[pending]].to(tokens.dtype)


def take_rows(x: torch.Tensor, rows: list[int] | slice) -> torch.Tensor:
    """x[rows] [n, ...] (a view for a slice or consecutive rows, else a copy), queued without waiting for the
    device: indexing with a Python list uploads the index synchronously, i.e. waits for every step queued
    before, which would undo overlap_steps' running a step ahead."""
    if isinstance(rows, slice):
        return x[rows]
    if not rows:
        return x[:0]
    first = rows[0]
    if rows == list(range(first, first + len(rows))):
        return x[first:first + len(rows)]
    index = torch.tensor(rows, dtype=torch.long, pin_memory=x.is_cuda).to(x.device, non_blocking=True)
    return x.index_select(0, index)


def resolve_backend(name: str, device: torch.device) -> str:
    """`auto` -> `triton` on CUDA (when Triton is installed), else `torch`; `triton` elsewhere is an error."""
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if name == "triton" and not triton_available(device):
        raise ValueError(f"attention_backend 'triton' needs Triton and a CUDA device (device is {device}); "
                         "use 'torch' (TRITON_INTERPRET=1 runs the kernels on the CPU, for tests only)")
    return name


class ModelRunner:
    """Runs steps through the attention backend. The `triton` backend runs the model's fused forward (norms,
    RoPE, gate and SiLU as Triton kernels, fused projection GEMMs); steps whose sequences all compute
    one row (decode) run as cuda_graphs.DecodeGraphs steps: padded to a fixed batch size over fixed-address
    inputs, replaying a captured CUDA graph on CUDA unless `cuda_graphs` is False (then the same padded
    step runs eagerly, so graphs on and off compute the same thing). The caches then hold one extra scratch
    block (id num_blocks) for the padding rows. For models with a post-softmax conv, a decode row also needs
    its request's state slot to be current (kv_cache_manager); a step with a row whose slot is not (the
    first row after a prefix-cache hit or a preemption) runs eagerly, that row as a prompt group."""

    def __init__(self, model: MTATransformer, kv: KVCacheManager, num_blocks: int, backend: str = "auto",
                 cuda_graphs: bool = True, max_num_seqs: int = 256):
        self.model = model
        self.kv = kv
        self.device = model.tok_embeddings.weight.device
        self.backend_name = resolve_backend(backend, self.device)
        triton = self.backend_name == "triton"
        dtype = model.tok_embeddings.weight.dtype
        if triton:
            model.fuse_projections()  # the triton backend runs the fused forward (kernels.fused_ops)
            self.backend = TritonPagedAttention(model.cfg, num_blocks + 1, kv.block_size, dtype, self.device,
                                                num_state_slots=kv.num_state_slots)
        else:
            self.backend = TorchPagedAttention(model.cfg, num_blocks, kv.block_size, dtype, self.device)
        self.uses_state = triton and self.backend.has_conv_state
        if triton and self.device.type == "cuda":
            self.backend.warm_up(model)  # compile the kernels now, not during the first requests
        self.graphs = DecodeGraphs(model, self.backend, max_num_seqs, scratch_block=num_blocks,
                                   capture=cuda_graphs and self.device.type == "cuda") if triton else None
        if triton and self.device.type == "cuda" and not self.cuda_graphs:
            self.graphs.warm_up()  # the capture compiles the fused forward's kernels; without it, do it now

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay captured graphs."""
        return self.graphs is not None and bool(self.graphs.graphs)

    @torch.no_grad()
    def execute(self, scheduled: list[ScheduledRequest], sampled: torch.Tensor | None = None) -> StepLogits:
        """Queue the step's forward. `sampled` [M] int64 (device): the tokens drawn by the step still in
        flight, which the placeholders among the scheduled tokens stand for (Request.append_pending)."""
        ready = [not self.uses_state or self.kv.state_ready(s.request.request_id, s.start) for s in scheduled]
        if self.uses_state:  # every scheduled request writes its state slot in this step
            for s in scheduled:
                self.kv.state_written(s.request.request_id, s.end)
        if (self.graphs is not None and len(scheduled) <= self.graphs.max_batch
                and all(s.end - s.start == 1 for s in scheduled) and all(ready)):
            return self._execute_decode_graph(scheduled, sampled)
        tokens, positions, slots, specs = [], [], [], []
        for s, is_ready in zip(scheduled, ready):
            rid = s.request.request_id
            specs.append(SequenceSpec(s.start, s.end, len(tokens), self.kv.block_ids(rid)[:self.kv.blocks_for(s.end)],
                                      self._state_slot(rid), is_ready))
            tokens.extend(s.request.token_ids[s.start:s.end])
            positions.extend(range(s.start, s.end))
            slots.extend(self.kv.slot(rid, p) for p in range(s.start, s.end))
        tokens_t, positions_t, batch = self.backend.prepare(tokens, positions, slots, specs)
        if min(tokens) < 0:
            self._fill_pending(tokens_t, sampled)

        def attend(layer_id, attn, q, k, v):
            return self.backend.attend(batch, layer_id, attn, q, k, v)

        fused = self.backend_name == "triton"
        cache_of = functools.partial(self.backend.cache_of, batch) if fused else None
        hidden = self.model(tokens_t, positions_t, attend, fused=fused, cache_of=cache_of)
        first_rows = [s.row for s in specs]
        return self._logits(scheduled, first_rows, lambda rows: self.model.logits(take_rows(hidden, rows)))

    def _execute_decode_graph(self, scheduled: list[ScheduledRequest], sampled: torch.Tensor | None) -> StepLogits:
        rows, pending = [], False
        for s in scheduled:
            rid, token = s.request.request_id, s.request.token_ids[s.start]
            pending = pending or token < 0
            rows.append(DecodeRow(token, s.start, self.kv.slot(rid, s.start), self.kv.block_ids(rid),
                                  self._state_slot(rid)))
        fill = (lambda tokens: self._fill_pending(tokens, sampled)) if pending else None
        logits = self.graphs.run(rows, fill)  # a view of the graphs' output buffer, rewritten by the next step

        def logits_of(rows):  # copies: the next step's replay rewrites the buffer before these are read
            return take_rows(logits, rows).clone()

        return self._logits(scheduled, list(range(len(rows))), logits_of)

    def _fill_pending(self, tokens: torch.Tensor, sampled: torch.Tensor | None) -> None:
        """tokens [N] (device), in place: placeholders -> the in-flight step's drawn tokens."""
        if sampled is None:
            raise RuntimeError("a scheduled token is still being drawn, but no step is in flight")
        if self.backend_name == "triton":
            from .kernels.fused_ops import fill_pending_tokens
            fill_pending_tokens(tokens, sampled)
        else:
            fill_pending_tokens_reference(tokens, sampled)

    def _state_slot(self, request_id: str) -> int:
        return self.kv.state_slot(request_id) if self.uses_state else 0

    def _logits(self, scheduled: list[ScheduledRequest], first_rows: list[int], logits_of) -> StepLogits:
        """first_rows[i]: the batch row of scheduled[i]'s first new token; logits_of(rows) -> [n, vocab]."""
        sample_rows = [row + s.end - s.start - 1 for s, row in zip(scheduled, first_rows) if s.samples]
        prompt_logits = {}
        for s, row in zip(scheduled, first_rows):
            request = s.request
            # Logprobs of prompt tokens 1..P-1 come from positions 0..P-2; each is computed once (a recompute
            # after preemption does not repeat them).
            if request.params.prompt_logprobs is None:
                continue
            first = max(s.start, len(request.prompt_logprobs) - 1 if request.prompt_logprobs else 0)
            last = min(s.end, request.num_prompt_tokens - 1)
            if first < last:
                prompt_logits[request.request_id] = (first, logits_of(slice(row + first - s.start,
                                                                            row + last - s.start)))
        return StepLogits(logits_of(sample_rows), prompt_logits)
