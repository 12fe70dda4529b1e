"""Tokenizers for mta-serve: char (toy task), bytes, tiktoken ranks files and Hugging Face tokenizer.json.

All kinds share a duck-typed interface (no base class): attributes ``kind``, ``vocab_size``, ``bos_id``,
``eos_id`` and methods ``encode(text, add_bos=True)``, ``decode(ids, skip_special=True)`` and ``save(dir)``.
Everything is offline: nothing here ever touches the network.

Native checkpoint layout written by ``save`` and read by ``load_tokenizer``:
    tokenizer_config.json   {"kind", "bos_id", "eos_id", "vocab_size", ...}
    tokenizer.model         tiktoken ranks file (kind "tiktoken" only)
    tokenizer.json          Hugging Face tokenizer (kind "hf" only)
"""

from __future__ import annotations

import base64
import binascii
import json
import shutil
from pathlib import Path
from typing import Any, Protocol

KINDS = ("char", "bytes", "tiktoken", "hf")
CONFIG_FILE = "tokenizer_config.json"
TIKTOKEN_FILE = "tokenizer.model"
HF_FILE = "tokenizer.json"

# Llama-3's pre-tokenizer split; the reference encodes tiktoken text with it.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_TIKTOKEN_SPECIALS = 256
# Offsets (from the number of ranks) of the named specials in the reference layout; the rest are reserved.
TIKTOKEN_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    2: "<|fim_prefix|>",
    3: "<|fim_middle|>",
    253: "<|fim_suffix|>",
    254: "<|fim_pad|>",
    255: "<|fim_eot|>",
}


class TokenizerError(ValueError):
    """A tokenizer could not be built, loaded or used; the message names the file or input at fault."""


class Tokenizer(Protocol):
    """Static description of the duck-typed interface (for type hints only)."""

    kind: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special: bool = True) -> str: ...

    def save(self, dir: Path) -> None: ...

    # Optional, on the byte and tiktoken tokenizers: token_bytes(token_id) -> bytes, a token's own bytes,
    # which the API's logprobs report where a token holds part of a character.


# ---------------------------------------------------------------------------------------------------------
# helpers


def _write_config(dir: Path, tok: Any, **extra: Any) -> None:
    dir.mkdir(parents=True, exist_ok=True)
    cfg = {"kind": tok.kind, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "vocab_size": tok.vocab_size}
    cfg.update(extra)
    (dir / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer JSON {path}: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"tokenizer JSON {path} is not an object")
    return data


def _check_ids(ids: list[int], vocab_size: int, kind: str) -> None:
    # Fail with a clear message instead of a backend panic/KeyError deep inside decode.
    for i in ids:
        if not 0 <= i < vocab_size:
            raise TokenizerError(f"token id {i} out of range for {kind} tokenizer (vocab_size {vocab_size})")


# ---------------------------------------------------------------------------------------------------------
# char: the paper's toy task vocabulary


class CharTokenizer:
    """a–z → 0–25, '.' 26, '#' 27, '_' 28, BOS 29, EOS 30; id 31 exists in the model but is never used."""

    kind = "char"
    vocab_size = 32
    bos_id: int | None = 29
    eos_id: int | None = 30
    CHARS = "abcdefghijklmnopqrstuvwxyz.#_"
    SPECIAL_TEXT = {29: "<|bos|>", 30: "<|eos|>", 31: "<|unused|>"}

    def __init__(self) -> None:
        self._to_id = {c: i for i, c in enumerate(self.CHARS)}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        for pos, ch in enumerate(text):
            tid = self._to_id.get(ch)
            if tid is None:
                raise TokenizerError(
                    f"character {ch!r} at position {pos} is not in the char vocabulary (a-z . # _)"
                )
            ids.append(tid)
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        _check_ids(ids, self.vocab_size, self.kind)
        parts = []
        for i in ids:
            if i < len(self.CHARS):
                parts.append(self.CHARS[i])
            elif not skip_special:
                parts.append(self.SPECIAL_TEXT[i])
        return "".join(parts)

    def save(self, dir: Path) -> None:
        _write_config(Path(dir), self)


# ---------------------------------------------------------------------------------------------------------
# bytes: raw UTF-8


