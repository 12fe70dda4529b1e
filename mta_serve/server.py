"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: GET /health, GET /v1/models, POST /v1/completions (non-streaming). Concurrent requests are batched
by the engine. Every error is OpenAI's JSON: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .async_engine import AsyncEngine, EngineDeadError
from .sampling_params import SamplingParamsError, SamplingParams

MAX_BODY_BYTES = 1 << 20


@dataclass(slots=True)
class ServedModel:
    name: str
    engine: AsyncEngine

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.model.cfg.max_seq_len


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def error_response(status: int, message: str, param: str | None = None,
                   type_: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


class CompletionRequest(BaseModel):
    # Unknown fields are ignored (clients such as benchmark tools send extras); known ones are strictly
    # typed: "3" is not an integer and true is not 1.
    model_config = ConfigDict(extra="ignore")

    model: StrictStr
    prompt: StrictStr | list[StrictInt]
    max_tokens: StrictInt = 16
    temperature: StrictFloat | StrictInt = 1.0
    top_p: StrictFloat | StrictInt = 1.0
    top_k: StrictInt = 0
    min_p: StrictFloat | StrictInt = 0.0
    seed: StrictInt | None = None
    presence_penalty: StrictFloat | StrictInt = 0.0
    frequency_penalty: StrictFloat | StrictInt = 0.0
    repetition_penalty: StrictFloat | StrictInt = 1.0
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    stream: StrictBool = False
    n: StrictInt = 1
    echo: StrictBool = False
    logprobs: StrictInt | None = None
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    user: StrictStr | None = None


# Options a client may send that this server does not implement yet: rejected, never silently ignored.
_UNSUPPORTED = {"stream": lambda v: v, "n": lambda v: v != 1, "echo": lambda v: v,
                "logprobs": lambda v: v is not None, "suffix": lambda v: v is not None,
                "best_of": lambda v: v not in (None, 1), "stop": lambda v: v not in (None, [], "")}


def _reject_unsupported(req: CompletionRequest) -> None:
    for name, unsupported in _UNSUPPORTED.items():
        if unsupported(getattr(req, name)):
            raise APIError(400, f"'{name}'={getattr(req, name)!r} is not supported by this server", param=name)


def _sampling_params(req: CompletionRequest) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
            min_p=req.min_p, seed=req.seed, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
            min_tokens=req.min_tokens, ignore_eos=req.ignore_eos)
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


def build_app(served: ServedModel) -> FastAPI:
    app = FastAPI(title="mta-serve")
    _install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not served.engine.healthy:
            return error_response(503, "the engine loop has stopped", type_="server_error")
        return JSONResponse({})

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served.name, "object": "model", "created": 0, "owned_by": "mta-serve",
                "max_model_len": served.max_model_len}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        req = await _parse(request, CompletionRequest)
        if req.model != served.name:
            raise APIError(404, f"model '{req.model}' does not exist; this server serves '{served.name}'",
                           param="model", type_="not_found_error")
        _reject_unsupported(req)
        params = _sampling_params(req)
        if not req.prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        final = None
        try:
            async for out in served.engine.generate(req.prompt, params):
                final = out
        except EngineDeadError as exc:
            raise APIError(503, str(exc), type_="server_error") from None
        except ValueError as exc:  # the engine rejected the request
            raise APIError(400, str(exc), param="prompt") from None
        return JSONResponse(_completion_body(served.name, final))

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), type_=type_)

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")


async def _parse(request: Request, schema: type[BaseModel]) -> Any:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
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


def _completion_body(model_name: str, out) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}],
        "usage": {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": len(out.token_ids),
                  "total_tokens": len(out.prompt_token_ids) + len(out.token_ids)},
    }
