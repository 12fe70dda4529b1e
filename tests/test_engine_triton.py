"""The engine with the `triton` attention backend against the `torch` backend: on the CPU through Triton's
interpreter, compiled on a GPU machine.

The interpreter is slow, so one model per variant and few, short requests; each scenario still crosses
chunk and block boundaries inside conv windows and forces preemption.
"""
from __future__ import annotations

import pytest
import torch

from mta_serve.config import CacheConfig, ModelConfig, MTAConfig, SchedulerConfig
from mta_serve.engine import LLMEngine
from mta_serve.model import build_model
from mta_serve.model_runner import resolve_backend
from helpers import run_all

VOCAB = 61
MODELS = {
    "paper_variants": MTAConfig(pre_conv=[4, 5], post_conv=[3, 3], mta_layers=[0], wpsm=True,
                                head_kernel_size=4, group_norm=True, gate="1d"),
    "baseline": MTAConfig(),
}
PROMPTS = [[5, 9, 1, 3, 7, 2, 8, 4, 6, 11, 13], [1], [7, 7, 2, 9, 4, 1], [3, 8, 12, 40, 2, 1, 9, 9, 30]]


def _generate(model, backend: str, num_blocks: int, **scheduler) -> list:
    engine = LLMEngine(model, None, CacheConfig(block_size=4, num_blocks=num_blocks, attention_backend=backend),
                       SchedulerConfig(**scheduler))
    assert engine.runner.backend_name == backend
    done = run_all(engine, PROMPTS, 6)
    assert engine.pool.num_free == engine.num_blocks
    assert engine.scheduler.num_preemptions >= 1
    return [done[f"r{i}"] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("variant", sorted(MODELS))
def test_triton_backend_equals_torch_backend(variant):
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64,
                      mta=MODELS[variant])
    model = build_model(cfg, seed=3, mta_init="random", device="cuda" if torch.cuda.is_available() else "cpu")
    # chunks of 3 tokens (windows of 3 + 2 rows straddle them) and a cache of 7 blocks for 4 requests of up
    # to 17 tokens: requests are preempted and recomputed.
    scheduler = dict(max_chunk_tokens=3, max_num_batched_tokens=8)
    expected = _generate(model, "torch", 7, **scheduler)
    # with overlap_steps, as on CUDA: mixed steps' tokens include placeholders filled on the device
    got = _generate(model, "triton", 7, overlap_steps=True, **scheduler)
    for a, b in zip(expected, got):
        assert b.token_ids == a.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_backend_resolution(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cpu")) == "torch"  # the interpreter is never chosen
    assert resolve_backend("triton", torch.device("cpu")) == "triton"  # TRITON_INTERPRET=1 here
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="needs Triton and a CUDA device"):
        resolve_backend("triton", torch.device("cpu"))


def test_attention_backend_is_validated():
    with pytest.raises(ValueError, match="attention_backend"):
        CacheConfig(attention_backend="flash")


def test_warm_up_runs_every_layer_kind_and_leaves_the_engine_exact():
    """warm_up (run at engine start on CUDA) touches one layer per kind — here a conv layer, a mixing-only
    layer — and must not change what the engine computes afterwards."""
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64,
                      mta=MODELS["paper_variants"])
    model = build_model(cfg, seed=3, mta_init="random", device="cuda" if torch.cuda.is_available() else "cpu")
    engine = LLMEngine(model, None, CacheConfig(block_size=4, num_blocks=32, attention_backend="triton"),
                       SchedulerConfig())
    assert engine.runner.backend.warm_up(model) == 2
    reference = LLMEngine(model, None, CacheConfig(block_size=4, num_blocks=32, attention_backend="torch"),
                          SchedulerConfig())
    assert run_all(engine, PROMPTS[:1], 4)["r0"].token_ids == run_all(reference, PROMPTS[:1], 4)["r0"].token_ids


