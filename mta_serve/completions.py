"""Completions and chat completions: API requests -> engine requests, engine outputs -> OpenAI JSON.

A request with several prompts and `n` choices becomes len(prompts) x n engine requests; choice index
= prompt index x n + i. With a seed, choice i samples with seed + i (so choices differ but reproduce).
"""
from __future__ import annotations

import asyncio
import datetime
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .engine import RequestOutput
from .protocol import ChatCompletionRequest, CompletionRequest
from .request import TokenLogprob
from .sampling_params import SEED_LIMIT, SamplingParams, valid_seed
from .tokenizer import IncrementalDetokenizer, decode_in_vocab

# Used when the tokenizer has no chat template: one "role: content" line per message, then the cue.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
LOGPROB_FLOOR = -9999.0  # JSON has no -inf


@dataclass(slots=True)
class Job:
    """One engine request of an API request."""

    index: int  # choice index
    prompt_ids: list[int]
    prompt_text: str
    params: SamplingParams


class ParamError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# ---- requests -> jobs ------------------------------------------------------------------------------------

def sampling_params(req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                    seed: int | None) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            bias[int(key)] = value
        except ValueError:
            raise ParamError("logit_bias", f"logit_bias key {key!r} is not a token id") from None
    return SamplingParams(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        seed=seed, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, logit_bias=bias, min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos, stop=stop, stop_token_ids=req.stop_token_ids,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def completion_prompts(req: CompletionRequest, tokenizer) -> list[tuple[list[int], str]]:
    """Every prompt of a completion request as (token ids, text)."""
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ParamError("prompt", "prompt is empty")
    out = []
    for p in prompt:
        if isinstance(p, str):
            if not p:
                raise ParamError("prompt", "prompt is empty")
            out.append((tokenizer.encode(p, add_bos=True), p))
        else:
            if not p:
                raise ParamError("prompt", "prompt is empty")
            out.append((list(p), None))
    return out


def _check_common(req) -> None:
    if req.stream_options is not None and not req.stream:
        raise ParamError("stream_options", "stream_options is only allowed with stream=true")
    if req.seed is not None and not valid_seed(req.seed):
        raise ParamError("seed", f"invalid seed={req.seed}: allowed an integer in [0, 2^63)")


def completion_jobs(req: CompletionRequest, tokenizer, max_model_len: int) -> list[Job]:
    _check_common(req)
    if req.logprobs is not None and not 0 <= req.logprobs <= 20:
        raise ParamError("logprobs", f"logprobs={req.logprobs} is out of range: allowed 0..20")
    jobs = []
    for p, (ids, text) in enumerate(completion_prompts(req, tokenizer)):
        if text is None:
            text = _safe_decode(tokenizer, ids)
        max_tokens = _room(len(ids), max_model_len, "prompt") if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and req.echo:
            max_tokens = 1  # echo with max_tokens 0 returns the prompt only; one token is computed and dropped
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        for i in range(req.n):
            seed = _choice_seed(req.seed, i)
            params = sampling_params(req, max_tokens, req.logprobs, prompt_logprobs, seed)
            jobs.append(Job(p * req.n + i, ids, text, params))
    return jobs


def render_chat(req: ChatCompletionRequest, tokenizer) -> tuple[list[int], bool]:
    """Apply the tokenizer's chat template (or DEFAULT_CHAT_TEMPLATE) -> (prompt ids, used own template)."""
    template = getattr(tokenizer, "chat_template", None)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = _chat_environment().from_string(template or DEFAULT_CHAT_TEMPLATE).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True,
            bos_token=_special_text(tokenizer, "bos_id"), eos_token=_special_text(tokenizer, "eos_id"))
    except jinja2.TemplateError as exc:
        raise ParamError("messages", f"the chat template cannot render these messages: {exc}") from None
    try:  # a model's own template writes BOS as text itself; the default one does not
        return tokenizer.encode(text, add_bos=template is None), template is not None
    except ValueError as exc:
        how = ("its chat template" if template
               else "the default chat template ('role: content' lines, then 'assistant:')")
        raise ParamError("messages", f"the chat prompt rendered with {how} cannot be tokenized: {exc}") from None


class _GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}, which Hugging Face's templates use to mark the assistant's
    tokens for training masks: here it renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.cache
