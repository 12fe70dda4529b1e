"""overlap_steps: the next step is launched before the previous step's outputs are built. Whatever ends a
request (max_tokens, a stop token, a stop string found while the next step is already computing it, an
abort while it is in the step in flight), the outputs, streamed text and logprobs must equal those of
steps run one after another, and no block may stay in use."""
from __future__ import annotations

import pytest

from mta_serve.cli import build_engine, serve_parser
from mta_serve.config import CacheConfig, ConfigError, ModelConfig, SchedulerConfig
from mta_serve.engine import LLMEngine
from mta_serve.model import build_model
from mta_serve.sampling_params import SamplingParams
from mta_serve.tokenizer import BytesTokenizer

from helpers import TINY_CONFIG


@pytest.fixture(scope="module")
def model():
    return build_model(ModelConfig.from_yaml(TINY_CONFIG), seed=3, mta_init="random")


def make_engine(model, overlap: bool, **scheduler) -> LLMEngine:
    return LLMEngine(model, BytesTokenizer(), CacheConfig(block_size=4, num_blocks=96),
                     SchedulerConfig(overlap_steps=overlap, **scheduler), seed=11)


def run(engine: LLMEngine, requests: dict, abort_after: dict | None = None) -> dict:
    """Step `requests` (id -> (prompt, params)) to the end -> id -> (final output fields, streamed text);
    abort_after: id -> the step() call after which it is aborted."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    streamed = {rid: "" for rid in requests}
    final, calls = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in final, "output after the request finished"
            streamed[out.request_id] += out.new_text
            if out.finished:
                final[out.request_id] = (out.token_ids, out.text, out.finish_reason,
                                         [(lp.token_id, round(lp.logprob, 5)) for lp in out.logprobs or []],
                                         [None if lp is None else (lp.token_id, round(lp.logprob, 5))
                                          for lp in out.prompt_logprobs or []])
        calls += 1
        for rid, after in (abort_after or {}).items():
            if calls == after:
                assert engine.abort_request(rid)
        assert calls < 500
    assert engine.pool.num_free == engine.num_blocks and not engine.requests
    return {rid: (final.get(rid), streamed[rid]) for rid in requests}


def workload(model) -> dict:
    """Requests ending in every way, their stop string and stop token taken from a probe's greedy output."""
    probe = make_engine(model, overlap=False)
    final, _ = run(probe, {"p": ("hello", SamplingParams(max_tokens=24, temperature=0))})["p"]
    ids, text = final[0], final[1]
    stop_string, stop_token = text[7:9], ids[9]
    return {
        "stop_string": ("hello", SamplingParams(max_tokens=24, temperature=0, stop=[stop_string])),
        "stop_token": ("hello", SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_token])),
        "seeded": ("a longer prompt than the others", SamplingParams(max_tokens=14, temperature=0.9, seed=5,
                                                                     logprobs=2)),
        "penalties": ("xyz", SamplingParams(max_tokens=12, temperature=1.0, seed=7, top_p=0.9, top_k=20,
                                            presence_penalty=0.5, frequency_penalty=0.3, min_tokens=3)),
        "prompt_logprobs": ("prompt logprobs", SamplingParams(max_tokens=5, temperature=0, prompt_logprobs=1)),
        "length": ("q", SamplingParams(max_tokens=9, temperature=0, logprobs=0)),
    }


@pytest.mark.parametrize("chunk", [None, 5])
def test_overlapped_steps_give_the_serial_outputs(model, chunk):
    requests = workload(model)
    serial = run(make_engine(model, overlap=False, max_chunk_tokens=chunk), requests)
    overlapped = run(make_engine(model, overlap=True, max_chunk_tokens=chunk), requests)
    assert serial["stop_string"][0][2] == "stop" and serial["stop_token"][0][2] == "stop"
    assert serial == overlapped


def test_abort_of_a_request_in_the_step_in_flight(model):
    """Aborted right after a step() returns, the request is in the step already launched: nothing more of it
    comes out, and the others are untouched."""
    requests = workload(model)
    serial = run(make_engine(model, overlap=False), requests)
    engine = make_engine(model, overlap=True)
    launched = []
    execute = engine.runner.execute
    engine.runner.execute = lambda scheduled, *args: launched.append({s.request.request_id for s in scheduled}) \
        or execute(scheduled, *args)
    got = run(engine, requests, abort_after={"seeded": 3})
    assert "seeded" in launched[3], "the aborted request was not in the step in flight"
    assert got["seeded"][0] is None
    assert {rid: v for rid, v in got.items() if rid != "seeded"} == \
        {rid: v for rid, v in serial.items() if rid != "seeded"}


