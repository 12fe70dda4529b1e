"""The OpenAI-compatible server, live on 127.0.0.1: the `openai` client and raw httpx against `mta-serve`."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import openai
import pytest

from helpers import TINY_RANDOM, Server

MODEL = "mta-tiny-random"


@pytest.fixture(scope="module")
def server():
    s = Server(*TINY_RANDOM)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120, **kw)


def completion(server, **body) -> dict:
    resp = post(server, "/v1/completions", {"model": MODEL, **body})
    assert resp.status_code == 200, resp.text
    return resp.json()


def sse_events(resp: httpx.Response) -> list:
    """Parse an SSE body strictly: every event is `data: ...` followed by a blank line; the last is [DONE]."""
    text = resp.text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:3]
    return [json.loads(e[6:]) for e in events[:-1]]


def stream(server, path: str, body: dict) -> list:
    with httpx.stream("POST", server.url + path, json={"model": MODEL, "stream": True, **body}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        r.read()
        return sse_events(r)


# ---- completions ----------------------------------------------------------------------------------------

def test_prompt_forms_and_choice_indexes(server):
    ids = [256, 72, 105]
    for prompt, n_prompts in [("Hi", 1), (["Hi", "Yo"], 2), (ids, 1), ([ids, [256, 65]], 2)]:
        body = completion(server, prompt=prompt, max_tokens=3, temperature=0, n=2, ignore_eos=True)
        assert [c["index"] for c in body["choices"]] == list(range(2 * n_prompts))
        assert all(c["finish_reason"] == "length" for c in body["choices"])
        assert body["usage"]["completion_tokens"] == 6 * n_prompts


def test_n_with_seed_reproduces_and_differs(client):
    kw = dict(model=MODEL, prompt="seeded", max_tokens=8, temperature=1.0, n=3, seed=7,
              extra_body={"ignore_eos": True})
    first = [c.text for c in client.completions.create(**kw).choices]
    second = [c.text for c in client.completions.create(**kw).choices]
    assert first == second and len(set(first)) > 1


def test_streamed_text_equals_non_streamed_at_temperature_0(server):
    body = dict(prompt="The MTA engine", max_tokens=12, temperature=0, ignore_eos=True)
    whole = completion(server, **body)["choices"][0]["text"]
    chunks = stream(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "length"
    assert sum(1 for c in chunks if not c["choices"]) == 1  # exactly one usage-only chunk


def test_stop_strings_across_token_boundaries(server):
    letters = {str(i): 30 for i in range(97, 123)}  # keep the random model's output to a-z
    base = dict(prompt="stop here", max_tokens=16, temperature=0, ignore_eos=True, logit_bias=letters)
    full = completion(server, **base)["choices"][0]["text"]
    assert re.fullmatch("[a-z]{16}", full)
    stop = full[5:8]  # three byte-tokens: spans token boundaries
    cut = full[:full.index(stop)]
    got = completion(server, **base, stop=[stop, "\x00never"])["choices"][0]
    assert got["text"] == cut and got["finish_reason"] == "stop"
    streamed = stream(server, "/v1/completions", {**base, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in streamed) == cut
    kept = completion(server, **base, stop=stop, include_stop_str_in_output=True)["choices"][0]["text"]
    assert kept == cut + stop


def test_logprobs_shape(server):
    body = completion(server, prompt="abc", max_tokens=4, temperature=0, logprobs=3, ignore_eos=True)
    lp = body["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    # keyed by token text, lone high bytes as "bytes:\\xNN" (as OpenAI writes them), so none share a key
    assert all(3 <= len(top) <= 4 for top in lp["top_logprobs"])
    assert all(max(top.values()) == lp_ for top, lp_ in zip(lp["top_logprobs"], lp["token_logprobs"]))  # greedy
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_logprobs_of_tokens_holding_part_of_a_character(server):
    """The byte tokenizer spells é as two tokens: each is written "bytes:\\xNN" with its own byte (chat:
    `bytes`), and text_offset counts characters of the returned text, so both start where é does; five
    alternatives asked for are five distinct keys. Streamed offsets agree."""
    hello = [256, 104, 195, 169, 108, 108, 111]  # BOS h é l l o
    body = dict(prompt=[hello], max_tokens=1, temperature=0, logprobs=5, echo=True, logit_bias={"195": 100})
    choice = completion(server, **body)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith("héllo")
    assert lp["tokens"] == ["<|bos|>", "h", "bytes:\\xc3", "bytes:\\xa9", "l", "l", "o", "bytes:\\xc3"]
    assert lp["text_offset"] == [0, 0, 1, 1, 2, 3, 4, 5]
    assert all(len(top) >= 5 for top in lp["top_logprobs"][1:])
    chunks = [c["choices"][0]["logprobs"] for c in stream(server, "/v1/completions", body)
              if c["choices"] and c["choices"][0]["logprobs"]]
    assert [x for c in chunks for x in c["text_offset"]] == lp["text_offset"]
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                 "max_tokens": 1, "temperature": 0, "logprobs": True,
                                                 "top_logprobs": 3, "logit_bias": {"195": 100}}).json()
    entry = chat["choices"][0]["logprobs"]["content"][0]
    assert entry["token"] == "bytes:\\xc3" and entry["bytes"] == [195]
    assert len({bytes(t["bytes"]) for t in entry["top_logprobs"]}) == 3


def test_text_offsets_count_characters_of_the_returned_text():
    """Bytes of a split character start where it does; a byte that never completes one is a character of its
    own (U+FFFD), so the token after it starts after it; a prompt ending mid-character is decoded as the
    engine decodes the generated text, with it as context."""
    from mta_serve.completions import TextOffsets
    from mta_serve.tokenizer import BytesTokenizer

    tok = BytesTokenizer()
    assert TextOffsets(tok, None, 0).starts([104, 195, 169, 108]) == [0, 1, 1, 2]  # h é l
    assert TextOffsets(tok, None, 0).starts([0xa9, 104, 105]) == [0, 1, 2]  # \ufffd h i
    counter = TextOffsets(tok, [256, 104, 195], 2)  # after an echoed "h\ufffd", one token at a time
    assert [counter.starts([t])[0] for t in (104, 104)] == [2, 3]


def test_streamed_offsets_with_a_stop_string_and_an_echoed_split_character(server):
    """The engine holds text back while it might begin a stop string; offsets follow the tokens, not the
    text sent so far. An echoed prompt ending in half a character: the generated tokens start after it."""
    body = dict(prompt="hello", max_tokens=8, temperature=0, logprobs=0, stop=["qqqqqq"], ignore_eos=True,
                logit_bias={"97": 100})
    whole = completion(server, **body)["choices"][0]
    assert whole["text"] == "aaaaaaaa" and whole["logprobs"]["text_offset"] == list(range(8))
    chunks = [c["choices"][0]["logprobs"] for c in stream(server, "/v1/completions", body)
              if c["choices"] and c["choices"][0]["logprobs"]]
    assert [x for c in chunks for x in c["text_offset"]] == list(range(8))
    body = dict(prompt=[[256, 104, 195]], max_tokens=3, temperature=0, logprobs=0, echo=True, ignore_eos=True,
                logit_bias={"104": 100})
    whole = completion(server, **body)["choices"][0]
    assert whole["text"] == "h\ufffdhhh" and whole["logprobs"]["text_offset"] == [0, 0, 1, 2, 3, 4]
    chunks = [c["choices"][0]["logprobs"] for c in stream(server, "/v1/completions", body)
              if c["choices"] and c["choices"][0]["logprobs"]]
    assert [x for c in chunks for x in c["text_offset"]] == [0, 0, 1, 2, 3, 4]


def test_alternatives_written_alike_keep_the_likeliest():
    """Where two tokens decode to the same text (possible with Hugging Face tokenizers), the key holds the
    larger logprob, whichever of them was chosen."""
    from mta_serve.completions import completion_logprobs
    from mta_serve.request import TokenLogprob

    class TwoAlike:  # ids 0 and 1 both decode to "a"; id 2 to "b"
        vocab_size = 3

        def decode(self, ids, skip_special=True):
            return "".join("b" if i == 2 else "a" for i in ids)

    record = TokenLogprob(0, -2.0, {1: -0.5, 2: -1.0, 0: -2.0})
    assert completion_logprobs(TwoAlike(), [record], [0], [0])["top_logprobs"] == [{"a": -0.5, "b": -1.0}]


def test_alternatives_past_the_tokenizers_vocabulary_have_no_text():
    """A model's vocabulary may be larger than its tokenizer's: such an alternative is written "" with no
    bytes rather than failing the request."""
    from mta_serve.completions import chat_logprobs, completion_logprobs
    from mta_serve.request import TokenLogprob
    from mta_serve.tokenizer import BytesTokenizer

    record = TokenLogprob(104, -1.0, {104: -1.0, 300: -2.0})
    assert completion_logprobs(BytesTokenizer(), [record], [104], [0])["top_logprobs"] == [{"h": -1.0, "": -2.0}]
    top = chat_logprobs(BytesTokenizer(), [record])["content"][0]["top_logprobs"]
    assert [(t["token"], t["bytes"]) for t in top] == [("h", [104]), ("", [])]


def test_echo_with_logprobs_as_lm_eval_sends_it(server):
    ids = [256, 84, 104, 101, 32, 99, 97, 116]
    body = completion(server, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then one generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert choice["text"].startswith("The cat")
    echo_only = completion(server, prompt="The cat", max_tokens=0, echo=True, logprobs=0)
    assert echo_only["choices"][0]["text"] == "The cat" and echo_only["usage"]["completion_tokens"] == 0
    assert len(echo_only["choices"][0]["logprobs"]["tokens"]) == 8  # BOS + 7 bytes


def test_sampling_options_are_applied(server):
    forced = completion(server, prompt="x", max_tokens=3, temperature=0, logit_bias={"65": 100}, ignore_eos=True)
    assert forced["choices"][0]["text"] == "AAA"
    penalized = completion(server, prompt="x", max_tokens=3, temperature=0, logit_bias={"65": 5},
                           frequency_penalty=2.0, presence_penalty=2.0, ignore_eos=True, user="u1",
                           min_tokens=2, repetition_penalty=1.1, top_k=5, min_p=0.01, top_p=0.9)
    assert len(penalized["choices"][0]["text"]) >= 1
    # top_k -1 is off, as vLLM's clients send it: the same draws as top_k 0
    off = [completion(server, prompt="x", max_tokens=4, temperature=1.0, seed=3, top_k=k, ignore_eos=True)
           for k in (0, -1)]
    assert off[0]["choices"][0]["text"] == off[1]["choices"][0]["text"]


# ---- chat ---------------------------------------------------------------------------------------------

def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "MTA"}]}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert len(choice.logprobs.content) == 6 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    # default template after BOS; text parts joined with "\n", as vLLM joins them
    assert out.usage.prompt_tokens == 1 + len("system: be brief\nuser: hello \nMTA\nassistant:")
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


# ---- tokenizer routes, models, metrics ----------------------------------------------------------------

def test_tokenizer_routes(server):
    tok = post(server, "/tokenize", {"prompt": "héllo", "add_special_tokens": False}).json()
    assert tok["tokens"] == list("héllo".encode()) and tok["count"] == 6 and tok["max_model_len"] == 512
    assert post(server, "/tokenize", {"prompt": "hi"}).json()["tokens"] == [256, 104, 105]
    assert post(server, "/detokenize", {"tokens": tok["tokens"]}).json() == {"prompt": "héllo"}
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert {"eos_token", "bos_token", "pad_token", "chat_template"} <= set(info)
    # how lm-eval's remote tokenizer finds the EOS id: the first id of encode(eos_token)
    eos = post(server, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()
    assert eos["tokens"] == [257]
    assert post(server, "/detokenize", {"tokens": [999]}).status_code == 400


def test_models_and_metrics(server, client):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 512
    assert httpx.get(server.url + f"/v1/models/{MODEL}").json() == models["data"][0]
    assert client.models.retrieve(MODEL).id == MODEL
    missing = httpx.get(server.url + "/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    completion(server, prompt="metrics", max_tokens=4, ignore_eos=True)
    text = httpx.get(server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
                 "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
                 "vllm:request_queue_time_seconds_bucket", "mta_kv_cache_query_bytes",
                 "mta_prefix_cache_hit_tokens_total"):
        assert name in text, name
    generated = float(re.search(r'vllm:generation_tokens_total\{model_name="[^"]+"\} (\S+)', text).group(1))
    assert generated >= 4
    assert re.search(r'vllm:request_success_total\{finished_reason="length",model_name="[^"]+"\} [1-9]', text)
    assert float(re.search(r"mta_kv_cache_query_bytes\{[^}]*\} (\S+)", text).group(1)) > 0


# ---- errors -------------------------------------------------------------------------------------------

ERRORS = [
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, 999]}, 400, "prompt"),
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": [[1], []]}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": 100000}, 400, "prompt"),
    ({"prompt": "a", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "a", "max_tokens": 2.0}, 400, "max_tokens"),
    ({"prompt": [True, False]}, 400, "prompt"),
    ({"prompt": "a", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "a", "suffix": "z"}, 400, "suffix"),
    ({"prompt": "a", "best_of": 2}, 400, "best_of"),
    ({"prompt": "a", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"prompt": "a", "guided_regex": "[a-z]+"}, 400, "guided_regex"),
    ({"prompt": "a", "guided_json": {}}, 400, "guided_json"),
    ({"prompt": "a", "structured_outputs": {"choice": ["x"]}}, 400, "structured_outputs"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "top_k": -2}, 400, "top_k"),
    ({"prompt": "a", "seed": 2**70}, 400, "seed"),
    ({"prompt": "a", "n": 0}, 400, "n"),
    ({"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ({"prompt": "a", "stop": [""]}, 400, "stop"),
    ({"prompt": "a", "min_tokens": 99}, 400, "min_tokens"),
    ({"prompt": "a", "logit_bias": {"5": 1e300}}, 400, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"999": 5}}, 400, "logit_bias"),
    ({"prompt": "a", "logit_bias": {"-1": 5}}, 400, "logit_bias"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "a" * 600, "max_tokens": None}, 400, "prompt"),
    ({"model": "nope", "prompt": "a"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(ERRORS)])
def test_completion_errors(server, body, status, param):
    resp = post(server, "/v1/completions", {"model": MODEL, **body})
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["code"] == status


def test_error_messages_and_routes(server):
    resp = post(server, "/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 600})
    assert "prompt (4 tokens) + max_tokens (600) = 604 exceeds the context length 512" in resp.text
    resp = httpx.post(server.url + "/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]
    resp = httpx.post(server.url + "/v1/completions", headers={"content-type": "application/json"},
                      content=b'{"model": "mta-tiny-random", "prompt": "a", "temperature": NaN}')
    assert resp.status_code == 400
    resp = httpx.post(server.url + "/v1/completions", content=b'{"model": "x", "prompt": "' + b"a" * (2 << 20) + b'"}')
    assert resp.status_code == 413 and resp.json()["error"]["code"] == 413
    assert httpx.get(server.url + "/v1/nothing").json()["error"]["code"] == 404
    assert httpx.get(server.url + "/v1/completions").status_code == 405
    chat = post(server, "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    long_chat = post(server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 5,
                                                       "messages": [{"role": "user", "content": "a" * 600}]})
    assert long_chat.status_code == 400 and long_chat.json()["error"]["param"] == "messages", long_chat.text
    assert "exceeds the context length 512" in long_chat.json()["error"]["message"]
    tools = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                   "tools": [{"type": "function"}]})
    assert tools.status_code == 400 and tools.json()["error"]["param"] == "tools"
    choice = post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                    "guided_choice": ["yes", "no"]})
    assert choice.status_code == 400 and "'guided_choice'" in choice.json()["error"]["message"]
    plain = post(server, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 1,
                                             "response_format": {"type": "text"}, "guided_json": None})
    assert plain.status_code == 200, plain.text
    # a lone surrogate (valid JSON, not UTF-8) quoted in the message: still the 404, not a 500
    odd = httpx.post(server.url + "/v1/completions", headers={"content-type": "application/json"},
                     content=b'{"model": "t\\ud800", "prompt": "a", "max_tokens": 1}')
    assert odd.status_code == 404 and odd.json()["error"]["param"] == "model", odd.text
    assert "\\ud800" in odd.json()["error"]["message"]


def test_stop_token_ids(server):
    """vLLM's stop_token_ids: generation ends at one of them, whose text is left out as a stop string's is
    (kept with include_stop_str_in_output)."""
    for include, text in ((False, "yy"), (True, "yyx")):
        body = completion(server, prompt="ab", max_tokens=5, temperature=0, min_tokens=2, stop_token_ids=[120],
                          logit_bias={"120": 50, "121": 40}, include_stop_str_in_output=include)
        # min_tokens holds the stop token back for two tokens: "y", "y", then "x" stops
        assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 3
        assert body["choices"][0]["text"] == text
    bad = post(server, "/v1/completions", {"model": MODEL, "prompt": "a", "stop_token_ids": ["x"]})
    assert bad.status_code == 400 and "stop_token_ids" in bad.text


def test_api_key():
    s = Server(*TINY_RANDOM, "--api-key", "sekret")
    try:
        body = {"model": MODEL, "prompt": "a", "max_tokens": 1}
        missing = post(s, "/v1/completions", body)
        wrong = post(s, "/v1/completions", body, headers={"Authorization": "Bearer nope"})
        right = post(s, "/v1/completions", body, headers={"Authorization": "Bearer sekret"})
        assert missing.status_code == wrong.status_code == 401 and right.status_code == 200
        assert missing.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.url + "/health").status_code == 200  # health stays open for probes
    finally:
        s.stop()


# ---- load: disconnects, queue limit, shutdown ------------------------------------------------------------

async def _stream_request(url: str, prompt: str, disconnect_after: int | None) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "stream": True}
    async with httpx.AsyncClient(timeout=300) as c:
        async with c.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            events = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if line == "data: [DONE]":
                        return "done"
                    if disconnect_after is not None and events >= disconnect_after:
                        return "disconnected"  # leaving the block closes the connection mid-stream
    return "truncated"


def _metric(server, name: str, **labels: str) -> float:
    """The value of one sample in /metrics (its name, and labels it must carry)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name} {labels}")


