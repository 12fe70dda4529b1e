"""OpenAI-compatible HTTP server (FastAPI + uvicorn).

Endpoints: GET /health, GET /v1/models, POST /v1/completions (non-streaming). Requests are served one at a
time by the recompute generator (mta_serve.generate). Every error is OpenAI's JSON:
{"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from .generate import GenerationParams, generate
from .model import MTATransformer

MAX_BODY_BYTES = 1 << 20


@dataclass(slots=True)
class ServedModel:
    name: str
    model: MTATransformer
    tokenizer: Any


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def error_response(status: int, message: str, param: str | None = None,
                   type_: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


class CompletionRequest(BaseModel):
    # Unknown fields are ignored: clients such as benchmark tools send extras.
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | list[int]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stream: bool = False
    n: int = 1
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    stop: str | list[str] | None = None


# Options a client may send that this server does not implement yet: rejected, never silently ignored.
_UNSUPPORTED = {"stream": True, "n": lambda v: v != 1, "echo": True, "logprobs": lambda v: v is not None,
                "suffix": lambda v: v is not None, "best_of": lambda v: v not in (None, 1),
                "stop": lambda v: v not in (None, [], "")}


def _reject_unsupported(req: CompletionRequest) -> None:
    for name, bad in _UNSUPPORTED.items():
        value = getattr(req, name)
        if (bad(value) if callable(bad) else value == bad):
            raise APIError(400, f"'{name}'={value!r} is not supported by this server", param=name)


def _prompt_ids(req: CompletionRequest, served: ServedModel, max_len: int) -> list[int]:
    tok = served.tokenizer
    if isinstance(req.prompt, str):
        if not req.prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        try:
            ids = tok.encode(req.prompt, add_bos=True)
        except ValueError as exc:
            raise APIError(400, f"prompt cannot be tokenized: {exc}", param="prompt") from None
    else:
        if not req.prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        bad = [t for t in req.prompt if not 0 <= t < served.model.cfg.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {served.model.cfg.vocab_size})",
                           param="prompt")
        ids = list(req.prompt)
    if len(ids) + req.max_tokens > max_len:
        raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) = "
                            f"{len(ids) + req.max_tokens} exceeds the context length {max_len}", param="prompt")
    return ids


def build_app(served: ServedModel) -> FastAPI:
    app = FastAPI(title="mta-serve")
    lock = threading.Lock()  # the model serves one request at a time
    max_len = served.model.cfg.max_seq_len

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.type)

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served.name, "object": "model", "created": 0, "owned_by": "mta-serve",
                "max_model_len": max_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        req = await _parse(request, CompletionRequest)
        if req.model != served.name:
            raise APIError(404, f"model '{req.model}' does not exist; this server serves '{served.name}'",
                           param="model", type_="not_found_error")
        _reject_unsupported(req)
        try:
            params = GenerationParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                      seed=req.seed, ignore_eos=req.ignore_eos)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        ids = _prompt_ids(req, served, max_len)
        out, finish = await asyncio.to_thread(_locked_generate, lock, served, ids, params)
        return JSONResponse(_completion_body(served, ids, out, finish))

    return app


def _locked_generate(lock: threading.Lock, served: ServedModel, ids: list[int], params: GenerationParams):
    with lock:
        return generate(served.model, ids, params, served.tokenizer.eos_id)


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"invalid '{param}': {first['msg']}", param=param) from None


def _completion_body(served: ServedModel, prompt_ids: list[int], out: list[int], finish: str) -> dict:
    text = served.tokenizer.decode(out)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": served.name,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(out),
                  "total_tokens": len(prompt_ids) + len(out)},
    }
