"""The engine on CUDA (skipped without a GPU), torch and triton backends: exactness against the dense
recompute on the same device, the two backends against each other, and a KV cache sized from the GPU memory
budget."""
from __future__ import annotations

import os

import pytest
import torch

from helpers import greedy_reference, run_all
from mta_serve.config import CacheConfig, ModelConfig, MTAConfig, SchedulerConfig
from mta_serve.engine import LLMEngine
from mta_serve.model import build_model
from mta_serve.paged_attention import cache_bytes_per_token

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PAPER_VARIANTS = MTAConfig(pre_conv=[6, 11], post_conv=[6, 11], mta_layers=[1], wpsm=True, head_kernel_size=4,
                           group_norm=True, gate="1d")


def _model(dtype=torch.float32):
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, vocab_size=101, max_seq_len=256, mta=PAPER_VARIANTS)
    return build_model(cfg, seed=11, mta_init="random", device="cuda", dtype=dtype)


def _run(engine, prompts, max_tokens):
    done = run_all(engine, prompts, max_tokens)
    return [done[f"r{i}"] for i in range(len(prompts))]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("scheduler", [dict(), dict(max_chunk_tokens=7, max_num_batched_tokens=29)])
def test_cuda_engine_matches_dense_recompute(scheduler, backend):
    model = _model()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (1, 5, 12, 17, 33, 40, 64, 90)]
    engine = LLMEngine(model, None, CacheConfig(block_size=16, num_blocks=64, attention_backend=backend),
                       SchedulerConfig(**scheduler))
    assert engine.runner.backend_name == backend
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


@pytest.mark.parametrize("mta", [PAPER_VARIANTS, MTAConfig()], ids=["mta", "baseline"])
def test_triton_backend_greedy_equals_torch_backend(mta):
    """Whole-engine greedy outputs of the two backends on a tiny fp32 model: identical tokens; the last
    request alone too (batch-1 decode: the triton backend's linear layers through kernels.row_linear)."""
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, vocab_size=101, max_seq_len=256, mta=mta)
    model = build_model(cfg, seed=5, mta_init="random", device="cuda")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (1, 9, 30, 77, 120)]
    outs = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(model, None, CacheConfig(block_size=16, num_blocks=64, attention_backend=backend),
                           SchedulerConfig(max_chunk_tokens=13, max_num_batched_tokens=40))
        outs[backend] = _run(engine, prompts, 16) + _run(engine, prompts[-1:], 16)
    for a, b in zip(outs["torch"], outs["triton"]):
        assert a.token_ids == b.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3


@pytest.mark.parametrize("mta", [PAPER_VARIANTS, MTAConfig()], ids=["mta", "baseline"])
def test_cuda_graphs_equal_eager_steps(mta):
    """Captured decode graphs (every padded size up to max_num_seqs) give exactly the tokens and logprobs of
    the same steps run eagerly (--enforce-eager), in bf16, while the batch shrinks as requests finish and
    grows as new ones join."""
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, vocab_size=101, max_seq_len=256, mta=mta)
    model = build_model(cfg, seed=11, mta_init="random", device="cuda", dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (1, 5, 12, 17, 33, 40, 64, 90, 3, 7)]
    counts = [20, 3, 9, 14, 30, 5, 11, 25, 17, 2]
    results = []
    for eager in (False, True):
        engine = LLMEngine(model, None, CacheConfig(block_size=16, num_blocks=64, enforce_eager=eager),
                           SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=64))
        graphs = engine.runner.graphs
        assert engine.runner.cuda_graphs == (not eager)
        assert sorted(graphs.graphs) == ([] if eager else graphs.sizes)
        results.append(run_all(engine, prompts, counts))
        assert graphs.num_runs > 20
        assert engine.pool.num_free == engine.num_blocks
    for rid, out in results[1].items():
        assert results[0][rid].token_ids == out.token_ids
        assert [x.logprob for x in results[0][rid].logprobs] == [x.logprob for x in out.logprobs]


def _num_compiled(kernel) -> int:
    """Compiled variants of a Triton kernel (the per-device cache's layout differs across Triton versions)."""
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(cache) for cache in kernel.cache.values())


