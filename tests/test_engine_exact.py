"""The engine (paged cache, continuous batching) against a full dense recompute, under every scheduling regime.

Every scenario runs >= 8 concurrent greedy requests of mixed lengths and checks: the generated tokens equal
the dense reference's greedy tokens, their logprobs match the reference's, and afterwards every block is free.
Each runs with steps one after another and with overlap_steps (the next step launched before the previous
one's outputs are built, as on CUDA), so preemption, chunking, prefix hits and aborts are checked under both.
"""
from __future__ import annotations

import pytest
import torch

from mta_serve.config import CacheConfig, ModelConfig, MTAConfig, SchedulerConfig
from mta_serve.engine import LLMEngine
from mta_serve.model import build_model
from helpers import greedy_reference, run_all

LOGPROB_TOL = 1e-4
BLOCK = 4
VOCAB = 61

MODELS = {
    # The paper's variant set: pre+post conv on some layers (query window 3 + 2 = 5 rows), head mixing,
    # group norm and gate on all layers, GQA.
    "paper_variants": MTAConfig(pre_conv=[4, 5], post_conv=[3, 3], mta_layers=[0, 2], wpsm=True,
                                head_kernel_size=4, group_norm=True, gate="1d"),
    # Pre-softmax conv only, on every layer (the toy-task variant).
    "pre_conv_only": MTAConfig(pre_conv=[2, 9]),
}
PROMPT_LENGTHS = [1, 3, 6, 9, 12, 17, 23, 30]
MAX_TOKENS = [9, 4, 12, 7, 10, 5, 8, 11]


def _prompt(i: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, VOCAB, (length,), generator=g).tolist()


PROMPTS = [_prompt(i, n) for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_reference(request):
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=128,
                      mta=MODELS[request.param])
    model = build_model(cfg, seed=7, mta_init="random")
    cache: dict[tuple, tuple] = {}

    def reference(prompt: list[int], max_tokens: int):
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            cache[key] = greedy_reference(model, prompt, max_tokens)
        return cache[key]

    return model, reference


@pytest.fixture(params=[False, True], ids=["serial", "overlap"])
def overlap(request) -> bool:
    return request.param


def make_engine(model, overlap: bool, num_blocks=512, **scheduler) -> LLMEngine:
    engine = LLMEngine(model, None, CacheConfig(block_size=BLOCK, num_blocks=num_blocks),
                       SchedulerConfig(overlap_steps=overlap, **scheduler))
    assert engine.overlap_steps is overlap
    return engine




def assert_exact(done: dict, reference, prompts, max_tokens, skip=()) -> None:
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        if f"r{i}" in skip:
            continue
        out = done[f"r{i}"]
        ref_tokens, ref_logprobs = reference(p, n)
        assert out.token_ids == ref_tokens, f"r{i} (prompt {len(p)} tokens) diverged from the dense reference"
        got = [lp.logprob for lp in out.logprobs]
        assert max(abs(a - b) for a, b in zip(got, ref_logprobs)) < LOGPROB_TOL
        assert out.finish_reason == "length"


def assert_all_free(engine) -> None:
    assert engine.pool.num_free == engine.num_blocks
    assert all(b.ref_count == 0 for b in engine.pool.blocks)
    assert not engine.kv.block_tables and not engine.scheduler.running and not engine.scheduler.waiting


def test_no_memory_pressure(model_and_reference, overlap):
    model, reference = model_and_reference
    engine = make_engine(model, overlap)
    done = run_all(engine, PROMPTS, MAX_TOKENS)
    assert_exact(done, reference, PROMPTS, MAX_TOKENS)
    assert engine.scheduler.num_preemptions == 0
    assert_all_free(engine)


@pytest.mark.parametrize("chunk,budget", [(7, 23), (3, 11)])
def test_chunked_prefill_awkward_chunks(model_and_reference, chunk, budget, overlap):
    model, reference = model_and_reference
    engine = make_engine(model, overlap, max_chunk_tokens=chunk, max_num_batched_tokens=budget)
    chunk_starts = set()
    original = engine.runner.execute

    def spy(scheduled, *args):
        chunk_starts.update(s.start for s in scheduled if s.start < s.request.num_prompt_tokens and s.start > 0)
        return original(scheduled, *args)

    engine.runner.execute = spy
    done = run_all(engine, PROMPTS, MAX_TOKENS)
    assert_exact(done, reference, PROMPTS, MAX_TOKENS)
    # prompt chunks started off block boundaries, i.e. inside conv windows and blocks
    assert any(s % BLOCK for s in chunk_starts)
    assert_all_free(engine)


def test_preemption_under_a_small_cache(model_and_reference, overlap):
    model, reference = model_and_reference
    # The longest request needs ceil((30 + 11) / 4) = 11 blocks; 14 blocks force repeated preemptions.
    engine = make_engine(model, overlap, num_blocks=14, max_chunk_tokens=5)
    done = run_all(engine, PROMPTS, MAX_TOKENS)
    assert engine.scheduler.num_preemptions >= 2
    assert_exact(done, reference, PROMPTS, MAX_TOKENS)
    assert_all_free(engine)


def test_prefix_cache_hits_on_and_off_block_boundaries(model_and_reference, overlap):
    model, reference = model_and_reference
    shared_on, shared_off = _prompt(50, 8), _prompt(51, 11)  # 8 ends on a block boundary, 11 does not
    prompts = [shared_on + _prompt(60 + i, 1 + 2 * i) for i in range(4)]
    prompts += [shared_off + _prompt(70 + i, 2 + i) for i in range(4)]
    prompts[3] = list(shared_on)  # a prompt that is exactly a cached prefix
    max_tokens = [6, 8, 5, 7, 6, 9, 4, 7]
    engine = make_engine(model, overlap)
    run_all(engine, [prompts[0], prompts[4]], [3, 3])  # warm the cache with one of each prefix
    done = run_all(engine, prompts, max_tokens)
    outs = list(done.values())
    assert_exact(done, reference, prompts, max_tokens)
    cached = {o.request_id: o.num_cached_tokens for o in outs}
    assert cached["r1"] >= 8 and cached["r5"] >= 8, cached  # hit the shared prefixes
    assert cached["r3"] == 4  # a fully cached 8-token prompt still recomputes its last block
    assert_all_free(engine)


def test_aborts_mid_prefill_and_mid_decode(model_and_reference, overlap):
    model, reference = model_and_reference
    engine = make_engine(model, overlap, max_chunk_tokens=4)
    aborted = {}

    def abort_some(e, step):
        for rid in ("r7", "r5"):  # long prompts: still in prefill at step 2
            if step == 2 and e.requests.get(rid) is not None:
                assert e.requests[rid].request.num_computed_tokens < e.requests[rid].request.num_prompt_tokens
                aborted[rid] = e.abort_request(rid)
        for rid in ("r2", "r4"):  # decoding by step 6
            if step == 6 and rid in e.requests:
                assert e.requests[rid].request.num_output_tokens > 0
                aborted[rid] = e.abort_request(rid)

    done = run_all(engine, PROMPTS, MAX_TOKENS, on_step=abort_some)
    assert aborted == {"r7": True, "r5": True, "r2": True, "r4": True}
    assert set(done) == {"r0", "r1", "r3", "r6"}
    assert_exact(done, reference, PROMPTS, MAX_TOKENS, skip=set(aborted))
    assert engine.abort_request("r0") is False  # already finished
    assert_all_free(engine)
