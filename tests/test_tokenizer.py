"""Tests for mta_serve.tokenizer (CPU only, offline, small fixtures built in tmp_path)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from mta_serve.tokenizer import (
    BytesTokenizer,
    CharTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    TiktokenTokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_from_file,
    tokenizer_from_reference,
)

UNICODE_TEXT = "héllo 世界 🙂"
MERGES = [b"he", b"ll", b"hell", b"hello", b" w", b"or", b" wor", b" world", b"\xc3\xa9"]


# ---------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def ranks_file(tmp_path: Path) -> Path:
    """256 single bytes plus a few merges, in tiktoken's base64 ranks format."""
    tokens = [bytes([b]) for b in range(256)] + MERGES
    path = tmp_path / "ranks" / "tiny.tiktoken"
    path.parent.mkdir()
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    """A byte-level BPE tokenizer.json whose post-processor adds <s>, plus an HF-style tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    sentences = ["hello world", "the quick brown fox jumps over the lazy dog", "héllo 世界", "hello hello"] * 5
    tok.train_from_iterator(sentences, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    d = tmp_path / "hf"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
           "chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def _stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    return deltas


# ---------------------------------------------------------------------------------------------------------
# char


def test_char_ids_exact():
    tok = CharTokenizer()
    assert tok.encode("az.#_", add_bos=False) == [0, 25, 26, 27, 28]
    assert tok.encode("b") == [29, 1]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (29, 30, 32)


def test_char_round_trip_and_specials():
    tok = CharTokenizer()
    text = "abc.xyz#ab_"
    ids = tok.encode(text) + [tok.eos_id]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False) == "<|bos|>" + text + "<|eos|>"


@pytest.mark.parametrize("bad", ["A", " ", "é", "1"])
def test_char_rejects_unknown_character(bad: str):
    with pytest.raises(TokenizerError, match=repr(bad)):
        CharTokenizer().encode("ab" + bad)


def test_char_decode_out_of_range():
    with pytest.raises(TokenizerError, match="32"):
        CharTokenizer().decode([0, 32])


# ---------------------------------------------------------------------------------------------------------
# bytes


def test_bytes_ids_and_round_trip():
    tok = BytesTokenizer()
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258)
    ids = tok.encode(UNICODE_TEXT)
    assert ids[0] == 256 and ids[1:] == list(UNICODE_TEXT.encode("utf-8"))
    assert 257 not in ids  # prompts never get EOS
    assert tok.decode(ids + [257]) == UNICODE_TEXT
    assert tok.decode([256, 104, 257], skip_special=False) == "<|bos|>h<|eos|>"


def test_token_bytes_are_each_tokens_own(ranks_file: Path):
    """A token's bytes (for the API's logprobs), including tokens that hold part of a character."""
    tok = BytesTokenizer()
    assert [tok.token_bytes(i) for i in (104, 195, 169, 256)] == [b"h", b"\xc3", b"\xa9", b"<|bos|>"]
    tik = TiktokenTokenizer(ranks_file)
    ids = tik.encode("hello \u00e9", add_bos=False)
    assert b"".join(tik.token_bytes(i) for i in ids) == "hello \u00e9".encode("utf-8")
    assert tik.token_bytes(tik.bos_id) == tik.decode([tik.bos_id], skip_special=False).encode("utf-8")
    with pytest.raises(TokenizerError):
        tok.token_bytes(258)


# ---------------------------------------------------------------------------------------------------------
# tiktoken


def test_tiktoken_layout(ranks_file: Path):
    tok = TiktokenTokenizer(ranks_file)
    n = 256 + len(MERGES)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (n, n + 1, n + 256)
    assert tok.encode("", add_bos=True) == [n]


def test_tiktoken_round_trip_and_merges(ranks_file: Path):
    tok = TiktokenTokenizer(ranks_file)
    ids = tok.encode("hello world", add_bos=False)
    assert ids == [256 + MERGES.index(b"hello"), 256 + MERGES.index(b" world")]
    for text in ["hello world", UNICODE_TEXT, "a\n\n  b's 12345"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and tok.decode(ids) == text


def test_tiktoken_special_text_not_parsed(ranks_file: Path):
    tok = TiktokenTokenizer(ranks_file)
    text = "<|begin_of_text|>hi<|end_of_text|>"
    ids = tok.encode(text, add_bos=False)
    assert all(i < 256 + len(MERGES) for i in ids)
    assert tok.decode(ids) == text


def test_tiktoken_decode_specials(ranks_file: Path):
    tok = TiktokenTokenizer(ranks_file)
    ids = tok.encode("hello") + [tok.eos_id]
    assert tok.decode(ids) == "hello"
    assert tok.decode(ids, skip_special=False) == "<|begin_of_text|>hello<|end_of_text|>"
    n = 256 + len(MERGES)
    assert tok.decode([n + 2, n + 255, n + 4], skip_special=False) == (
        "<|fim_prefix|><|fim_eot|><|reserved_special_token_0|>")


def test_tiktoken_bad_ranks_files(tmp_path: Path):
    gap = tmp_path / "gap.tiktoken"
    gap.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b * 2}\n" for b in range(256)))
    with pytest.raises(TokenizerError, match="permutation"):
        TiktokenTokenizer(gap)
    garbage = tmp_path / "garbage.tiktoken"
    garbage.write_text("this is not a ranks file\n")
    with pytest.raises(TokenizerError, match="garbage.tiktoken:1"):
        TiktokenTokenizer(garbage)


# ---------------------------------------------------------------------------------------------------------
# hf


def test_hf_bos_eos_from_config_and_no_double_bos(hf_dir: Path):
    tok = HFTokenizer(hf_dir / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.chat_template.startswith("{% for m in messages")
    ids = tok.encode("hello world")
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.encode("hello world", add_bos=False) == ids[1:]


def test_hf_round_trip(hf_dir: Path):
    tok = HFTokenizer(hf_dir / "tokenizer.json")
    for text in ["hello world", UNICODE_TEXT]:
        ids = tok.encode(text)
        assert tok.decode(ids + [tok.eos_id]) == text
    assert tok.decode([0] + tok.encode("hi", add_bos=False), skip_special=False) == "<s>hi"


def test_hf_ids_from_args_without_config(hf_dir: Path, tmp_path: Path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    tok = HFTokenizer(bare / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.chat_template) == (None, None, None)
    assert tok.encode("hello")[0] != 0  # no BOS available, none added
    tok = HFTokenizer(bare / "tokenizer.json", bos_id=2, eos_id=1)
    assert tok.encode("hello")[0] == 2 and tok.eos_id == 1


def test_hf_config_token_not_in_vocab(hf_dir: Path):
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|nope|>"}))
    with pytest.raises(TokenizerError, match="nope"):
        HFTokenizer(hf_dir / "tokenizer.json")


# ---------------------------------------------------------------------------------------------------------
# save / load


def _all_kinds(ranks_file: Path, hf_dir: Path) -> list:
    return [CharTokenizer(), BytesTokenizer(), TiktokenTokenizer(ranks_file),
            HFTokenizer(hf_dir / "tokenizer.json")]


def test_save_load_round_trip(ranks_file: Path, hf_dir: Path, tmp_path: Path):
    for tok in _all_kinds(ranks_file, hf_dir):
        out = tmp_path / f"ckpt_{tok.kind}"
        tok.save(out)
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        assert (cfg["kind"], cfg["bos_id"], cfg["eos_id"]) == (tok.kind, tok.bos_id, tok.eos_id)
        back = load_tokenizer(out)
        assert type(back) is type(tok)
        assert (back.vocab_size, back.bos_id, back.eos_id) == (tok.vocab_size, tok.bos_id, tok.eos_id)
        text = "abc.de#f_" if tok.kind == "char" else UNICODE_TEXT + " hello world"
        assert back.encode(text) == tok.encode(text)


def test_saved_files(ranks_file: Path, hf_dir: Path, tmp_path: Path):
    TiktokenTokenizer(ranks_file).save(tmp_path / "tt")
    assert (tmp_path / "tt" / "tokenizer.model").read_bytes() == ranks_file.read_bytes()
    HFTokenizer(hf_dir / "tokenizer.json").save(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<s>", "</s>")
    assert cfg["chat_template"].startswith("{% for m")
    assert HFTokenizer(tmp_path / "hf" / "tokenizer.json").chat_template == cfg["chat_template"]


def test_save_into_own_dir_is_noop_copy(ranks_file: Path):
    tok = TiktokenTokenizer(ranks_file.parent / ranks_file.name)
    tok.save(ranks_file.parent)
    tok2 = load_tokenizer(ranks_file.parent)  # reads tokenizer.model, a copy of the ranks
    assert tok2.encode("hello") == tok.encode("hello")


def test_load_plain_hf_dir(hf_dir: Path, tmp_path: Path):
    # An HF checkpoint: tokenizer_config.json without "kind" → still hf.
    tok = load_tokenizer(hf_dir)
    assert tok.kind == "hf" and tok.bos_id == 0
    (hf_dir / "tokenizer_config.json").unlink()
    assert load_tokenizer(hf_dir).bos_id is None


def test_load_errors(tmp_path: Path, ranks_file: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match=r"empty.*char, bytes, tiktoken, hf"):
        load_tokenizer(empty)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "tokenizer_config.json").write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(TokenizerError, match=r"'wordpiece'.*allowed: char, bytes, tiktoken, hf"):
        load_tokenizer(unknown)
    tt = tmp_path / "tt"
    tt.mkdir()
    (tt / "tokenizer_config.json").write_text(json.dumps({"kind": "tiktoken"}))
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(tt)


def test_load_rejects_inconsistent_ids(tmp_path: Path):
    BytesTokenizer().save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["bos_id"] = 1
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="bos_id"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# reference specs and files


def test_from_reference(ranks_file: Path, hf_dir: Path):
    assert isinstance(tokenizer_from_reference({"name": "char", "path": ""}), CharTokenizer)
    assert isinstance(tokenizer_from_reference({"name": "bytes"}), BytesTokenizer)
    spec = {"name": "tiktoken", "path": "/nonexistent/train/machine/tokenizer.model"}
    assert tokenizer_from_reference(spec, path_override=ranks_file).bos_id == 256 + len(MERGES)
    assert tokenizer_from_reference({"name": "tiktoken", "path": str(ranks_file)}).kind == "tiktoken"
    assert tokenizer_from_reference({"name": "hf", "path": str(hf_dir)}).bos_id == 0
    assert tokenizer_from_reference({"name": "hf", "path": str(hf_dir / "tokenizer.json")}).eos_id == 1


def test_from_reference_errors(hf_dir: Path):
    with pytest.raises(TokenizerError, match=r"/train/tokenizer\.model.*--tokenizer FILE"):
        tokenizer_from_reference({"name": "tiktoken", "path": "/train/tokenizer.model"})
    with pytest.raises(TokenizerError, match=r"not supported.*tokenizer\.json.*--tokenizer"):
        tokenizer_from_reference({"name": "sp", "path": "/train/tokenizer.model"})
    with pytest.raises(TokenizerError, match="'gpt2'"):
        tokenizer_from_reference({"name": "gpt2", "path": "x"})
    # An sp checkpoint served with a converted tokenizer.json given via --tokenizer.
    tok = tokenizer_from_reference({"name": "sp", "path": "/train/sp.model"}, hf_dir / "tokenizer.json")
    assert tok.kind == "hf"


def test_from_file_guesses_kind(ranks_file: Path, hf_dir: Path, tmp_path: Path):
    assert tokenizer_from_file(ranks_file).kind == "tiktoken"
    assert tokenizer_from_file(hf_dir / "tokenizer.json").kind == "hf"
    renamed = tmp_path / "tok.bin"  # JSON content without a .json suffix is still hf
    renamed.write_bytes((hf_dir / "tokenizer.json").read_bytes())
    assert tokenizer_from_file(renamed).kind == "hf"
    with pytest.raises(TokenizerError, match="missing.model.*--tokenizer FILE"):
        tokenizer_from_file(tmp_path / "missing.model")


# ---------------------------------------------------------------------------------------------------------
# incremental detokenization


def test_detok_bytes_never_splits_characters():
    tok = BytesTokenizer()
    ids = tok.encode(UNICODE_TEXT, add_bos=False)
    deltas = _stream(IncrementalDetokenizer(tok), ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == UNICODE_TEXT
    # The emoji's 4 bytes arrive one by one: nothing for 3 pushes, then the whole character.
    assert deltas[-5:-1] == ["", "", "", "🙂"]


def test_detok_with_prompt_and_specials():
    tok = BytesTokenizer()
    prompt = tok.encode("prompt: 日本")
    gen = tok.encode("語 ok", add_bos=False) + [tok.eos_id]
    deltas = _stream(IncrementalDetokenizer(tok, prompt_ids=prompt), gen)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(gen) == "語 ok"


def test_detok_flush_releases_incomplete_tail():
    tok = BytesTokenizer()
    ids = list("a🙂".encode("utf-8"))[:-1]  # stream ends mid-character
    detok = IncrementalDetokenizer(tok)
    pushed = "".join(detok.push(i) for i in ids)
    assert pushed == "a"
    assert pushed + detok.flush() == tok.decode(ids) == "a\ufffd"


def test_detok_invalid_bytes_do_not_stall_forever():
    tok = BytesTokenizer()
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.push(0xFF) for _ in range(40))
    assert out.count("\ufffd") >= 20  # emitted while streaming, not only at flush
    assert out + detok.flush() == tok.decode([0xFF] * 40)


def test_detok_hf_byte_level(hf_dir: Path):
    tok = HFTokenizer(hf_dir / "tokenizer.json")
    text = "hello 世界 🙂 the lazy dog héllo"
    ids = tok.encode(text, add_bos=False)
    # Untrained CJK/emoji fall back to byte tokens, so some characters span several ids.
    assert len(ids) > len(text.split())
    deltas = _stream(IncrementalDetokenizer(tok, prompt_ids=tok.encode("hello")), ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text


def test_detok_tiktoken(ranks_file: Path):
    tok = TiktokenTokenizer(ranks_file)
    ids = tok.encode(UNICODE_TEXT + " hello world", add_bos=False)
    deltas = _stream(IncrementalDetokenizer(tok), ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == UNICODE_TEXT + " hello world"


def test_detok_window_stays_small():
    tok = BytesTokenizer()
    detok = IncrementalDetokenizer(tok)
    calls: list[int] = []
    real_decode = tok.decode
    tok.decode = lambda ids, skip_special=True: (calls.append(len(ids)), real_decode(ids, skip_special))[1]
    for i in tok.encode("x" * 2000 + "🙂" * 50, add_bos=False):
        detok.push(i)
    assert max(calls) <= 8  # never re-decodes the whole 2200-id sequence