class BytesTokenizer:
    """UTF-8 bytes 0–255, BOS 256, EOS 257."""

    kind = "bytes"
    vocab_size = 258
    bos_id: int | None = 256
    eos_id: int | None = 257
    SPECIAL_TEXT = {256: "<|bos|>", 257: "<|eos|>"}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        _check_ids(ids, self.vocab_size, self.kind)
        buf = bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            elif not skip_special:
                buf += self.SPECIAL_TEXT[i].encode("utf-8")
        # "replace" keeps decode total: a model can emit invalid UTF-8 and streaming relies on U+FFFD.
        return buf.decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (a special token's text), which may be part of a character."""
        _check_ids([token_id], self.vocab_size, self.kind)
        return bytes([token_id]) if token_id < 256 else self.SPECIAL_TEXT[token_id].encode("utf-8")

    def save(self, dir: Path) -> None:
        _write_config(Path(dir), self)


# ---------------------------------------------------------------------------------------------------------
# tiktoken: BPE ranks file + the reference's 256 specials


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken ranks file ("<base64 token> <rank>" per line).

    Parsed here rather than with tiktoken.load, which caches files under a temp dir as a side effect.
    """
    try:
        lines = Path(path).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tiktoken ranks file {path}: {e}") from e
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            tok_b64, rank = line.split()
            ranks[base64.b64decode(tok_b64, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise TokenizerError(f"{path}:{lineno}: not a tiktoken ranks line ({e})") from e
    _validate_ranks(ranks, path)
    return ranks


def _validate_ranks(ranks: dict[bytes, int], path: Path) -> None:
    # Specials are placed at len(ranks)+k, so ranks must be exactly 0..n-1 or ids would collide.
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"tiktoken ranks in {path} are not a permutation of 0..{len(ranks) - 1}")
    # tiktoken's BPE panics (not raises) on a byte with no rank, so reject such files up front.
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"tiktoken ranks file {path} lacks {len(missing)} single-byte tokens")


def tiktoken_special_tokens(n_ranks: int) -> dict[str, int]:
    """The reference layout: 256 specials right after the ranks (BOS, EOS, FIM ids, reserved)."""
    specials = {}
    reserved = 0
    for off in range(NUM_TIKTOKEN_SPECIALS):
        name = TIKTOKEN_NAMED_SPECIALS.get(off)
        if name is None:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        specials[name] = n_ranks + off
    return specials


class TiktokenTokenizer:
    """A tiktoken BPE ranks file (e.g. Llama-3's tokenizer.model) with the reference's special layout."""

    kind = "tiktoken"

    def __init__(self, ranks_path: str | Path) -> None:
        import tiktoken  # deferred: only this kind needs it

        self.ranks_path = Path(ranks_path)
        if not self.ranks_path.is_file():
            raise TokenizerError(f"tiktoken ranks file {self.ranks_path} does not exist")
        ranks = read_tiktoken_ranks(self.ranks_path)
        self.n_ranks = len(ranks)
        self.vocab_size = self.n_ranks + NUM_TIKTOKEN_SPECIALS
        self.bos_id: int | None = self.n_ranks
        self.eos_id: int | None = self.n_ranks + 1
        self._enc = tiktoken.Encoding(
            name=f"mta-serve:{self.ranks_path.name}",
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=tiktoken_special_tokens(self.n_ranks),
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # Special-token text in user input is plain text: never let a prompt inject BOS/EOS/FIM ids.
        ids = self._enc.encode(text, allowed_special=set(), disallowed_special=())
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        _check_ids(ids, self.vocab_size, self.kind)
        if skip_special:
            ids = [i for i in ids if i < self.n_ranks]
        return self._enc.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes (a special token's text), which may be part of a character."""
        _check_ids([token_id], self.vocab_size, self.kind)
        return self._enc.decode_single_token_bytes(token_id)

    def save(self, dir: Path) -> None:
        dir = Path(dir)
        _write_config(dir, self)
        dest = dir / TIKTOKEN_FILE
        if not (dest.exists() and dest.samefile(self.ranks_path)):
            shutil.copyfile(self.ranks_path, dest)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers


def _token_content(value: Any) -> str | None:
    # HF configs store special tokens either as a string or as an AddedToken dict with "content".
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(value: Any) -> str | None:
    # Some configs hold a list of named templates; the unnamed/default one is what a chat API would use.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face tokenizer.json; BOS/EOS from a tokenizer_config.json beside it, else from the args."""

    kind = "hf"

    def __init__(self, tokenizer_json_path: str | Path, bos_id: int | None = None,
                 eos_id: int | None = None) -> None:
        from tokenizers import Tokenizer as _HFTok  # deferred: only this kind needs it

        path = Path(tokenizer_json_path)
        if not path.is_file():
            raise TokenizerError(f"HF tokenizer file {path} does not exist")
        try:
            self._tok = _HFTok.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception on malformed files
            raise TokenizerError(f"cannot load HF tokenizer {path}: {e}") from e
        self.path = path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        cfg_path = path.parent / CONFIG_FILE
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        self.bos_id = self._special_id(cfg, "bos", bos_id, cfg_path)
        self.eos_id = self._special_id(cfg, "eos", eos_id, cfg_path)
        self.chat_template: str | None = _chat_template(cfg.get("chat_template"))

    def _special_id(self, cfg: dict, which: str, fallback: int | None, cfg_path: Path) -> int | None:
        if f"{which}_id" in cfg:  # our native config records the id itself
            return cfg[f"{which}_id"]
        token = _token_content(cfg.get(f"{which}_token"))
        if token is None:
            return fallback
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(f"{cfg_path}: {which}_token {token!r} is not in the tokenizer vocabulary")
        return tid

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # add_special_tokens=False: the post-processor may add BOS itself; we add it once, here.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos and self.bos_id is not None else ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        _check_ids(ids, self.vocab_size, self.kind)
        if skip_special:
            # BOS/EOS given by id may not be flagged special inside tokenizer.json.
            ids = [i for i in ids if i != self.bos_id and i != self.eos_id]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def save(self, dir: Path) -> None:
        dir = Path(dir)
        names = {w: (self._tok.id_to_token(i) if i is not None else None)
                 for w, i in (("bos", self.bos_id), ("eos", self.eos_id))}
        _write_config(dir, self, bos_token=names["bos"], eos_token=names["eos"],
                      chat_template=self.chat_template)
        self._tok.save(str(dir / HF_FILE))


# ---------------------------------------------------------------------------------------------------------
# loading


def load_tokenizer(dir: Path) -> Any:
    """Load a tokenizer from a native checkpoint directory (or a plain HF one with tokenizer.json)."""
    dir = Path(dir)
    if not dir.is_dir():
        raise TokenizerError(f"tokenizer directory {dir} does not exist")
    cfg_path = dir / CONFIG_FILE
    cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
    kind = cfg.get("kind")
    if kind is None and (dir / HF_FILE).is_file():
        kind = "hf"  # a plain HF checkpoint: its tokenizer_config.json (if any) has no "kind"
    if kind is None:
        raise TokenizerError(
            f"no tokenizer in {dir}: need {CONFIG_FILE} with a \"kind\" (one of {', '.join(KINDS)}) "
            f"or an HF {HF_FILE}"
        )
    tok = _build_kind(kind, dir, cfg_path)
    _check_config_ids(tok, cfg, cfg_path)
    return tok


def _build_kind(kind: Any, dir: Path, cfg_path: Path) -> Any:
    if kind == "char":
        return CharTokenizer()
    if kind == "bytes":
        return BytesTokenizer()
    if kind == "tiktoken":
        return TiktokenTokenizer(dir / TIKTOKEN_FILE)
    if kind == "hf":
        return HFTokenizer(dir / HF_FILE)
    raise TokenizerError(f"{cfg_path}: unknown tokenizer kind {kind!r} (allowed: {', '.join(KINDS)})")


def _check_config_ids(tok: Any, cfg: dict, cfg_path: Path) -> None:
    # For fixed layouts the ids are implied by the kind; a disagreeing config means a corrupt checkpoint.
    for which in ("bos_id", "eos_id"):
        if which in cfg and cfg[which] != getattr(tok, which):
            raise TokenizerError(
                f"{cfg_path}: {which} {cfg[which]} disagrees with the {tok.kind} tokenizer's "
                f"{getattr(tok, which)}"
            )


def tokenizer_from_file(path: str | Path) -> Any:
    """Guess the kind from a file: JSON (tokenizer.json) → hf, anything else → tiktoken ranks file.

    A directory is loaded with load_tokenizer.
    """
    path = Path(path)
    if path.is_dir():
        return load_tokenizer(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist (pass an existing file via --tokenizer FILE)")
    with path.open("rb") as f:
        head = f.read(64).lstrip()
    # Ranks lines start with base64 text, which never contains '{'.
    if path.suffix == ".json" or head.startswith(b"{"):
        return HFTokenizer(path)
    return TiktokenTokenizer(path)


def tokenizer_from_reference(spec: dict, path_override: str | Path | None = None) -> Any:
    """Build the tokenizer named by a reference params.json's data.tokenizer ({"name", "path"}).

    The recorded path is from the training machine and usually absent here, hence path_override.
    """
    name = spec.get("name")
    if name == "char":
        return CharTokenizer()
    if name == "bytes":
        return BytesTokenizer()
    if name == "sp":
        if path_override is not None:  # a converted tokenizer.json given by the user
            return tokenizer_from_file(path_override)
        raise TokenizerError(
            "SentencePiece ('sp') tokenizers are not supported; convert it to an HF tokenizer.json "
            "and pass it via --tokenizer FILE"
        )
    if name not in ("tiktoken", "hf"):
        raise TokenizerError(f"unknown reference tokenizer name {name!r} (allowed: {', '.join(KINDS)})")
    raw = path_override if path_override is not None else spec.get("path")
    if not raw:
        raise TokenizerError(f"reference tokenizer {name!r} has no path; pass one via --tokenizer FILE")
    path = Path(raw)
    if not path.exists():
        raise TokenizerError(f"{name} tokenizer file {path} does not exist; pass a local copy via --tokenizer FILE")
    if name == "tiktoken":
        return TiktokenTokenizer(path)
    return HFTokenizer(path / HF_FILE if path.is_dir() else path)


# ---------------------------------------------------------------------------------------------------------
# streaming


def decode_in_vocab(tokenizer: Any, ids: list[int], skip_special: bool = True) -> str:
    """The text of ids, an id past the tokenizer's vocabulary decoded as nothing (as vLLM does): a model's
    vocabulary may be larger than its tokenizer's (padded to a round size), and it can sample those ids."""
    return tokenizer.decode([i for i in ids if 0 <= i < tokenizer.vocab_size], skip_special=skip_special)


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas that never split a multi-byte character.

    Keeps two offsets into a short id window: text before ``prefix_offset`` is already emitted and
    forgotten; ``prefix_offset..read_offset`` is emitted context that is re-decoded so tokenizers whose
    decode depends on the left neighbour (sentencepiece-style leading spaces) get it right; ids after
    ``read_offset`` are held back until they decode to text not ending in U+FFFD.
    """

    PROMPT_CONTEXT = 5  # prompt ids kept as left context for the first generated tokens
    # Past this many held ids a trailing U+FFFD is real (the model emitted invalid bytes), not a split
    # character; flushing then keeps per-token work bounded.
    MAX_HELD = 16

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | None = None,
                 skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._ids = list(prompt_ids[-self.PROMPT_CONTEXT:]) if prompt_ids else []
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return decode_in_vocab(self.tokenizer, ids, self.skip_special)

    def _advance(self, force: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        held = len(self._ids) - self._read_offset
        if len(new_text) <= len(prefix_text):
            return ""
        if new_text.endswith("\ufffd") and not force and held < self.MAX_HELD:
            return ""
        delta = new_text[len(prefix_text):]
        # Drop ids left of the new prefix so the window (and the list) stays small.
        self._ids = self._ids[self._read_offset:]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return delta

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text that became stable (possibly "")."""
        self._ids.append(token_id)
        return self._advance(force=False)

    def flush(self) -> str:
        """Return whatever is still held back (e.g. an incomplete character at end of stream)."""
        return self._advance(force=True)
