"""Sampling: seeds, filters, penalties, biases, stops and logprobs, through the engine and as units."""
from __future__ import annotations

import math
import re

import pytest
import torch

from mta_serve.config import CacheConfig, ModelConfig, MTAConfig, SchedulerConfig
from mta_serve.engine import LLMEngine, RequestError
from mta_serve.model import build_model
from mta_serve.request import Request
from mta_serve.sampler import apply_penalties, draw, filtered_probs
from mta_serve.sampling_params import SamplingParams
from mta_serve.tokenizer import CharTokenizer, IncrementalDetokenizer

VOCAB = 40
EOS = 3


class _EosOnly:
    """The engine only reads eos_id from a tokenizer when prompts are token ids."""

    eos_id = EOS
    vocab_size = VOCAB

    def decode(self, ids, skip_special=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, max_seq_len=96,
                      mta=MTAConfig(pre_conv=[3, 3], post_conv=[2, 3], wpsm=True, head_kernel_size=2))
    return build_model(cfg, seed=3, mta_init="random")


def engine(model, **scheduler) -> LLMEngine:
    return LLMEngine(model, None, CacheConfig(block_size=4, num_blocks=128), SchedulerConfig(**scheduler))


def run(eng, requests: dict) -> dict:
    for rid, (prompt, params) in requests.items():
        eng.add_request(rid, prompt, params)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def seeded(seed: int, n: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=1.3, top_p=0.95, seed=seed, ignore_eos=True)


def test_seeded_sampling_is_independent_of_the_batch(model):
    target = ([5, 6, 7, 8], seeded(1234))
    alone = run(engine(model), {"x": target})["x"].token_ids
    crowd = {f"o{i}": ([9 + i] * (2 + 3 * i), seeded(i) if i % 2 else SamplingParams(max_tokens=5 + i))
             for i in range(7)}
    mixed = run(engine(model, max_chunk_tokens=3), {**crowd, "x": target})["x"].token_ids
    first = run(engine(model), {"x": target, **dict(list(crowd.items())[:2])})["x"].token_ids
    assert alone == mixed == first
    other_seed = run(engine(model), {"x": (target[0], seeded(999))})["x"].token_ids
    assert other_seed != alone  # 12 tokens at temperature 1.3: a different seed differs


def test_top_k_one_is_greedy(model):
    prompt = [1, 2, 3, 4, 5]
    greedy = run(engine(model), {"g": (prompt, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))})
    top1 = run(engine(model), {"k": (prompt, SamplingParams(max_tokens=8, temperature=5.0, top_k=1,
                                                             ignore_eos=True))})
    assert greedy["g"].token_ids == top1["k"].token_ids


def test_logit_bias_forces_a_token(model):
    out = run(engine(model), {"b": ([1, 2], SamplingParams(max_tokens=4, temperature=0, logit_bias={17: 100.0},
                                                           ignore_eos=True))})
    assert out["b"].token_ids == [17, 17, 17, 17]


def test_min_tokens_eos_and_stop_token_ids(model):
    eng = LLMEngine(model, _EosOnly(), CacheConfig(block_size=4, num_blocks=64), SchedulerConfig())
    push_eos = {EOS: 100.0}
    out = run(eng, {
        "eos": ([1, 2], SamplingParams(max_tokens=6, temperature=0, logit_bias=push_eos)),
        "min": ([1, 2], SamplingParams(max_tokens=6, temperature=0, logit_bias=push_eos, min_tokens=3)),
        "ignore": ([1, 2], SamplingParams(max_tokens=3, temperature=0, logit_bias=push_eos, ignore_eos=True)),
        # with ignore_eos, EOS stops nothing, so min_tokens must not ban it
        "ignore_min": ([1, 2], SamplingParams(max_tokens=3, temperature=0, logit_bias=push_eos, ignore_eos=True,
                                              min_tokens=3)),
        "stop": ([1, 2], SamplingParams(max_tokens=6, temperature=0, logit_bias={21: 100.0},
                                        stop_token_ids=(21,))),
    })
    assert out["eos"].token_ids == [EOS] and out["eos"].finish_reason == "stop"
    assert EOS not in out["min"].token_ids[:3] and out["min"].token_ids[3] == EOS
    assert out["min"].finish_reason == "stop" and len(out["min"].token_ids) == 4
    assert out["ignore"].token_ids == [EOS] * 3 and out["ignore"].finish_reason == "length"
    assert out["ignore_min"].token_ids == [EOS] * 3
    assert out["stop"].token_ids == [21] and out["stop"].finish_reason == "stop"


