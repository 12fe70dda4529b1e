"""Decode steps as fixed-shape graph steps (mta_serve.cuda_graphs): padding to the captured batch sizes,
fixed-address inputs, the scratch block. On the CPU the padded step runs eagerly under Triton's interpreter
(everything but the capture); tests/test_engine_gpu.py checks captured graphs against eager steps."""
from __future__ import annotations

import pytest
import torch

from helpers import greedy, run_all
from mta_serve.cli import build_engine, serve_parser
from mta_serve.config import CacheConfig, ConfigError, ModelConfig, MTAConfig, SchedulerConfig
from mta_serve.cuda_graphs import DecodeRow, padded_sizes
from mta_serve.engine import LLMEngine
from mta_serve.model import build_model
from mta_serve.sampling_params import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 61
PROMPTS = [[5, 9, 1, 3, 7, 2, 8, 4, 6, 11, 13], [1], [7, 7, 2, 9, 4, 1]]


def _model():
    mta = MTAConfig(pre_conv=[3, 5], post_conv=[2, 3], mta_layers=[0], wpsm=True, head_kernel_size=2,
                    group_norm=True, gate="1d")
    # max_seq_len not a multiple of the 4-token blocks: the graphs' block tables are 8 entries wide
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=30, mta=mta)
    return build_model(cfg, seed=5, mta_init="random", device=DEVICE)


def _engine(model, backend: str, num_blocks: int = 12, **scheduler) -> LLMEngine:
    return LLMEngine(model, None, CacheConfig(block_size=4, num_blocks=num_blocks, attention_backend=backend),
                     SchedulerConfig(**scheduler))


def test_padded_sizes():
    assert padded_sizes(1) == [1]
    assert padded_sizes(6) == [1, 2, 4, 6]
    assert padded_sizes(64)[-3:] == [32, 48, 64]
    assert padded_sizes(1000)[-2:] == [896, 1000]


def test_graph_block_tables_follow_rows_that_grow_change_owner_or_turn_to_padding():
    """The graph inputs keep last step's block tables and rewrite a row only where it changed: a request's
    table that grew (the manager's list, appended to), a row now holding another request, a padding row."""
    graphs = _engine(_model(), "triton").runner.graphs
    a, b, c = [3, 4], [5], [7, 8]

    def tables(rows, size):
        graphs._fill([DecodeRow(0, 0, 0, ids) for ids in rows], size)
        return graphs._views(size)[5].tolist()

    t = tables([a, b], 2)
    assert t[0][:2] == [3, 4] and t[1][:1] == [5]
    a.append(6)  # a's next block; row 1 now holds c
    t = tables([a, c], 2)
    assert t[0][:3] == [3, 4, 6] and t[1][:2] == [7, 8]
    t = tables([c], 2)  # row 1 is padding
    assert t[0][:2] == [7, 8] and t[1][0] == graphs.scratch_block
    a.append(9)
    t = tables([c, a], 2)
    assert t[0][:2] == [7, 8] and t[1][:4] == [3, 4, 6, 9]


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_decode_steps_run_padded_and_equal_the_torch_backend(overlap):
    """Three decode rows run at the padded size 4 (of 1, 2, 4, 6), and the padding rows write only the
    scratch block: tokens and logprobs equal the torch backend's, preemption by an 8-block cache included,
    and one request runs to max_seq_len (its block table fills the graphs' fixed width). With overlap_steps
    the rows' tokens are placeholders, filled on the device from the step in flight."""
    model = _model()
    engine = _engine(model, "triton", num_blocks=8, max_num_seqs=6, overlap_steps=overlap)
    graphs = engine.runner.graphs
    assert graphs.sizes == [1, 2, 4, 6] and graphs.scratch_block == engine.num_blocks
    sizes, placeholders = [], []
    run = graphs.run

    def spy(rows, *args):
        sizes.append((len(rows), graphs.batch_size(len(rows))))
        placeholders.append(sum(r.token < 0 for r in rows))
        return run(rows, *args)

    graphs.run = spy

    counts = [30 - len(PROMPTS[0]), 9, 6]  # the first ends at max_seq_len = 30
    done = run_all(engine, PROMPTS, counts)
    assert (3, 4) in sizes and any(n < 3 for n, _ in sizes)
    assert (max(placeholders) == 3) if overlap else (max(placeholders) == 0)
    assert engine.scheduler.num_preemptions >= 1
    expected = run_all(_engine(model, "torch", num_blocks=8, max_num_seqs=6), PROMPTS, counts)
    for rid, out in expected.items():
        assert done[rid].token_ids == out.token_ids
        assert max(abs(a.logprob - b.logprob) for a, b in zip(out.logprobs, done[rid].logprobs)) < 1e-4
    assert engine.pool.num_free == engine.num_blocks


