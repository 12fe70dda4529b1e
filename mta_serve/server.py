"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Routes: POST /v1/completions, POST /v1/chat/completions (both streaming or not), GET /v1/models (and
/v1/models/{id}), GET /health, GET /metrics, POST /tokenize, POST /detokenize, GET /tokenizer_info. Every
error is OpenAI's JSON:
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncEngine, EngineDeadError, RequestStream, ShuttingDownError
from .completions import (Job, ParamError, TextOffsets, chat_jobs, chat_logprobs, completion_jobs, completion_logprobs,
                          merge, new_id, now)
from .engine import RequestOutput
from .protocol import (UNSUPPORTED, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       TokenizeRequest)
from .sampling_params import SamplingParamsError

MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1
_PROTECTED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")


@dataclass(slots=True)
class ServedModel:
    name: str
    engine: AsyncEngine
    api_key: str | None = None

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.model.cfg.max_seq_len


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.headers = status, message, param, type_, headers


def error_body(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    # a message may quote the client's text, and a lone surrogate (valid in JSON's \ud800) cannot be UTF-8
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, type_), status_code=status, headers=headers)


def build_app(served: ServedModel) -> FastAPI:
    app = FastAPI(title="mta-serve")
    _install_error_handlers(app)
    _install_auth(app, served.api_key)
    _add_info_routes(app, served)
    _add_tokenizer_routes(app, served)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, served, CompletionRequest, completion_jobs, _completion_stream,
                               _completion_body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, served, ChatCompletionRequest, chat_jobs, _chat_stream, _chat_body)

    return app


async def _generate(request: Request, served: ServedModel, schema, make_jobs, stream, body) -> Response:
    """admit -> parse -> engine requests -> an SSE stream or one JSON body."""
    async with _admission(served):
        req = await _parse_generation(request, served, schema)
        prompt_param = "messages" if schema is ChatCompletionRequest else "prompt"
        jobs = _jobs(lambda: make_jobs(req, served.tokenizer, served.max_model_len), served, prompt_param)
        _check_queue_room(served.engine, len(jobs), "n" if req.n > 1 else prompt_param)
        streams = _submit(served, jobs)
    if req.stream:
        return _sse(stream(served, req, jobs, streams), streams)
    finals = await _collect(streams, request)
    return JSONResponse(body(served, req, jobs, finals))


# ---- plumbing -------------------------------------------------------------------------------------------

def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.type, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_=type_)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")


def _install_auth(app: FastAPI, api_key: str | None) -> None:
    if api_key is not None:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)


