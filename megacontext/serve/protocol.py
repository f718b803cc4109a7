"""The OpenAI chat-completions wire format: requests, errors, responses, stream chunks.

Only pydantic is needed here (no web framework), so the engine and the tests can use
these shapes without FastAPI.

Errors follow OpenAI's body ``{"error": {"message", "type", "param", "code"}}``:
``param`` names the request field (``"max_tokens"``, ``"messages[2].content"``,
``"conversation_id"``) or is ``None`` when no field is at fault.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CONVERSATION_HEADER",
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "completion_body",
    "chunk_body",
    "error_body",
    "param_of",
    "sse",
    "validate_conversation_id",
]

# The request header that names a conversation (the body field is ``conversation_id``).
CONVERSATION_HEADER = "X-Conversation-Id"
_CONVERSATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# OpenAI accepts at most four stop sequences.
MAX_STOP = 4


class ApiError(Exception):
    """An error the client caused (4xx) or the server met (5xx), in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        if type is None:
            type = "invalid_request_error" if status < 500 else "server_error"
        self.type = type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def param_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """A pydantic error location as a request field: ``("body", "messages", 2,
    "content")`` -> ``"messages[2].content"``; ``None`` for the body as a whole."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "header", "path"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or None


def validate_conversation_id(value: str, param: str) -> str:
    """``value`` if it is a usable conversation id (it names a directory: 1-128 of
    ``[A-Za-z0-9._-]``, starting with a letter or digit), else a 400 naming ``param``."""
    if not _CONVERSATION_ID.fullmatch(value):
        raise ApiError(
            400,
            f"{param}: {value[:64]!r} is not a conversation id (1-128 characters of "
            "A-Z a-z 0-9 . _ -, starting with a letter or digit)",
            param=param,
            code="invalid_conversation_id",
        )
    return value


class ChatMessage(BaseModel):
    """One message. ``content`` is text or a list of ``{"type": "text", "text": ...}``
    parts (joined); ``developer`` is read as ``system``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Any = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, v: Any) -> str:
        if isinstance(v, str):
            return v
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if not isinstance(part, dict) or part.get("type") != "text":
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"part {i} is {kind!r}; only text parts are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"part {i} has no 'text' string")
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")

    def plain(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``. Fields OpenAI defines that change nothing here
    (``user``, ``metadata``, ...) are ignored; those this server cannot honour
    (``n`` > 1, tools, logprobs) are refused by the endpoint."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Any = Field(None, validate_default=True)
    seed: int | None = None
    n: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    conversation_id: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> list[str]:
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        return stops


def completion_body(
    *,
    id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    usage: dict[str, int],
    conversation_id: str,
    memory: dict[str, Any],
) -> dict[str, Any]:
    """A ``chat.completion`` object, plus ``conversation_id`` and ``megacontext``
    (the conversation's memory after the turn)."""
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": usage,
        "conversation_id": conversation_id,
        "megacontext": memory,
    }


def chunk_body(
    *,
    id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    conversation_id: str,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` makes the usage-only chunk
    (``choices: []``) that ``stream_options.include_usage`` asks for."""
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": (
            []
            if delta is None
            else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        ),
        "conversation_id": conversation_id,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def now() -> int:
    return int(time.time())