@torch.no_grad()
def test_logprobs_and_prompt_logprobs_match_the_dense_reference(model):
    prompt = [4, 9, 2, 33, 7, 1, 8]
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    out = run(engine(model, max_chunk_tokens=3), {"p": (prompt, params)})["p"]
    full = prompt + out.token_ids
    ref = torch.log_softmax(model.score([full])[0], dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        record = out.prompt_logprobs[pos]
        assert record.token_id == prompt[pos]
        assert abs(record.logprob - ref[pos - 1, prompt[pos]].item()) < 1e-4
        assert list(record.top) == torch.topk(ref[pos - 1], 2).indices.tolist()
    for i, record in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + i]
        assert record.token_id == out.token_ids[i] and abs(record.logprob - row.max().item()) < 1e-4
        assert list(record.top) == torch.topk(row, 3).indices.tolist()
        assert all(abs(v - row[k].item()) < 1e-4 for k, v in record.top.items())


def test_penalties_arithmetic():
    r = Request("r", [5, 6], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0))
    r.token_ids += [6, 7, 7]  # outputs: 6 once, 7 twice
    plain = Request("p", [1], SamplingParams())
    plain.token_ids += [5, 5]
    logits = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.0, 4.0, -2.0, 3.0]).repeat(2, 1)
    apply_penalties(logits, [r, plain])
    # outputs: presence + frequency * count; then repetition over prompt+output tokens 5, 6, 7
    expected = torch.tensor([1.0, -1.0, 2.0, 0.0, 0.0, 4.0 / 2, (-2.0 - 0.75) * 2, (3.0 - 1.0) / 2])
    assert torch.allclose(logits[0], expected)
    assert torch.equal(logits[1], torch.tensor([1.0, -1.0, 2.0, 0.0, 0.0, 4.0, -2.0, 3.0]))  # no penalties


def test_filters():
    """One batch of rows with different filters; the tokens are shuffled so the filters work on sorted order."""
    order = torch.tensor([2, 0, 3, 1])
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[order].repeat(6, 1)
    top_k, top_p, min_p = torch.tensor([2, 0, 0, 0, 0, 9]), torch.tensor([1.0, 0.7, 0.85, 1.0, 0.01, 1.0]), \
        torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0, 0.0])
    expected = torch.tensor([[0.625, 0.375, 0, 0], [0.625, 0.375, 0, 0], [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0],
                             [0.625, 0.375, 0, 0], [1.0, 0, 0, 0], [0.5, 0.3, 0.15, 0.05]])
    assert torch.allclose(filtered_probs(logits, top_k, top_p, min_p), expected[:, order])


def test_top_k_keeps_ties_with_the_kth_logit():
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]])
    probs = filtered_probs(logits, torch.tensor([2]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert (probs[0, :3] > 0).all() and probs[0, 3] == 0


def test_draw_inverts_the_cumulative_distribution():
    probs = torch.tensor([0.5, 0.3, 0.0, 0.2]).repeat(6, 1)
    uniforms = torch.tensor([0.0, 0.1, 0.5, 0.79, 0.8, 0.9999])
    assert draw(probs, uniforms).tolist() == [0, 0, 1, 1, 3, 3]  # never the zero-probability token 2
    last_zero = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    assert draw(last_zero, torch.tensor([1.0])).tolist() == [2]  # a uniform at the total: the last possible token


def test_sampled_frequencies_follow_the_distribution():
    """20,000 draws at temperature 1 from one row's softmax, and with top_k=2: frequencies within 0.015."""
    from mta_serve.sampler import Sampler

    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    for kwargs, expected in ((dict(), [0.4, 0.3, 0.2, 0.1]), (dict(top_k=2), [4 / 7, 3 / 7, 0, 0])):
        requests = [Request(f"r{i}", [1], SamplingParams(temperature=1.0, **kwargs)) for i in range(20000)]
        tokens = [t for t, _ in Sampler(seed=0).sample(logits.repeat(len(requests), 1), requests)]
        freq = torch.bincount(torch.tensor(tokens), minlength=4).float() / len(tokens)
        assert torch.allclose(freq, torch.tensor(expected), atol=0.015), freq


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=math.nan), "temperature"), (dict(top_p=0), "top_p"), (dict(seed=2**70), "seed"),
    (dict(max_tokens=0), "max_tokens"), (dict(logprobs=21), "logprobs"), (dict(min_tokens=9, max_tokens=3),
                                                                          "min_tokens"),
    (dict(top_k=1.5), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(logprobs=True), "logprobs"), (dict(logprobs=1.5), "logprobs"), (dict(prompt_logprobs=2.0), "prompt_logprobs"),
    (dict(stop_token_ids=["7"]), "stop_token_ids"), (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(stop_token_ids=[1.5]), "stop_token_ids"), (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(stop_token_ids=object()), "stop_token_ids"), (dict(stop=[7]), "stop"),
    (dict(ignore_eos="false"), "ignore_eos"), (dict(include_stop_str_in_output="no"), "include_stop_str_in_output"),
])
def test_invalid_params_name_the_param(kwargs, param):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param and param in str(err.value)


