"""The HTTP layer: an OpenAI-compatible FastAPI app over an :class:`Engine`.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /v1/conversations/{id}``, ``GET /health``. See ``docs/serve.md``.

Every error is OpenAI's JSON ``{"error": {"message", "type", "param", "code"}}``:
validation errors are 400 naming the field, an unknown model 404, typed megacontext
input errors 400, anything unexpected 500 with the exception's one-line message (the
traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, InputError, MegaContextError
from .engine import Engine, Turn, TurnRequest
from .protocol import (
    CONVERSATION_HEADER,
    ApiError,
    ChatCompletionRequest,
    chunk_body,
    completion_body,
    param_of,
    sse,
    validate_conversation_id,
)

__all__ = ["create_app"]

log = logging.getLogger("megacontext.serve")


def _error_response(exc: ApiError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _as_api_error(exc: BaseException) -> ApiError:
    """Any exception as the error the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (InputError, ConfigError)):
        field = getattr(exc, "field", None)
        return ApiError(400, str(exc), param=field)
    if isinstance(exc, MegaContextError):
        return ApiError(500, f"{type(exc).__name__}: {exc}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return ApiError(500, f"internal error: {type(exc).__name__}: {first}".rstrip(": "))


def _validation_error(exc: RequestValidationError) -> ApiError:
    errors = exc.errors()
    if not errors:
        return ApiError(400, "invalid request")
    err = errors[0]
    kind = err.get("type", "")
    if kind == "json_invalid":
        where = err.get("ctx", {}).get("error", "")
        return ApiError(
            400,
            f"the request body is not valid JSON ({where or err.get('msg', '')}) at "
            f"character {err['loc'][-1] if len(err['loc']) > 1 else 0}",
            code="invalid_json",
        )
    param = param_of(err.get("loc", ()))
    if param is None:
        return ApiError(400, f"the request body: {err.get('msg', 'invalid')}", code=kind)
    msg = err.get("msg", "invalid value")
    if kind == "missing":
        return ApiError(400, f"{param}: a required field is missing", param=param, code=kind)
    shown = repr(err.get("input"))
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ApiError(400, f"{param}: {msg} (got {shown})", param=param, code=kind)


def _sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """A turn's event sink: the engine's threads hand events to the request's loop."""

    def put(kind: str, payload: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

    return put


def create_app(engine: Engine, model_id: str | None = None) -> FastAPI:
    """The app serving ``engine``'s model as ``model_id`` (default: its base's name).
    Closing the app (lifespan shutdown) closes the engine."""
    model_id = model_id or engine.base.name
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close)

    app = FastAPI(
        title="megacontext",
        description="OpenAI-compatible chat completions with per-conversation memory.",
        lifespan=lifespan,
    )
    app.state.engine = engine

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(ApiError)
    async def _on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _on_any(_request: Request, exc: Exception) -> JSONResponse:
        err = _as_api_error(exc)
        if err.status >= 500:
            log.error("request failed", exc_info=exc)
        return _error_response(err)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "megacontext"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        if name != model_id:
            raise ApiError(
                404,
                f"model {name!r} does not exist; this server serves {model_id!r}",
                param="model",
                code="model_not_found",
            )
        return model_card()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return engine.health()

    @app.get("/v1/conversations/{conv_id}")
    async def get_conversation(conv_id: str) -> dict[str, Any]:
        validate_conversation_id(conv_id, "conversation_id")
        info = await asyncio.to_thread(engine.describe, conv_id)
        if info is None:
            raise ApiError(
                404,
                f"conversation {conv_id!r} does not exist",
                param="conversation_id",
                code="conversation_not_found",
            )
        return info

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model != model_id:
            raise ApiError(
                404,
                f"model {body.model!r} does not exist; this server serves {model_id!r}",
                param="model",
                code="model_not_found",
            )
        if body.n not in (None, 1):
            raise ApiError(400, f"n: only n=1 is supported, got {body.n}", param="n")
        if body.tools:
            raise ApiError(400, "tools: tool calls are not supported", param="tools")
        if body.logprobs:
            raise ApiError(400, "logprobs: not supported", param="logprobs")
        limits = engine.limits
        if None not in (body.max_tokens, body.max_completion_tokens) and (
            body.max_tokens != body.max_completion_tokens
        ):
            raise ApiError(
                400, "max_tokens and max_completion_tokens disagree; give one", param="max_tokens"
            )
        asked = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        if asked is not None and asked > limits.max_tokens:
            raise ApiError(
                400,
                f"{param}: {asked} is more than this server allows (--max-tokens "
                f"{limits.max_tokens})",
                param=param,
                code="max_tokens_exceeded",
            )
        conv_id = _conversation_id(request, body)
        turn_request = TurnRequest(
            messages=[m.plain() for m in body.messages],
            max_tokens=asked or limits.default_max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=body.stop,
            seed=body.seed,
            stream=body.stream,
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        turn = engine.submit(conv_id, turn_request, _sink(loop, events))
        headers = {CONVERSATION_HEADER: conv_id}
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": model_id,
            "conversation_id": conv_id,
        }
        try:
            kind, payload = await events.get()
        except asyncio.CancelledError:
            turn.cancel()
            raise
        if kind == "error":
            return _error_response(_as_api_error(payload), headers)
        assert kind == "started"
        prompt_tokens = payload["prompt_tokens"]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(turn, events, meta, prompt_tokens, include_usage),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache"},
            )
        try:
            while True:
                kind, payload = await events.get()
                if kind == "done":
                    break
                if kind == "error":
                    return _error_response(_as_api_error(payload), headers)
        except asyncio.CancelledError:
            turn.cancel()
            raise
        return JSONResponse(
            completion_body(
                **meta,
                text=payload["text"],
                finish_reason=payload["finish_reason"],
                usage=_usage(payload),
                memory=payload["memory"],
            ),
            headers=headers,
        )

    return app