def test_64_streams_with_a_quarter_disconnecting(server):
    async def run():
        jobs = [_stream_request(server.url, f"load {i}", 3 if i % 4 == 0 else None) for i in range(64)]
        return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    assert results.count("disconnected") == 16 and results.count("done") == 48
    assert httpx.get(server.url + "/health").status_code == 200
    for _ in range(100):  # aborts land within a step or two
        if _metric(server, "vllm:num_requests_running") == 0 and _metric(server, "vllm:kv_cache_usage_perc") == 0:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert _metric(server, "vllm:num_requests_running") == 0 and _metric(server, "vllm:num_requests_waiting") == 0
    assert _metric(server, "vllm:kv_cache_usage_perc") == 0.0  # every block is free (cached ones count as free)
    assert _metric(server, "vllm:request_success_total", finished_reason="abort") >= 16


def test_queue_full_gets_429_with_retry_after():
    s = Server(*TINY_RANDOM, "--max-num-seqs", "1", "--max-queued-requests", "2")
    try:
        async def one(c, i):
            return await c.post(s.url + "/v1/completions", json={
                "model": MODEL, "prompt": f"q{i}", "max_tokens": 40, "ignore_eos": True}, timeout=300)

        async def run():
            async with httpx.AsyncClient() as c:
                return await asyncio.gather(*(one(c, i) for i in range(12)))

        statuses = [r.status_code for r in asyncio.run(run())]
        rejected = [r for r in asyncio.run(run()) if r.status_code == 429]
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
        assert rejected and all(r.headers["retry-after"] == "1" for r in rejected)
        assert rejected[0].json()["error"]["type"] == "rate_limit_error"
        # the limit counts sequences (prompts x n): while one request waits, a request of 2 more is turned away
        async def crowded():
            async with httpx.AsyncClient(timeout=300) as c:
                first = [asyncio.create_task(c.post(s.url + "/v1/completions", json={
                    "model": MODEL, "prompt": f"w{i}", "max_tokens": 480, "ignore_eos": True})) for i in range(2)]
                while _metric(s, "vllm:num_requests_waiting") < 1:  # one runs, one waits
                    await asyncio.sleep(0.02)
                pair = await c.post(s.url + "/v1/completions", json={
                    "model": MODEL, "prompt": ["a", "b"], "max_tokens": 1})
                return pair, await asyncio.gather(*first)

        pair, first = asyncio.run(crowded())
        assert [r.status_code for r in first] == [200, 200]
        assert pair.status_code == 429 and pair.json()["error"]["param"] == "prompt", pair.text
        assert "room for 1 of this request's 2 sequences" in pair.json()["error"]["message"]
        # on an idle server a request larger than the limit still runs
        big = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "max_tokens": 1, "prompt": "a", "n": 3},
                         timeout=60)
        assert big.status_code == 200 and len(big.json()["choices"]) == 3, big.text
    finally:
        s.stop()