class _APIKeyMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware, which hides client disconnects from the handlers)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(_PROTECTED):
            if dict(scope["headers"]).get(b"authorization") != self.expected:
                response = error_response(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                          type_="authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def _admission(served: ServedModel):
    """Turn away overload before parsing or tokenizing; hold a queue slot until the request is submitted."""
    engine = served.engine
    if not engine.healthy:
        raise APIError(503, "the engine loop has stopped", type_="server_error")
    if engine.queue_full():
        raise APIError(429, f"the server is at its queue limit ({engine.max_queued} waiting requests); "
                            "retry later", type_="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})
    engine.num_reserved += 1
    try:
        yield
    finally:
        engine.num_reserved -= 1


def _check_queue_room(engine, num_jobs: int, param: str) -> None:
    """The queue limit counts engine requests (prompts x n), not HTTP requests; admission held one slot. A
    request larger than the whole limit runs only when nothing else waits (so a large batch still runs on an
    idle server, but never waits behind or ahead of others past the limit)."""
    room = engine.queue_room()
    if room is None or num_jobs <= room + 1 or room + 1 == engine.max_queued:
        return
    raise APIError(429, f"the server's queue has room for {room + 1} of this request's {num_jobs} sequences "
                        f"(prompts x n; limit {engine.max_queued}); retry later", param=param,
                   type_="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)})


async def _parse_generation(request: Request, served: ServedModel, schema: type[BaseModel]) -> Any:
    """Parse a generation request and check its model and options."""
    req = await _parse(request, schema)
    if req.model != served.name:
        raise APIError(404, f"model '{req.model}' does not exist; this server serves '{served.name}'",
                       param="model", type_="not_found_error")
    for name, unsupported in UNSUPPORTED.items():
        if name in type(req).model_fields and unsupported(getattr(req, name)):
            raise APIError(400, f"'{name}'={getattr(req, name)!r} is not supported by this server", param=name)
    return req


def _jobs(make, served: ServedModel, prompt_param: str) -> list[Job]:
    """Build the engine requests, turning every validation failure into a 400 that names the parameter (the
    engine's own checks of the prompt name `prompt_param`: the field the prompt came from)."""
    try:
        jobs = make()
        for job in jobs:
            served.engine.engine.validate(job.prompt_ids, job.params)
    except (ParamError, SamplingParamsError) as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    except ValueError as exc:  # RequestError (lengths, ids), tokenizer errors
        raise APIError(400, str(exc), param=prompt_param) from None
    return jobs


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed the limit (never buffered past it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    body = await _read_body(request)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = str(first["loc"][0]) if first["loc"] else None
        raise APIError(400, f"invalid '{param}': {first['msg']}", param=param) from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _submit(served: ServedModel, jobs: list[Job]) -> list[RequestStream]:
    try:
        return [served.engine.generate(job.prompt_ids, job.params) for job in jobs]
    except EngineDeadError as exc:
        raise APIError(503, str(exc), type_="server_error") from None


async def _collect(streams: list[RequestStream], request: Request) -> dict[int, RequestOutput]:
    """Run the engine requests to completion; a client that disconnects meanwhile aborts them all."""
    finals: dict[int, RequestOutput] = {}
    merged = merge(streams)

    async def consume() -> None:
        async for i, out in merged:
            if out.finished:
                finals[i] = out

    task = asyncio.create_task(consume())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                raise APIError(499, "client disconnected")
        task.result()
    except EngineDeadError as exc:
        raise APIError(503 if isinstance(exc, ShuttingDownError) else 500, str(exc), type_="server_error") from None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await merged.aclose()
        _close(streams)
    return finals


def _close(streams: list[RequestStream]) -> None:
    """Abort whatever has not finished; harmless for finished streams."""
    for stream in streams:
        stream.close()


def _sse(events: AsyncIterator[dict], streams: list[RequestStream]) -> StreamingResponse:
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except (EngineDeadError, ValueError) as exc:  # after the 200: an error event, then [DONE]
            status = 503 if isinstance(exc, ShuttingDownError) else 500
            yield f"data: {json.dumps(error_body(status, str(exc), type_='server_error'))}\n\n"
        finally:
            _close(streams)
        yield "data: [DONE]\n\n"

    # The background task also runs when the body never started (the client left at once).
    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(_close, streams))


def _usage(jobs: list[Job], n: int, finals: dict[int, RequestOutput], echo_only: bool = False) -> dict:
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs[::n])
    completion_tokens = 0 if echo_only else sum(len(out.token_ids) for out in finals.values())
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ---- completions ----------------------------------------------------------------------------------------

def _echo_only(req: CompletionRequest) -> bool:
    return req.echo and req.max_tokens == 0


def _completion_choice(served: ServedModel, req: CompletionRequest, job: Job, out: RequestOutput) -> dict:
    echo_only = _echo_only(req)
    text = (job.prompt_text if req.echo else "") + ("" if echo_only else out.text)
    logprobs = None
    if req.logprobs is not None:
        records, ids, starts = [], [], []
        if req.echo:
            records, ids = list(out.prompt_logprobs or []), list(job.prompt_ids)
            starts = TextOffsets(served.tokenizer, None, 0).starts(ids)
        if not echo_only:
            records += out.logprobs
            ids += out.token_ids
            starts += _generated_offsets(served, req, job).starts(out.token_ids)
        logprobs = completion_logprobs(served.tokenizer, records, ids, starts)
    return {"index": job.index, "text": text, "logprobs": logprobs,
            "finish_reason": "length" if echo_only else out.finish_reason}


def _generated_offsets(served, req: CompletionRequest, job: Job) -> TextOffsets:
    """The text offsets of a choice's generated tokens: after the echoed prompt, decoded with its ids as
    context, as the engine decodes them."""
    return TextOffsets(served.tokenizer, job.prompt_ids, len(job.prompt_text) if req.echo else 0)


def _completion_body(served, req: CompletionRequest, jobs: list[Job], finals: dict[int, RequestOutput]) -> dict:
    choices = [_completion_choice(served, req, jobs[i], finals[i]) for i in range(len(jobs))]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": served.name,
            "choices": choices, "usage": _usage(jobs, req.n, finals, _echo_only(req))}


async def _completion_stream(served, req: CompletionRequest, jobs: list[Job],
                             streams: list[RequestStream]) -> AsyncIterator[dict]:
    head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": served.name}
    finals: dict[int, RequestOutput] = {}
    offsets: dict[int, TextOffsets] = {}  # each choice's, for text_offset
    echoed: set[int] = set()
    echo_only = _echo_only(req)
    async for i, out in merge(streams):
        job = jobs[i]
        if req.echo and i not in echoed:  # the prompt first, with its logprobs (computed by now)
            echoed.add(i)
            yield {**head, "choices": [_echo_choice(served, req, job, out)]}
        text = "" if echo_only else out.new_text
        logprobs = None
        if req.logprobs is not None and not echo_only:
            records = out.logprobs[len(out.logprobs) - len(out.new_token_ids):]
            if i not in offsets:
                offsets[i] = _generated_offsets(served, req, job)
            logprobs = completion_logprobs(served.tokenizer, records, out.new_token_ids,
                                           offsets[i].starts(out.new_token_ids))
        finish = ("length" if echo_only else out.finish_reason) if out.finished else None
        if out.finished:
            finals[i] = out
        if text or finish or logprobs:
            yield {**head, "choices": [{"index": job.index, "text": text, "logprobs": logprobs,
                                        "finish_reason": finish}]}
    if req.stream_options and req.stream_options.include_usage:
        yield {**head, "choices": [], "usage": _usage(jobs, req.n, finals, echo_only)}


def _echo_choice(served, req: CompletionRequest, job: Job, out: RequestOutput) -> dict:
    logprobs = None
    if req.logprobs is not None:
        starts = TextOffsets(served.tokenizer, None, 0).starts(job.prompt_ids)
        logprobs = completion_logprobs(served.tokenizer, out.prompt_logprobs, job.prompt_ids, starts)
    return {"index": job.index, "text": job.prompt_text, "logprobs": logprobs, "finish_reason": None}


# ---- chat completions -----------------------------------------------------------------------------------

def _chat_body(served, req: ChatCompletionRequest, jobs: list[Job], finals: dict[int, RequestOutput]) -> dict:
    choices = []
    for i, job in enumerate(jobs):
        out = finals[i]
        logprobs = chat_logprobs(served.tokenizer, out.logprobs) if req.logprobs else None
        choices.append({"index": job.index, "message": {"role": "assistant", "content": out.text},
                        "logprobs": logprobs, "finish_reason": out.finish_reason})
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": served.name,
            "choices": choices, "usage": _usage(jobs, req.n, finals)}