def test_step_uploader_round_trips_and_grows():
    """A step's integer arrays come back as device views of one upload, whatever their sizes."""
    from mta_serve.triton_attention import StepUploader

    uploader = StepUploader(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for n in (3, 5000, 7):  # 5,004 values outgrow the first 4,096-value buffer
        arrays = [list(range(n)), [], [n] * 2, [-1, 2 ** 31 - 1]]
        views = uploader.upload(arrays)
        assert [v.cpu().tolist() for v in views] == arrays
        assert all(v.dtype == torch.int32 for v in views)


def test_conv_states_are_allocated_for_post_conv_layers_and_budgeted_exactly():
    """The engine sets aside conv_state_bytes before sizing the KV cache: it must be what the backend
    allocates (max_num_seqs slots and the graphs' scratch slot, post-conv layers only)."""
    from mta_serve.triton_attention import conv_state_bytes

    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=50,
                      mta=MTAConfig(pre_conv=[4, 5], post_conv=[3, 3], mta_layers=[0, 2], wpsm=True))
    model = build_model(cfg, seed=3, mta_init="random", device="cuda" if torch.cuda.is_available() else "cpu")
    engine = LLMEngine(model, None, CacheConfig(block_size=4, num_blocks=16, attention_backend="triton"),
                       SchedulerConfig(max_num_seqs=5))
    states = engine.runner.backend.conv_states
    assert [s is not None for s in states] == [True, False, True]
    tensors = [t for s in states if s is not None for t in (s.post, s.pre)]
    allocated = sum(t.numel() * t.element_size() for t in tensors)
    assert allocated == conv_state_bytes(cfg, 5) and states[0].post.shape == (6, 4, 3, 128)
    assert states[0].pre.shape == (6, 4, 4, 128)
    plain = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, mta=MTAConfig(pre_conv=[2, 3], wpsm=True))
    assert conv_state_bytes(plain, 5) == 0  # no post-conv: decode rows need no earlier rows


def test_the_forward_writes_the_caches_of_every_layer():
    """cache_of hands the fused forward each layer's cache destination (its q|k|v product then writes the
    step's new tokens, at batch 1 in its own kernel): k and v for a plain layer, k, v and q for a
    key-query-conv layer."""
    from mta_serve.triton_attention import TritonBatch

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB,
                      mta=MTAConfig(pre_conv=[2, 3], mta_layers=[1]))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg, seed=3, device=device)
    engine = LLMEngine(model, None, CacheConfig(block_size=4, num_blocks=8, attention_backend="triton"),
                       SchedulerConfig())
    backend = engine.runner.backend
    batch = TritonBatch(torch.tensor([5], dtype=torch.int32, device=device), [])
    for layer_id in (0, 1):
        slots, k_cache, v_cache, q_cache = backend.cache_of(batch, layer_id, model.layers[layer_id].attention)
        assert slots is batch.slot_mapping and k_cache is backend.k_cache[layer_id]
        assert v_cache is backend.v_cache[layer_id] and q_cache is backend.q_cache[layer_id]
    assert backend.q_cache[0] is None and backend.q_cache[1] is not None