def _usage(done: dict[str, Any]) -> dict[str, int]:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _conversation_id(request: Request, body: ChatCompletionRequest) -> str:
    """The header ``X-Conversation-Id`` or the body's ``conversation_id`` (the same
    when both are given); a new id when neither is."""
    header = request.headers.get(CONVERSATION_HEADER)
    if header is not None:
        validate_conversation_id(header, CONVERSATION_HEADER)
    if body.conversation_id is not None:
        validate_conversation_id(body.conversation_id, "conversation_id")
    if header is not None and body.conversation_id is not None and header != body.conversation_id:
        raise ApiError(
            400,
            f"conversation_id {body.conversation_id!r} and the {CONVERSATION_HEADER} header "
            f"{header!r} disagree",
            param="conversation_id",
        )
    return header or body.conversation_id or f"conv-{uuid.uuid4().hex}"


async def _stream(
    turn: Turn,
    events: asyncio.Queue,
    meta: dict[str, Any],
    prompt_tokens: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The turn as ``chat.completion.chunk`` events, then ``data: [DONE]``. The
    finish chunk is sent once the turn is saved; a client that goes away cancels
    the turn."""
    finished = False
    try:
        yield sse(chunk_body(**meta, delta={"role": "assistant", "content": ""}))
        sent = ""
        while True:
            kind, payload = await events.get()
            if kind == "delta":
                sent += payload
                yield sse(chunk_body(**meta, delta={"content": payload}))
            elif kind == "done":
                finished = True
                text = payload["text"]
                if len(text) > len(sent) and text.startswith(sent):
                    yield sse(chunk_body(**meta, delta={"content": text[len(sent) :]}))
                yield sse(chunk_body(**meta, delta={}, finish_reason=payload["finish_reason"]))
                if include_usage:
                    yield sse(chunk_body(**meta, delta=None, usage=_usage(payload)))
                yield sse("[DONE]")
                return
            else:
                finished = True
                yield sse(_as_api_error(payload).body())
                yield sse("[DONE]")
                return
    finally:
        if not finished:
            turn.cancel()