def test_queue_room_is_counted_in_sequences():
    """Sequences past the queue's room get a 429 naming the field that made them; a request larger than the
    whole limit is let in only when nothing else waits."""
    from types import SimpleNamespace

    from mta_serve.server import APIError, _check_queue_room

    busy = SimpleNamespace(max_queued=4, queue_room=lambda: 1)  # 3 waiting, this request's slot held
    _check_queue_room(busy, 2, "n")
    for num_jobs in (3, 5):
        with pytest.raises(APIError) as err:
            _check_queue_room(busy, num_jobs, "n")
        assert (err.value.status, err.value.param) == (429, "n")
    _check_queue_room(SimpleNamespace(max_queued=4, queue_room=lambda: 3), 10, "prompt")  # nothing else waits
    _check_queue_room(SimpleNamespace(max_queued=None, queue_room=lambda: None), 1000, "n")


def test_sigterm_finishes_in_flight_and_exits_0():
    s = Server(*TINY_RANDOM, "--shutdown-timeout", "20")

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            pending = asyncio.create_task(c.post(s.url + "/v1/completions", json={
                "model": MODEL, "prompt": "last words", "max_tokens": 30, "ignore_eos": True}))
            await asyncio.sleep(0.3)
            s.proc.terminate()
            return await pending

    resp = asyncio.run(run())
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 30
    assert s.proc.wait(timeout=40) == 0