def test_one_token_prompt_chunks_give_prompt_logprobs_through_the_graph_step():
    """With one-token chunks every step is a graph step, prompt chunks included (three rows, padded to 4):
    their prompt logprobs come from the graph's logits rows and must equal the torch backend's."""
    model = _model()
    results = []
    for backend in ("torch", "triton"):
        engine = _engine(model, backend, max_chunk_tokens=1, max_num_batched_tokens=3)
        params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2, ignore_eos=True)
        for rid, prompt in zip("abc", (PROMPTS[0], PROMPTS[2], PROMPTS[0][3:8])):
            engine.add_request(rid, prompt, params)
        outs = {}
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o for o in engine.step() if o.finished})
        if backend == "triton":
            assert engine.runner.graphs.num_runs > 10
        results.append(outs)
    for rid in "abc":
        ref, got = results[0][rid], results[1][rid]
        assert got.token_ids == ref.token_ids
        assert len(got.prompt_logprobs) == len(ref.prompt_logprobs)
        for a, b in zip(ref.prompt_logprobs[1:], got.prompt_logprobs[1:]):
            assert b.token_id == a.token_id and abs(a.logprob - b.logprob) < 1e-4
            assert set(a.top) == set(b.top)


def test_torch_backend_has_no_graph_steps():
    engine = _engine(_model(), "torch")
    assert engine.runner.graphs is None and not engine.runner.cuda_graphs


def test_enforce_eager_is_validated_and_reaches_the_engine():
    with pytest.raises(ConfigError, match="enforce_eager"):
        CacheConfig(enforce_eager="yes")
    args = serve_parser().parse_args(["--enforce-eager", "--num-kv-blocks", "8"])
    assert args.enforce_eager
    engine = build_engine(args, _model(), None)
    assert engine.cache_config.enforce_eager and not engine.runner.cuda_graphs


def test_warm_up_step_touches_only_the_scratch_block():
    """The eager warm-up (run at engine start on CUDA when graphs are off, to compile the fused forward)
    writes the scratch block and nothing a request could own."""
    engine = _engine(_model(), "triton")
    backend, scratch = engine.runner.backend, engine.runner.graphs.scratch_block
    caches = [c for c in backend.k_cache + backend.v_cache + backend.q_cache if c is not None]
    for cache in caches:
        cache.normal_()
    before = [c.clone() for c in caches]
    engine.runner.graphs.warm_up()
    for cache, old in zip(caches, before):
        torch.testing.assert_close(cache[:scratch], old[:scratch], atol=0, rtol=0)
    assert any(not torch.equal(c[scratch], o[scratch]) for c, o in zip(caches, before))


def test_single_row_after_a_prefix_hit_runs_as_a_prompt_group_then_decode_rows_read_the_state():
    """A prompt whose blocks are cached but for its last token computes one row, but the request's state
    slot (reused from an earlier request, holding its rows) is not current: that row must run as a prompt
    group, which writes the slot; the decode rows after it read the slot in graph steps. Equal to the
    torch backend."""
    model = _model()
    prompt, other = PROMPTS[0][:9], PROMPTS[2]
    results = []
    for backend in ("torch", "triton"):
        engine = _engine(model, backend, max_num_seqs=1)
        first = run_all(engine, [other, prompt], 6)  # r1 leaves two full blocks of `prompt` cached
        launches = []
        if backend == "triton":
            prepare = engine.runner.backend.prepare

            def spy(*args):
                inputs = prepare(*args)
                launches.append(inputs[2].launches)
                return inputs

            engine.runner.backend.prepare = spy
            runs = engine.runner.graphs.num_runs
        engine.add_request("again", prompt, greedy(5))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        assert done["again"].num_cached_tokens == 8
        if backend == "triton":
            assert [[w.block_m for w in step] for step in launches] == [[engine.runner.backend.prefill_block_m]]
            assert engine.runner.graphs.num_runs - runs == 4  # the other four rows
        results.append((first, done["again"]))
    (first_ref, ref), (first_got, got) = results
    assert got.token_ids == ref.token_ids and first_got["r1"].token_ids == first_ref["r1"].token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(ref.logprobs, got.logprobs)) < 1e-4