def test_the_next_step_is_launched_before_the_outputs_are_built(model):
    engine = make_engine(model, overlap=True)
    events = []
    execute, output = engine.runner.execute, engine._output
    engine.runner.execute = lambda scheduled, *args: events.append("launch") or execute(scheduled, *args)
    engine._output = lambda tracked: events.append("output") or output(tracked)
    engine.add_request("r", "abc", SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    assert events == ["launch", "launch", "output"]
    engine.step()
    assert events[3:] == ["launch", "output"]
    assert engine.has_unfinished_requests()
    engine.step()  # the third token ends the request (max_tokens): no step computes it after that
    assert events[5:] == ["output"] and not engine.has_unfinished_requests()


def test_the_next_step_is_launched_before_the_step_in_flight_is_read(model):
    """Scheduling overlaps too: step N+1 is queued while step N's tokens are still on the device (its
    decode rows hold placeholders), except after a step that drew for a request with penalties."""
    for params, order in ((SamplingParams(max_tokens=4, temperature=0), ["launch", "launch", "read", "launch", "read"]),
                          (SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1.2),
                           ["launch", "read", "launch", "read", "launch"])):
        engine = make_engine(model, overlap=True)
        events = []
        execute, complete = engine.runner.execute, engine._complete
        engine.runner.execute = lambda scheduled, *args: events.append(
            ("launch", min(s.request.token_ids[s.start] for s in scheduled))) or execute(scheduled, *args)
        engine._complete = lambda step: step is None or events.append(("read", None)) or complete(step)
        engine.add_request("r", "abc", params)
        engine.step()
        engine.step()
        assert [e for e, _ in events] == order
        # the decodes' input tokens: still being drawn (placeholders), or read back first
        decode_inputs = [token for e, token in events if e == "launch"][1:]
        assert all(token < 0 for token in decode_inputs) if order[1] == "launch" else \
            all(token >= 0 for token in decode_inputs)


def test_generated_blocks_are_cached_under_their_real_tokens(model):
    """A block is indexed for prefix caching only once its tokens are read back: a prompt that repeats a
    finished request's prompt and output hits every full block of it, generated ones included."""
    engine = make_engine(model, overlap=True)
    first = run(engine, {"a": ("abcdef", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))})["a"][0]
    prompt = list(engine.tokenizer.encode("abcdef", add_bos=True)) + first[0]
    engine.add_request("b", prompt, SamplingParams(max_tokens=1, temperature=0))
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert len(prompt) == 17 and outs[0].num_cached_tokens == 16  # 4 full blocks: what the serial engine caches


def test_overlap_defaults_to_the_device_and_the_cli_turns_it_off():
    """On by default only where the forward runs asynchronously (CUDA): off for this CPU model."""
    cfg = ModelConfig.from_yaml(TINY_CONFIG)
    model = build_model(cfg, seed=0)
    assert LLMEngine(model, None, CacheConfig(num_blocks=8), SchedulerConfig()).overlap_steps is False
    with pytest.raises(ConfigError, match="overlap_steps"):
        SchedulerConfig(overlap_steps="yes")
    args = serve_parser().parse_args(["--no-overlap-steps", "--num-kv-blocks", "8"])
    assert build_engine(args, model, None).scheduler_config.overlap_steps is False
    assert build_engine(serve_parser().parse_args([]), model, None).scheduler_config.overlap_steps is None


def test_a_reused_request_id_is_not_confused_with_the_aborted_request_in_flight(model):
    """A client may abort a request and send a new one under the same id at once: the old request's token
    from the step in flight must not touch the new request's state or blocks."""
    params = SamplingParams(max_tokens=10, temperature=0)
    expected = run(make_engine(model, overlap=False), {"x": ("second prompt", params)})["x"]
    engine = make_engine(model, overlap=True)
    engine.add_request("x", "first prompt", SamplingParams(max_tokens=30, temperature=0))
    engine.step()
    engine.step()
    assert engine.abort_request("x")
    assert run(engine, {"x": ("second prompt", params)})["x"] == expected