def test_new_step_shapes_compile_no_new_kernels():
    """After one round of requests, steps of other lengths, chunkings and batch mixes must reuse the compiled
    kernels: Triton compiles a variant per integer divisibility and pointer alignment, which once made the
    engine compile during prefill (185 s instead of 30 s for the 830M throughput workload)."""
    from mta_serve.kernels import mta_attention, paged_flash, row_linear

    kernels = [mta_attention._scores_kernel, mta_attention._logits_kernel, mta_attention._normalizers_kernel,
               mta_attention._probs_kernel, mta_attention._pv_kernel, mta_attention._sum_splits_kernel,
               paged_flash._flash_kernel, paged_flash._flash_combine_kernel, row_linear._row_linear_kernel,
               row_linear._row_linear_fused_kernel]
    g = torch.Generator().manual_seed(2)
    for mta in (PAPER_VARIANTS, MTAConfig()):
        cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, vocab_size=101, max_seq_len=256, mta=mta)
        model = build_model(cfg, seed=11, mta_init="random", device="cuda", dtype=torch.bfloat16)
        engine = LLMEngine(model, None, CacheConfig(block_size=16, num_blocks=64, enforce_eager=True),
                           SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=96, max_chunk_tokens=40))
        first = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (3, 20, 70, 130)]
        run_all(engine, first, 6)
        run_all(engine, first[:1], 3)  # batch-1 decode steps (row_linear)
        compiled = [_num_compiled(k) for k in kernels]
        second = [torch.randint(0, 101, (n,), generator=g).tolist() for n in (1, 9, 17, 33, 47, 95, 150, 201)]
        run_all(engine, second, [5, 9, 2, 13, 7, 4, 11, 3])
        assert [_num_compiled(k) for k in kernels] == compiled


def test_kernels_launch_with_programmatic_dependent_launch_on_hopper():
    """On compute capability 9.0+ the row products, norms, cache writes and attention kernels launch with PDL
    (kernels.pdl), so the engine tests in this file run with it: each such kernel must wait for the one
    before it, or outputs would race."""
    from mta_serve.kernels import pdl

    level = int(os.environ.get("MTA_SERVE_PDL", "2")) if torch.cuda.get_device_capability()[0] >= 9 else 0
    expected = dict(PDL=level, launch_pdl=True) if level else dict(PDL=0)
    assert pdl.options(torch.zeros(1, device="cuda")) == expected
    assert pdl.options(torch.zeros(1)) == dict(PDL=0)


@pytest.mark.parametrize("new_prompt", [False, True], ids=["decode_step", "mixed_step"])
def test_an_overlapped_step_is_launched_without_waiting_for_the_device(new_prompt):
    """With overlap_steps, step() queues the next step behind the one in flight, reads that one's tokens
    and returns: it never waits for work queued after the step in flight. A device sleep of about a second
    queued between two step() calls must still be running when the second returns, for a decode step
    (graph replay) and for a step mixing a new prompt with decodes (eager forward). A launch that
    synchronised (a Python-list index, a blocking upload) would wait for the sleep."""
    from mta_serve.sampling_params import SamplingParams

    engine = LLMEngine(_model(), None, CacheConfig(block_size=16, num_blocks=64, attention_backend="triton"),
                       SchedulerConfig(max_num_seqs=8))
    assert engine.overlap_steps and engine.runner.cuda_graphs
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    for i, n in enumerate((5, 17, 33)):
        engine.add_request(f"r{i}", list(range(1, n + 1)), params)
    for _ in range(4):
        engine.step()  # every request decodes from here on
    if new_prompt:
        engine.add_request("new", list(range(3, 40)), params)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second at the H200's clock
    engine.step()
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy, "step() waited for the device work queued after the step in flight"
    while engine.has_unfinished_requests():
        engine.step()


def test_cuda_sampler_decides_the_batch_on_the_device():
    """A batch mixing every sampling parameter is decided, and its token ids queued for the host, without a
    host synchronisation (the only wait is PendingSamples.result()), and draws on CUDA follow the
    distribution."""
    from mta_serve.request import Request
    from mta_serve.sampler import Sampler
    from mta_serve.sampling_params import SamplingParams

    kinds = [dict(temperature=0, logit_bias={3: 100.0}), dict(temperature=0.7, seed=4, top_k=3),
             dict(temperature=1.0, top_p=0.8, min_p=0.05), dict(temperature=0, repetition_penalty=1.3),
             dict(temperature=1.2, presence_penalty=0.5, frequency_penalty=0.2, min_tokens=5)]
    requests = []
    for i, kind in enumerate(kinds):
        request = Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=8, **kind), eos_token_id=7)
        request.token_ids += [4, 4, 9]
        requests.append(request)
    logits = torch.randn(len(kinds), 101, device="cuda")
    sampler = Sampler(seed=0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = sampler.sample_async(logits.clone(), requests)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tokens = [t for t, _ in pending.result()]
    assert len(tokens) == len(kinds) and tokens[0] == 3
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    plain = [Request(f"p{i}", [1], SamplingParams(temperature=1.0)) for i in range(20000)]
    drawn = [t for t, _ in sampler.sample(torch.log(probs).cuda().repeat(len(plain), 1), plain)]
    freq = torch.bincount(torch.tensor(drawn), minlength=4).float() / len(drawn)
    assert torch.allclose(freq, probs, atol=0.015), freq
