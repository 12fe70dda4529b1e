"""The toy task generator (the paper's layout and invariants) and the toy trainer (loss goes down, resume)."""
from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from mta_serve import toy_task as tt
from mta_serve import train_toy
from mta_serve.checkpoint import load_checkpoint
from mta_serve.config import ModelConfig
from mta_serve.model import build_model
from mta_serve.tokenizer import CharTokenizer

TOK = CharTokenizer()


def _samples(n: int = 40, seed: int = 0) -> list[tt.ToySample]:
    rng = random.Random(seed)
    return [tt.make_sample(rng) for _ in range(n)]


def test_layout_lengths_and_ids():
    for s in _samples():
        assert len(s.prompt) == tt.PROMPT_LEN == 314 and len(s.answer) == 5
        assert s.prompt[tt.CONTEXT_LEN] == "#" and s.prompt.count("#") == 1 and "_" not in s.prompt
        ids = tt.sample_ids(s, TOK)
        assert len(ids) == tt.SEQ_LEN == 321
        assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
        assert TOK.bos_id not in ids[1:] and TOK.eos_id not in ids[:-1]
        span = tt.answer_range(s)
        assert span == range(tt.ANSWER_START, 320)
        assert TOK.decode([ids[i] for i in span]) == s.answer
        assert TOK.decode(ids[1:span.start]) == s.prompt  # what a client sends, without BOS


def test_blocks_query_and_answer():
    for s in _samples():
        blocks = s.blocks
        assert len(blocks) == 52 and len(s.context) == 311
        assert all(len(b) == 5 and len(set(b)) == 5 and set(b) <= set(tt.ALPHABET) for b in blocks)
        assert len(set(blocks)) == 52  # no repeated block
        q = s.query
        assert len(q) == 2 and q[0] != q[1] and set(q) <= set(s.answer)
        holders = [b for b in blocks if set(q) <= set(b)]
        assert holders == [s.answer]  # the target is the only block holding both query letters


def test_seeded_determinism_and_prefix():
    assert _samples(5, 3) == _samples(5, 3) and _samples(5, 3) != _samples(5, 4)
    assert tt.test_set(4, seed=1) == tt.test_set(4, seed=1)
    assert tt.test_set(4, seed=1) != tt.test_set(4, seed=2)
    assert tt.test_set(6, seed=1)[:4] == tt.test_set(4, seed=1)
    assert tt.train_batch(5, 3, 0, frozenset()) == tt.train_batch(5, 3, 0, frozenset())
    assert tt.train_batch(5, 3, 0, frozenset()) != tt.train_batch(6, 3, 0, frozenset())


def test_train_disjoint_from_test():
    test = tt.test_set()
    assert len(test) == 1000 and len({s.context for s in test}) == 1000
    test_prompts = {s.prompt for s in test}
    stream = tt.train_stream(seed=0, batch=16)
    for _ in range(3):
        assert not any(s.prompt in test_prompts for s in next(stream))
    # A context in the exclusion set is never yielded (forced collision).
    first = tt.train_batch(0, 4, 0, frozenset())
    again = tt.train_batch(0, 4, 0, frozenset({first[0].context}))
    assert first[0].context not in {s.context for s in again} and again[:3] == first[1:4]
    assert next(tt.train_stream(seed=0, start_step=2, batch=4, exclude=set())) == tt.train_batch(2, 4, 0, frozenset())


TINY_YAML = """\
dim: 32
n_layers: 1
n_heads: 2
vocab_size: 32
ffn_hidden_dim: 64
rope_theta: 100000.0
max_seq_len: 512
mta:
  pre_conv: [2, 9]
  pad_key: both
"""


def _args(cfg_path, out, steps: int, *extra: str, batch: int = 8, log_every: int = 15) -> list[str]:
    return ["--config", str(cfg_path), "--out", str(out), "--steps", str(steps), "--batch", str(batch),
            "--lr", "3e-3", "--warmup", "1", "--device", "cpu", "--seed", "0", "--workers", "0",
            "--log-every", str(log_every), "--eval-n", "2", *extra]


def test_train_lowers_loss_and_resumes(tmp_path):
    cfg_path = tmp_path / "tiny_toy.yaml"
    cfg_path.write_text(TINY_YAML)
    cfg = ModelConfig.from_yaml(cfg_path)
    out = tmp_path / "run"
    fixed = torch.tensor([tt.sample_ids(s, TOK) for s in tt.test_set(16)])

    with torch.no_grad():
        before = train_toy.answer_loss(build_model(cfg, seed=0), fixed).item()
    record = train_toy.main(_args(cfg_path, out, 30))
    assert record["step"] == 30 and 0.0 <= record["error_pct"] <= 100.0
    model, tok = load_checkpoint(out / "checkpoint")
    assert tok.kind == "char"
    with torch.no_grad():
        after = train_toy.answer_loss(model, fixed).item()
    assert after < before - 0.2, (before, after)
    print(f'answer loss {before:.3f} -> {after:.3f}')
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 30

    with pytest.raises(SystemExit):  # an existing run is never silently overwritten
        train_toy.main(_args(cfg_path, out, 33))
    record = train_toy.main(_args(cfg_path, out, 33, "--resume"))
    assert record["step"] == 33
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 33 and state["optimizer"]["state"]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [15, 30, 33]


def test_resume_matches_uninterrupted_run(tmp_path):
    cfg_path = tmp_path / "tiny_toy.yaml"
    cfg_path.write_text(TINY_YAML)
    train_toy.main(_args(cfg_path, tmp_path / "a", 4, batch=2))
    train_toy.main(_args(cfg_path, tmp_path / "b", 2, batch=2))
    train_toy.main(_args(cfg_path, tmp_path / "b", 4, "--resume", batch=2))
    a = torch.load(tmp_path / "a" / "train_state.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_greedy_answers_match_stepwise_scoring():
    model = build_model(ModelConfig.from_dict(yaml.safe_load(TINY_YAML)), seed=1)
    samples = tt.test_set(2)
    prompts = train_toy.encode_prompts(samples, TOK)
    got = train_toy.greedy_answers(model, prompts, n_new=2, chunk=1)
    for row, s in zip(got.tolist(), samples):  # the model's own packed dense path, one token at a time
        seq = TOK.encode(s.prompt)
        for _ in range(2):
            seq.append(int(model.score([seq])[0][-1].argmax()))
        assert seq[-2:] == row