async def _chat_stream(served, req: ChatCompletionRequest, jobs: list[Job],
                       streams: list[RequestStream]) -> AsyncIterator[dict]:
    head = {"id": new_id("chatcmpl"), "object": "chat.completion.chunk", "created": now(), "model": served.name}

    def chunk(index: int, delta: dict, logprobs=None, finish=None) -> dict:
        return {**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    for job in jobs:
        yield chunk(job.index, {"role": "assistant", "content": ""})
    finals: dict[int, RequestOutput] = {}
    async for i, out in merge(streams):
        if out.new_text or (req.logprobs and out.new_token_ids):
            logprobs = None
            if req.logprobs:
                logprobs = chat_logprobs(served.tokenizer, out.logprobs[len(out.logprobs) - len(out.new_token_ids):])
            yield chunk(jobs[i].index, {"content": out.new_text}, logprobs)
        if out.finished:
            finals[i] = out
            yield chunk(jobs[i].index, {}, finish=out.finish_reason)
    if req.stream_options and req.stream_options.include_usage:
        yield {**head, "choices": [], "usage": _usage(jobs, req.n, finals)}


# ---- info and tokenizer routes ------------------------------------------------------------------------

def _add_info_routes(app: FastAPI, served: ServedModel) -> None:
    @app.get("/health")
    async def health() -> JSONResponse:
        if not served.engine.healthy:
            return error_response(503, "the engine loop has stopped", type_="server_error")
        return JSONResponse({})

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": 0, "owned_by": "mta-serve",
                "max_model_len": served.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        if model != served.name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{served.name}'",
                           param="model", type_="not_found_error")
        return model_card()

    @app.get("/metrics")
    async def metrics() -> Response:
        if served.engine.metrics is None:
            raise APIError(404, "metrics are disabled", type_="not_found_error")
        return Response(served.engine.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _special_texts(tokenizer) -> dict[str, int]:
    out = {}
    for attr in ("bos_id", "eos_id"):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            out[tokenizer.decode([token_id], skip_special=False)] = token_id
    return out


def _add_tokenizer_routes(app: FastAPI, served: ServedModel) -> None:
    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        req = await _parse(request, TokenizeRequest)
        specials = _special_texts(served.tokenizer)
        if req.prompt in specials:  # a special token's own text (how clients look up BOS/EOS ids)
            tokens = [specials[req.prompt]]
        else:
            try:
                tokens = served.tokenizer.encode(req.prompt, add_bos=req.add_special_tokens)
            except ValueError as exc:
                raise APIError(400, f"prompt cannot be tokenized: {exc}", param="prompt") from None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": served.max_model_len, "token_strs": None}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        req = await _parse(request, DetokenizeRequest)
        vocab = served.engine.engine.model.cfg.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab})", param="tokens")
        try:
            return {"prompt": served.tokenizer.decode(req.tokens)}
        except ValueError as exc:
            raise APIError(400, str(exc), param="tokens") from None

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        tok = served.tokenizer
        texts = {v: k for k, v in _special_texts(tok).items()}
        eos = texts.get(getattr(tok, "eos_id", None))
        return {"tokenizer_class": tok.kind, "bos_token": texts.get(getattr(tok, "bos_id", None)),
                "eos_token": eos, "pad_token": eos, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": served.max_model_len, "vocab_size": tok.vocab_size}