def test_plain_decode_rows_get_the_engines_key_splits_and_tiles(monkeypatch):
    """Plain layers' decode rows reach paged flash with flash_splits' key splits and flash_block_n's tiles
    (on the CPU two splits of 64-key tiles: 256-token max_seq_len, two "SMs"), prompt rows with one
    split and the kernel's default tiles; the greedy tokens and logprobs stay the torch backend's."""
    from mta_serve.kernels import paged_flash
    from mta_serve.triton_attention import flash_block_n, flash_splits

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=256)
    model = build_model(cfg, seed=5, device="cuda" if torch.cuda.is_available() else "cpu")
    config = dict(block_size=4, num_blocks=32)
    calls, original = [], paged_flash.paged_flash_attention

    def spy(q, k_cache, v_cache, work, out, block_n=None, num_splits=None, **kwargs):
        calls.append((work.block_m, block_n, num_splits))
        return original(q, k_cache, v_cache, work, out, block_n=block_n, num_splits=num_splits, **kwargs)

    monkeypatch.setattr(paged_flash, "paged_flash_attention", spy)
    engine = LLMEngine(model, None, CacheConfig(attention_backend="triton", enforce_eager=True, **config),
                       SchedulerConfig())  # eager: every decode step calls the kernels from Python
    calls.clear()  # on CUDA the engine's warm-up has run the kernels on throwaway rows
    outputs = run_all(engine, PROMPTS[:1], 3)
    num_sms = engine.runner.backend.num_sms
    decode = (1, flash_block_n(1, 4, num_sms), flash_splits(1, 256, 4, num_sms))
    assert decode == (1, 64, 2) or num_sms != 2  # a GPU has more SMs, so other splits
    prompt_calls = [c for c in calls if c[0] > 1]
    assert calls.count(decode) == 2 * cfg.n_layers and len(prompt_calls) == cfg.n_layers
    assert all(c[1:] == (None, 1) for c in prompt_calls)
    reference = run_all(LLMEngine(model, None, CacheConfig(attention_backend="torch", **config),
                                  SchedulerConfig()), PROMPTS[:1], 3)
    assert outputs["r0"].token_ids == reference["r0"].token_ids
    assert max(abs(x.logprob - y.logprob) for x, y in zip(outputs["r0"].logprobs, reference["r0"].logprobs)) < 1e-4


# layers whose prompts the fused kernel serves: head mixing without a key-query conv
MIXING_MODELS = {"conv_layer_0": (MODELS["paper_variants"], [1, 2]),
                 "no_convs": (MTAConfig(wpsm=True, head_kernel_size=2), [0, 1, 2])}


def _mixing_model(mta=MODELS["paper_variants"]):
    cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64, mta=mta)
    return build_model(cfg, seed=4, mta_init="random", device="cuda" if torch.cuda.is_available() else "cpu")


def _prompt_runs(engine, model, monkeypatch, fail: bool = False) -> list:
    """Generates PROMPTS[:2] (4 tokens each); returns the layers whose prompt rows reached the fused kernel
    (through a pass-through spy; with `fail`, the kernel raises Triton's OutOfResources instead)."""
    import mta_serve.kernels.mixing_prefill as fused_module
    from triton.runtime.errors import OutOfResources

    real, layers = fused_module.mixing_prefill_attention, []
    caches = {engine.runner.backend.k_cache[i].data_ptr(): i for i in range(len(model.layers))}

    def spy(q, k_cache, *args, **kwargs):
        layers.append(caches[k_cache.data_ptr()])
        if fail:
            raise OutOfResources(300000, 232448, "shared memory")
        return real(q, k_cache, *args, **kwargs)

    monkeypatch.setattr(fused_module, "mixing_prefill_attention", spy)
    engine.outputs = run_all(engine, PROMPTS[:2], 4)
    return layers


