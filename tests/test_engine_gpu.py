"""The engine's torch backend on CUDA (skipped without a GPU): exactness against the dense recompute on the
same device, and a KV cache sized from the GPU memory budget."""
from __future__ import annotations

import pytest
import torch

from helpers import greedy_reference
from mta_serve.config import CacheConfig, ModelConfig, MTAConfig, SchedulerConfig
from mta_serve.engine import LLMEngine
from mta_serve.model import build_model
from mta_serve.paged_attention import cache_bytes_per_token
from mta_serve.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PAPER_VARIANTS = MTAConfig(pre_conv=[6, 11], post_conv=[6, 11], mta_layers=[1], wpsm=True, head_kernel_size=4,
                           group_norm=True, gate="1d")


def _model(dtype=torch.float32):
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, vocab_size=101, max_seq_len=256, mta=PAPER_VARIANTS)
    return build_model(cfg, seed=11, mta_init="random", device="cuda", dtype=dtype)


def _run(engine, prompts, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0, logprobs=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("scheduler", [dict(), dict(max_chunk_tokens=7, max_num_batched_tokens=29)])
def test_cuda_engine_matches_dense_recompute(scheduler):
    model = _model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (1, 5, 12, 17, 33, 40, 64, 90)]
    engine = LLMEngine(model, None, CacheConfig(block_size=16, num_blocks=64), SchedulerConfig(**scheduler))
    outs = _run(engine, prompts, 12)
    for prompt, out in zip(prompts, outs):
        tokens, logprobs = greedy_reference(model, prompt, 12)
        assert out.token_ids == tokens
        assert max(abs(a.logprob - b) for a, b in zip(out.logprobs, logprobs)) < 1e-3
    assert engine.pool.num_free == engine.num_blocks


def test_cuda_cache_sized_from_memory_budget():
    model = _model(torch.bfloat16)
    engine = LLMEngine(model, None, CacheConfig(gpu_memory_utilization=0.5), SchedulerConfig())
    free, total = torch.cuda.mem_get_info()
    per_block = 16 * cache_bytes_per_token(model.cfg, torch.bfloat16)
    assert engine.num_blocks * per_block > 0.4 * total  # most of the budget went to the cache
    assert engine.num_blocks * per_block < 0.5 * total  # and no more than the budget
    assert free > 0.45 * total  # the rest of the GPU was left alone
    outs = _run(engine, [[1, 2, 3], [4, 5, 6, 7]], 4)
    assert all(len(o.token_ids) == 4 for o in outs)