def test_non_streaming_disconnect_aborts(server):
    before = _metric(server, "vllm:request_success_total", finished_reason="abort")

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            task = asyncio.create_task(c.post(server.url + "/v1/completions", json={
                "model": MODEL, "prompt": "abandoned", "max_tokens": 480, "ignore_eos": True}))
            await asyncio.sleep(1.0)
            task.cancel()  # the client goes away mid-request
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(run())
    for _ in range(50):
        if _metric(server, "vllm:request_success_total", finished_reason="abort") > before:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert _metric(server, "vllm:request_success_total", finished_reason="abort") == before + 1
    assert _metric(server, "vllm:num_requests_running") == 0


# ---- property-based fuzzing: no 5xx, no hang ------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop",
          "seed", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "ignore_eos", "user", "suffix",
          "best_of", "tokens", "add_special_tokens", "max_completion_tokens", "unknown_field"]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 24), st.floats(-3, 3, allow_nan=False),
                    st.text(max_size=6), st.sampled_from([MODEL, "", "user", 2**70, -2**70]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)
BODIES = st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=8).map(
    lambda d: {"model": MODEL, **d} if "model" not in d else d)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]),
       body=BODIES)
def test_fuzzed_bodies_never_5xx(server, path, body):
    resp = httpx.post(server.url + path, content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json"})
    assert resp.status_code < 500, (path, body, resp.text)
    if resp.status_code != 200:
        err = resp.json()["error"]
        assert err["code"] == resp.status_code and err["message"]


# ---- edge cases found in review ---------------------------------------------------------------------------

def test_tiny_temperature_is_greedy_and_harmless(server):
    tiny = completion(server, prompt="t", max_tokens=4, temperature=1e-40, ignore_eos=True)["choices"][0]["text"]
    greedy = completion(server, prompt="t", max_tokens=4, temperature=0, ignore_eos=True)["choices"][0]["text"]
    assert tiny == greedy and httpx.get(server.url + "/health").status_code == 200


def test_echo_logprobs_of_a_one_token_prompt(server):
    lp = completion(server, prompt=[99], max_tokens=2, logprobs=0, echo=True, temperature=0,
                    ignore_eos=True)["choices"][0]["logprobs"]
    assert lp["tokens"][0] == "c" and len(lp["tokens"]) == 3
    assert lp["token_logprobs"][0] is None and all(isinstance(x, float) for x in lp["token_logprobs"][1:])


def test_streamed_and_whole_logprobs_agree(server):
    body = dict(prompt="offsets", max_tokens=6, temperature=0, logprobs=2, echo=True, ignore_eos=True)
    whole = completion(server, **body)["choices"][0]["logprobs"]
    chunks = [c["choices"][0]["logprobs"] for c in stream(server, "/v1/completions", body)
              if c["choices"] and c["choices"][0]["logprobs"]]
    joined = {k: [x for c in chunks for x in c[k]] for k in ("tokens", "token_logprobs", "text_offset")}
    assert joined["tokens"] == whole["tokens"] and joined["text_offset"] == whole["text_offset"]
    assert joined["token_logprobs"] == whole["token_logprobs"]


def test_stop_strings_wait_for_min_tokens(server):
    letters = {str(i): 30 for i in range(97, 123)}
    base = dict(prompt="min", max_tokens=12, temperature=0, ignore_eos=True, logit_bias=letters)
    full = completion(server, **base)["choices"][0]["text"]
    got = completion(server, **base, stop=full[0], min_tokens=5)["choices"][0]
    # as in vLLM: stop strings are looked for once 5 tokens exist, so the earliest cut is inside token 5
    assert got["finish_reason"] == "stop" and len(got["text"]) >= 4 and got["text"] == full[:len(got["text"])]
    assert full[0] not in got["text"][4:]
    assert completion(server, **base, stop=full[0])["choices"][0]["text"] == ""  # without min_tokens: at once


def test_largest_seed_with_n(server):
    body = completion(server, prompt="s", max_tokens=2, n=2, seed=2**63 - 1, ignore_eos=True)
    assert len(body["choices"]) == 2


def _raw_request_then_close(port: int, path: str, body: dict, headers: dict | None = None) -> None:
    """Send a request on a raw socket and close it at once: the client is gone before any answer."""
    import socket

    payload = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {len(payload)}"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        asyncio.run(asyncio.sleep(0.3))


def _wait_aborts(server, before: float, expected: int) -> float:
    for _ in range(100):
        now = _metric(server, "vllm:request_success_total", finished_reason="abort")
        if now >= before + expected:
            break
        asyncio.run(asyncio.sleep(0.1))
    return now - before


def test_instant_disconnects_abort_every_choice():
    s = Server(*TINY_RANDOM, "--api-key", "k")  # the key check must not hide disconnects from the handlers
    try:
        auth = {"Authorization": "Bearer k"}
        for path, extra in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                       "stream": True}),
                            ("/v1/completions", {"prompt": "x"}), ("/v1/completions", {"prompt": "x", "stream": True})]:
            before = _metric(s, "vllm:request_success_total", finished_reason="abort")
            _raw_request_then_close(s.port, path, {"model": MODEL, "n": 8, "max_tokens": 200, "ignore_eos": True,
                                                   **extra}, auth)
            assert _wait_aborts(s, before, 8) == 8, path
        assert _metric(s, "vllm:num_requests_running") == 0
        assert _metric(s, "vllm:kv_cache_usage_perc") == 0.0
    finally:
        s.stop()


def test_sigterm_past_the_grace_period_still_answers_properly():
    s = Server(*TINY_RANDOM, "--shutdown-timeout", "1")

    async def run():
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"model": MODEL, "prompt": "long", "max_tokens": 480, "ignore_eos": True}
            plain = asyncio.create_task(c.post(s.url + "/v1/completions", json=body))
            streamed = asyncio.create_task(c.post(s.url + "/v1/completions", json={**body, "stream": True}))
            await asyncio.sleep(0.5)
            s.proc.terminate()
            return await plain, await streamed

    plain, streamed = asyncio.run(run())
    assert plain.status_code == 503 and plain.json()["error"]["type"] == "server_error"
    events = streamed.text.split("\n\n")
    assert events[-2] == "data: [DONE]" and json.loads(events[-3][6:])["error"]["code"] == 503
    assert s.proc.wait(timeout=40) == 0