def test_stop_and_stop_token_ids_take_none_and_single_values():
    params = SamplingParams(stop=None, stop_token_ids=None)
    assert (params.stop, params.stop_token_ids) == ((), ())
    params = SamplingParams(stop="ab", stop_token_ids=5)
    assert (params.stop, params.stop_token_ids) == (("ab",), (5,))
    # ids taken from an array: plain ints
    assert SamplingParams(stop_token_ids=torch.tensor([7, 8])).stop_token_ids == (7, 8)
    assert type(SamplingParams(stop_token_ids=torch.tensor([7])).stop_token_ids[0]) is int


class _LastIdEos(_EosOnly):
    """EOS as the vocabulary's last id, as in the byte tokenizer: where a NaN distribution's draw falls back."""

    eos_id = VOCAB - 1


def test_values_that_round_away_in_fp32_still_sample_sanely(model):
    """top_p, temperature and repetition_penalty that the sampler's fp32 rounds to 0 or inf, and a top_k past
    int64: a tiny top_p keeps the most likely token (greedy), a huge temperature or a tiny penalty makes
    no NaN distribution (whose draw fell back to the last id, EOS here, breaking min_tokens), and a huge
    top_k is off."""
    eos = _LastIdEos.eos_id
    prompt = [1, 2, eos, 4, 5]  # EOS seen: a penalty of 0 would turn its -inf (banned) into NaN

    def eng():
        return LLMEngine(model, _LastIdEos(), CacheConfig(block_size=4, num_blocks=64), SchedulerConfig())

    greedy = run(eng(), {"g": (prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))})["g"]
    out = run(eng(), {
        "top_p": (prompt, SamplingParams(max_tokens=6, top_p=1e-50, seed=1, ignore_eos=True)),
        "hot": (prompt, SamplingParams(max_tokens=6, temperature=1e39, seed=2, min_tokens=6)),
        "penalty": (prompt, SamplingParams(max_tokens=6, repetition_penalty=1e-46, seed=3, min_tokens=6)),
        # a seen token's logit divided past fp32's range: inf, and softmax NaN, unless held at the largest
        "penalty_big": (prompt, SamplingParams(max_tokens=6, repetition_penalty=1e-37, logit_bias={1: 50.0},
                                               seed=3, min_tokens=6)),
        # ... and held there when a temperature below 1 divides it again
        "penalty_big_cool": (prompt, SamplingParams(max_tokens=6, temperature=0.5, repetition_penalty=1e-37,
                                                    logit_bias={1: 50.0}, seed=3, min_tokens=6)),
        "top_k": (prompt, SamplingParams(max_tokens=6, top_k=2**63, seed=4, ignore_eos=True)),
        "top_k_off": (prompt, SamplingParams(max_tokens=6, top_k=0, seed=4, ignore_eos=True)),
    })
    assert out["top_p"].token_ids == greedy.token_ids
    for rid in ("hot", "penalty", "penalty_big", "penalty_big_cool"):
        assert len(out[rid].token_ids) == 6 and eos not in out[rid].token_ids, (rid, out[rid].token_ids)
    assert out["top_k"].token_ids == out["top_k_off"].token_ids


def test_ids_past_the_tokenizers_vocabulary_decode_as_nothing(model):
    """A model's vocabulary may be larger than its tokenizer's (here 40 against the char tokenizer's 32); an
    id past the tokenizer's, sampled or in the prompt, is text "" (as vLLM decodes it) instead of a
    TokenizerError that stopped the engine mid-step."""
    eng = LLMEngine(model, CharTokenizer(), CacheConfig(block_size=4, num_blocks=64), SchedulerConfig())
    out = run(eng, {
        "forced": ("ab", SamplingParams(max_tokens=3, temperature=0, logit_bias={35: 100.0}, stop=["zz"])),
        "prompt": ([29, 0, 36, 1], SamplingParams(max_tokens=2, temperature=0, logit_bias={2: 100.0},
                                                  ignore_eos=True)),
    })
    assert out["forced"].token_ids == [35] * 3 and out["forced"].text == ""
    assert out["prompt"].token_ids == [2, 2] and out["prompt"].text == "cc"
    detok = IncrementalDetokenizer(CharTokenizer(), [29, 0])
    assert [detok.push(t) for t in (1, 33, 2)] == ["b", "", "c"]