def _chat_environment() -> jinja2.Environment:
    """Jinja as Hugging Face's apply_chat_template sets it up, so a model's template renders the prompt it
    was trained on: a sandbox, block tags taking their line's whitespace and newline (trim_blocks,
    lstrip_blocks), undefined names falsy (templates test `tools`, `message.tool_calls`), break/continue,
    raise_exception, strftime_now, {% generation %}, and a tojson that leaves <, > and & alone."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", _GenerationTag])

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    return env


def chat_jobs(req: ChatCompletionRequest, tokenizer, max_model_len: int) -> list[Job]:
    _check_common(req)
    if req.top_logprobs is not None and not (req.logprobs and 0 <= req.top_logprobs <= 20):
        raise ParamError("top_logprobs", "top_logprobs needs logprobs=true and a value in 0..20")
    ids, _ = render_chat(req, tokenizer)
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = _room(len(ids), max_model_len, "messages") if limit is None else limit
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return [Job(i, ids, "", sampling_params(req, max_tokens, logprobs, None, _choice_seed(req.seed, i)))
            for i in range(req.n)]


def _room(num_prompt_tokens: int, max_model_len: int, param: str) -> int:
    """max_tokens when the client leaves it open: the rest of the context."""
    if num_prompt_tokens >= max_model_len:
        raise ParamError(param, f"the prompt ({num_prompt_tokens} tokens) leaves no room to generate within the "
                                f"context length {max_model_len}")
    return max_model_len - num_prompt_tokens


def _choice_seed(seed: int | None, choice: int) -> int | None:
    return None if seed is None else (seed + choice) % SEED_LIMIT


def _special_text(tokenizer, attr: str) -> str:
    token_id = getattr(tokenizer, attr, None)
    return "" if token_id is None else tokenizer.decode([token_id], skip_special=False)


def _safe_decode(tokenizer, ids: list[int], skip_special: bool = True) -> str:
    try:
        return decode_in_vocab(tokenizer, ids, skip_special)
    except ValueError:
        return ""


# ---- running several engine requests as one ----------------------------------------------------------------

async def merge(streams: list) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several engine requests (RequestStreams) as they come: (stream index,
    output). Closing the merged iterator (a disconnect) closes every stream, which aborts its request."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as exc:  # delivered in order, re-raised to the consumer
            await queue.put((i, exc))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            stream.close()


# ---- engine outputs -> OpenAI JSON ------------------------------------------------------------------------

def _token_bytes(tokenizer, token_id: int) -> bytes:
    """The token's bytes: its own where the tokenizer has them (token_bytes), else its decoded text's (none
    for an id past the tokenizer's vocabulary: a model's may be larger)."""
    if hasattr(tokenizer, "token_bytes"):
        try:
            return tokenizer.token_bytes(token_id)
        except ValueError:
            return b""
    return _safe_decode(tokenizer, [token_id], skip_special=False).encode("utf-8")


def _token_str(raw: bytes) -> str:
    """A token's text; as OpenAI writes it, "bytes:\\xNN..." for bytes that are not whole characters (so
    tokens holding different parts of characters stay apart)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class TextOffsets:
    """Where each token's text starts in a returned text (OpenAI's text_offset), token by token, so streamed
    and whole responses agree. It decodes as the engine does (an IncrementalDetokenizer with the prompt's
    last ids as context), so offsets are characters of that text. Tokens held back as part of a character
    start where the character does; when held tokens turn out not to form one (invalid bytes), the token
    that releases them starts at its own text, at the end of what they release."""

    def __init__(self, tokenizer, context_ids: list[int] | None, offset: int):
        self._tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer, context_ids)
        self._offset = offset  # characters emitted so far
        self._holding = False

    def starts(self, ids: list[int]) -> list[int]:
        starts = []
        for token_id in ids:
            delta = self._detokenizer.push(token_id)
            own = len(_safe_decode(self._tokenizer, [token_id])) if delta and self._holding else len(delta)
            starts.append(self._offset + max(0, len(delta) - own))
            self._offset += len(delta)
            self._holding = not delta
        return starts


def completion_logprobs(tokenizer, records: list[TokenLogprob | None], ids: list[int], starts: list[int]) -> dict:
    """OpenAI's completion logprobs for `ids` (records[i] None = no logprob, e.g. the first prompt token);
    `starts`: their text offsets (TextOffsets)."""
    tokens, token_logprobs, top_logprobs = [], [], []
    for token_id, record in zip(ids, records):
        tokens.append(_token_str(_token_bytes(tokenizer, token_id)))
        if record is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_lp(record.logprob))
        top: dict[str, float] = {}
        for t, v in [(token_id, record.logprob), *record.top.items()]:
            key = _token_str(_token_bytes(tokenizer, t))
            top[key] = max(top.get(key, LOGPROB_FLOOR), _lp(v))  # tokens written alike: keep the likeliest
        top_logprobs.append(dict(sorted(top.items(), key=lambda kv: -kv[1])))
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": starts}


def chat_logprobs(tokenizer, records: list[TokenLogprob]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        raw = _token_bytes(tokenizer, token_id)
        return {"token": _token_str(raw), "logprob": _lp(logprob), "bytes": list(raw)}

    content = [{**entry(r.token_id, r.logprob), "top_logprobs": [entry(t, v) for t, v in r.top.items()]}
               for r in records]
    return {"content": content}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