@pytest.mark.parametrize("num_sms, full", [(64, True), (1, False)])
def test_mixing_only_decode_rows_get_the_engines_splits_and_tiles(monkeypatch, num_sms, full):
    """Decode rows of mixing-only layers reach mta_paged_attention with mixing_decode's choice: a single row
    the one-pass form (128-key tiles, 8 splits); more rows, where decode_splits' count gives at most one
    (row, split) program per SM, that count in 64-key tiles (64 "SMs" here), else half of it in the
    kernels' default tiles (one "SM": 2 -> 1 split); the greedy tokens and logprobs stay the torch
    backend's."""
    import mta_serve.kernels.mta_attention as mta_module

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=128,
                      mta=MIXING_MODELS["no_convs"][0])
    model = build_model(cfg, seed=4, mta_init="random", device="cuda" if torch.cuda.is_available() else "cpu")
    config = dict(block_size=4, num_blocks=32)
    calls, original = [], mta_module.mta_paged_attention

    def spy(q, q_cache, k_cache, v_cache, params, work, out, **kwargs):
        chosen = (kwargs.get(k) for k in ("num_splits", "key_tile", "stream_tile", "one_pass"))
        calls.append((work.block_m, work.work_seq.numel(), work.num_splits, *chosen))
        return original(q, q_cache, k_cache, v_cache, params, work, out, **kwargs)

    monkeypatch.setattr(mta_module, "mta_paged_attention", spy)
    engine = LLMEngine(model, None, CacheConfig(attention_backend="triton", enforce_eager=True, **config),
                       SchedulerConfig())
    engine.runner.backend.num_sms = num_sms
    calls.clear()  # on CUDA the engine's warm-up has run the kernels on throwaway rows
    outputs = run_all(engine, PROMPTS[:2], 3)
    decode = [c[2:] for c in calls if c[0] == 1 and c[1] > 1]
    single = [c[2:] for c in calls if c[0] == 1 and c[1] == 1]
    assert sum(c[0] == 2 for c in decode) >= 2 * cfg.n_layers  # decode steps over 128 keys: two splits
    assert single and all(c[1:] == (c[0], None, None, (128, 8)) for c in single)
    if full:
        assert all(c[1:] == (c[0], 64, 64, None) for c in decode)
    else:  # (one-split launches fit the one "SM" and take the 64-key tiles)
        assert all(c[1:] == (1, None, None, None) for c in decode if c[0] == 2)
    reference = run_all(LLMEngine(model, None, CacheConfig(attention_backend="torch", **config),
                                  SchedulerConfig()), PROMPTS[:2], 3)
    for rid, out in reference.items():
        assert outputs[rid].token_ids == out.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(out.logprobs, outputs[rid].logprobs)) < 1e-4


@pytest.mark.parametrize("variant", sorted(MIXING_MODELS))
def test_mixing_only_layers_run_prompts_through_the_fused_kernel(monkeypatch, variant):
    mta, fused_layers = MIXING_MODELS[variant]
    model = _mixing_model(mta)
    config = dict(block_size=4, num_blocks=32)
    engine = LLMEngine(model, None, CacheConfig(attention_backend="triton", **config),
                       SchedulerConfig(max_chunk_tokens=4))
    layers = _prompt_runs(engine, model, monkeypatch)
    reference = run_all(LLMEngine(model, None, CacheConfig(attention_backend="torch", **config),
                                  SchedulerConfig(max_chunk_tokens=4)), PROMPTS[:2], 4)
    # prompts of 11 and 1 tokens in chunks of <= 4: three prompt steps, each through the mixing-only layers
    assert sorted(set(layers)) == fused_layers and len(layers) == 3 * len(fused_layers)
    for rid, out in reference.items():
        assert engine.outputs[rid].token_ids == out.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(out.logprobs, engine.outputs[rid].logprobs)) < 1e-4


def test_fused_kernel_that_does_not_fit_falls_back_to_the_row_pipeline(monkeypatch, caplog):
    model = _mixing_model()
    config = dict(block_size=4, num_blocks=32)
    engine = LLMEngine(model, None, CacheConfig(attention_backend="triton", **config), SchedulerConfig())
    with caplog.at_level("WARNING", logger="mta_serve.triton_attention"):
        layers = _prompt_runs(engine, model, monkeypatch, fail=True)
    assert layers == [1]  # tried once, then never again
    assert not engine.runner.backend.fuse_mixing and "does not fit" in caplog.text
    reference = run_all(LLMEngine(model, None, CacheConfig(attention_backend="torch", **config),
                                  SchedulerConfig()), PROMPTS[:2], 4)
    assert {rid: out.token_ids for rid, out in engine.outputs.items()} == \
        {rid: out.token_ids for rid, out in reference.items()}