def test_an_engine_seed_out_of_range_is_refused_at_construction(model):
    with pytest.raises(ValueError, match=r"invalid seed=.*\[0, 2\^63\)"):
        LLMEngine(model, None, CacheConfig(block_size=4, num_blocks=16), SchedulerConfig(), seed=2**70)


def test_requests_that_can_never_fit_are_rejected(model):
    eng = LLMEngine(model, None, CacheConfig(block_size=4, num_blocks=5), SchedulerConfig())
    with pytest.raises(RequestError, match="needs 6 KV-cache blocks of 4 tokens but the cache has 5"):
        eng.add_request("big", [1] * 20, SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="exceeds the context length 96"):
        eng.add_request("long", [1] * 90, SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="out of range"):
        eng.add_request("oov", [1, VOCAB], SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        eng.add_request("empty", [], SamplingParams())
    eng.add_request("ok", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request("ok", [1, 2], SamplingParams(max_tokens=2))
    assert [r.request_id for r in eng.scheduler.waiting] == ["ok"]  # rejected requests were never queued


def test_batched_greedy_rows_equal_the_row_by_row_path():
    """The sampler decides plain greedy rows together; each row must get what sampling it alone gives, in a
    batch mixing plain greedy, biased, penalized, min_tokens-masked and sampled requests."""
    from mta_serve.sampler import Sampler, logprob_record

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=g)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie: the first index wins either way
    kinds = [dict(temperature=0, logprobs=3), dict(temperature=0), dict(temperature=0, logit_bias={7: 100}),
             dict(temperature=0, repetition_penalty=1.5, logprobs=0), dict(temperature=0, min_tokens=2),
             dict(temperature=0.8, seed=1, logprobs=5)]
    requests = []
    for i, kind in enumerate(kinds):
        request = Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4, **kind), eos_token_id=EOS)
        request.token_ids = [1, 2, 3]
        if request.params.seed is not None:
            request.generator = torch.Generator().manual_seed(request.params.seed)
        requests.append(request)
    batched = Sampler(seed=0).sample(logits, requests)
    requests[5].generator.manual_seed(1)
    raw = torch.log_softmax(logits, dim=-1)
    for row, request in enumerate(requests):
        alone_token, alone_record = Sampler(seed=0).sample(logits[row:row + 1], [request])[0]
        if request.generator is not None:
            request.generator.manual_seed(1)
        assert batched[row][0] == alone_token
        if request.params.logprobs is None:
            assert batched[row][1] is None
        else:
            assert batched[row][1] == logprob_record(raw[row], alone_token, request.params.logprobs)
    assert batched[0][0] == 5 and batched[2][0] == 7


def test_llm_generate_leaves_no_request_behind_when_it_raises(model):
    """A refused prompt, or a step that raises (here KeyboardInterrupt, as Ctrl-C would, from a stand-in
    step), ends generate with its error and its requests aborted: the next call runs alone and gives the
    usual tokens."""
    from mta_serve.llm import LLM

    llm = LLM(model, block_size=4, num_blocks=64)
    greedy = SamplingParams(max_tokens=4, temperature=0)
    expected = llm.generate([[1, 2, 3]], greedy, use_tqdm=False)[0].token_ids
    with pytest.raises(RequestError, match="exceeds the context length"):
        llm.generate([[1, 2], [1] * 200], greedy, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    original = llm.engine.step

    def interrupted():
        raise KeyboardInterrupt

    llm.engine.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3]] * 3, greedy, use_tqdm=False)
    llm.engine.step = original
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([[1, 2, 3]], greedy, use_tqdm=False)[0].token_ids == expected


def test_integer_like_token_ids_are_taken(model):
    """NumPy and torch integers are token ids; a non-integer is named as such, not as out of range."""
    import numpy as np

    from mta_serve.llm import LLM

    llm = LLM(model, block_size=4, num_blocks=64)
    greedy = SamplingParams(max_tokens=3, temperature=0)
    expected = llm.generate([[5, 6]], greedy, use_tqdm=False)[0].token_ids
    for prompts in ([np.array([5, 6])], [[np.int64(5), np.int64(6)]], np.array([5, 6]), torch.tensor([5, 6]),
                    [torch.tensor([5, 6])], [np.int64(5), np.int64(6)], [torch.tensor(5), 6]):
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        assert len(outs) == 1 and outs[0].token_ids == expected
    for bad, shown in (([1.5, 2], "1.5"), ([torch.tensor(True), 2], "tensor(True)"), ([[5], 6], "[5]")):
        with pytest.raises(RequestError, match=f"token id {re.escape(shown)} is not an integer"):
            llm.generate([bad], greedy, use_tqdm=False)
