"""The embedded toy-task checkpoints: the MTA model solves fresh samples; both are served out of the box."""
from __future__ import annotations

import random

import httpx
import pytest

from helpers import Server
from mta_serve import LLM, SamplingParams
from mta_serve.cli import embedded_model_dir
from mta_serve.toy_task import make_sample


@pytest.fixture(scope="module")
def fresh_samples():
    rng = random.Random(20261128)  # not the training stream's or the test set's seed
    return [make_sample(rng) for _ in range(40)]


def test_mta_checkpoint_solves_fresh_samples_through_the_engine(fresh_samples):
    llm = LLM(embedded_model_dir("mta-toy"))
    outs = llm.generate([s.prompt for s in fresh_samples], SamplingParams(max_tokens=6, temperature=0),
                        use_tqdm=False)
    correct = sum(out.text[:5] == s.answer for out, s in zip(outs, fresh_samples))
    assert correct >= 38, f"{correct}/40"
    # a correct answer is followed by EOS
    assert all(out.finish_reason == "stop" for out, s in zip(outs, fresh_samples) if out.text[:5] == s.answer)


def test_llm_uses_a_tokenizer_given_with_a_checkpoint_and_names_a_bad_dtype(fresh_samples):
    from mta_serve.tokenizer import CharTokenizer

    class Upper(CharTokenizer):
        def decode(self, ids, skip_special=True):
            return super().decode(ids, skip_special).upper()

    llm = LLM(embedded_model_dir("mta-toy"), tokenizer=Upper())
    out = llm.generate([fresh_samples[0].prompt], SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert out.text[:5] == fresh_samples[0].answer.upper()
    with pytest.raises(ValueError, match="invalid dtype='fp16': allowed float32, float16, bfloat16"):
        LLM(embedded_model_dir("mta-toy"), dtype="fp16")


def test_default_command_serves_the_toy_model(fresh_samples):
    server = Server()  # `mta-serve` with no model arguments
    try:
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == "mta-toy"
        for sample in fresh_samples[:3]:
            body = {"model": "mta-toy", "prompt": sample.prompt, "max_tokens": 6, "temperature": 0}
            choice = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
            assert choice["text"] == sample.answer and choice["finish_reason"] == "stop"
        # The toy vocabulary (a-z . # _) cannot spell the default chat template's "user: ...": the error
        # names the messages and the template, not a prompt the client never sent.
        body = {"model": "mta-toy", "messages": [{"role": "user", "content": "abc"}]}
        resp = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        err = resp.json()["error"]
        assert resp.status_code == 400 and err["param"] == "messages", resp.text
        assert "default chat template" in err["message"] and "':'" in err["message"]
        body = {"model": "mta-toy", "prompt": "abc:", "max_tokens": 2}
        resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "prompt", resp.text
    finally:
        server.stop()


def test_baseline_is_one_flag_away(fresh_samples):
    server = Server("--model", "toy-baseline")
    try:
        body = {"model": "toy-baseline", "prompt": fresh_samples[0].prompt, "max_tokens": 6, "temperature": 0}
        resp = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200
        assert set(resp.json()["choices"][0]["text"]) <= set("abcdefghijklmnopqrstuvwxyz.#_")
    finally:
        server.stop()