def test_fused_prompt_kernel_in_fp16_matches_the_torch_backend(monkeypatch):
    """16-bit caches: the fused kernel multiplies V by probabilities rounded to the cache dtype (as paged
    flash's prompt tiles); the engine's greedy tokens must still be the torch backend's."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64,
                      mta=MTAConfig(wpsm=True, head_kernel_size=2))
    model = build_model(cfg, seed=4, mta_init="random", dtype=torch.float16,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    prompts = [[5, 9, 1, 3, 7, 2, 8, 4, 6, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43], [1, 2, 3]]
    config = dict(block_size=4, num_blocks=32)
    engine = LLMEngine(model, None, CacheConfig(attention_backend="triton", **config),
                       SchedulerConfig(max_chunk_tokens=8))
    import mta_serve.kernels.mixing_prefill as fused_module

    real, calls = fused_module.mixing_prefill_attention, []
    monkeypatch.setattr(fused_module, "mixing_prefill_attention",
                        lambda q, *args, **kwargs: calls.append(q.dtype) or real(q, *args, **kwargs))
    got = run_all(engine, prompts, 6)
    expected = run_all(LLMEngine(model, None, CacheConfig(attention_backend="torch", **config),
                                 SchedulerConfig(max_chunk_tokens=8)), prompts, 6)
    assert calls and set(calls) == {torch.float16}
    for rid, out in expected.items():
        assert got[rid].token_ids == out.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(out.logprobs, got[rid].logprobs)) < 1e-2


HEAD_VARIANTS = {  # (MTA options, whether the model still launches head_norm_gate)
    "baseline": (MTAConfig(), False),
    "norm_gate": (MTAConfig(pre_conv=[3, 3], post_conv=[2, 3], mta_layers=[0], wpsm=True, head_kernel_size=2,
                            group_norm=True, layer_norm_rescale=True, gate="1d"), False),
    "full_gate": (MTAConfig(wpsm=True, group_norm=True, gate="full"), True),
    # layer 1 is plain: its norm and gate follow paged flash as a separate kernel, layer 0's are fused
    "plain_layer_norm_gate": (MTAConfig(pre_conv=[3, 3], mta_layers=[0], group_norm=True, gate="1d"), True),
}


@pytest.mark.parametrize("variant", sorted(HEAD_VARIANTS))
def test_attention_kernels_apply_the_group_norm_and_gate(variant, monkeypatch):
    """Steps 8-9 in the attention kernels' epilogue: MTA layers' group norm (with depth scales) and 1-d gate
    in their last kernel, the baseline's cast in paged flash's, so the fused forward launches no
    head_norm_gate between attention and the o-projection; a full [d, d] gate still takes the separate
    path. fp16, so every rounding step counts; greedy tokens stay the torch backend's."""
    mta, separate = HEAD_VARIANTS[variant]
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, max_seq_len=64, mta=mta)
    model = build_model(cfg, seed=5, mta_init="random", dtype=torch.float16,
                        device="cuda" if torch.cuda.is_available() else "cpu")
    from mta_serve.kernels import fused_ops

    real, calls = fused_ops.head_norm_gate, []
    monkeypatch.setattr(fused_ops, "head_norm_gate",
                        lambda heads, *args, **kwargs: calls.append(heads.dtype) or real(heads, *args, **kwargs))
    config, scheduler = dict(block_size=4, num_blocks=32), dict(max_chunk_tokens=3, max_num_batched_tokens=8)
    got = run_all(LLMEngine(model, None, CacheConfig(attention_backend="triton", **config),
                            SchedulerConfig(**scheduler)), PROMPTS, 5)
    assert bool(calls) == separate
    expected = run_all(LLMEngine(model, None, CacheConfig(attention_backend="torch", **config),
                                 SchedulerConfig(**scheduler)), PROMPTS, 5)
    for rid, out in expected.items():
        assert got[rid].token_ids == out.token_ids
        assert max(abs(x.logprob - y.logprob) for x, y in zip(out.logprobs, got[rid].logprobs)) < 1e-2
