"""What the server accepts and how it refuses: OpenAI's chat completion request as pydantic
models (strict: a field not listed is a 400, "0.7" is not a number), the conversation the
messages spell (checked as LIMA's data is), and OpenAI's error object.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from lima_core.data.formats import Conversation
from lima_core.inference.sampling import LIMA


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request that lima-core serves; any other is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    messages: list[Message]
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] = LIMA.temperature
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = LIMA.top_p
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] = LIMA.repetition_penalty
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None  # OpenAI's end-user id: accepted, unused

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """A field sent as null means the default, as in OpenAI's API."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class RequestError(Exception):
    """A request the server refuses: OpenAI's error object with this status."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(status: int, message: str, param=None, code=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def conversation_of(messages: list[Message]) -> Conversation:
    """The conversation the messages spell, checked as LIMA's data is: an optional first system
    turn, then user and assistant turns alternating, the user's first and last."""
    if not messages:
        raise RequestError("messages must not be empty: give at least one user message", "messages")
    system = messages[0].content if messages[0].role == "system" else None
    offset = int(system is not None)
    turns = messages[offset:]
    for i, message in enumerate(turns):
        expected = ("user", "assistant")[i % 2]
        if message.role != expected:
            why = "only the first message may be a system message" if message.role == "system" else \
                "after an optional first system message, user and assistant messages alternate, the user's first"
            raise RequestError(f"messages[{i + offset}] has role {message.role!r} where {expected!r} belongs: {why}",
                               f"messages.{i + offset}.role")
    if not turns or turns[-1].role != "user":
        raise RequestError("the last message must be the user's: the model answers it", "messages")
    return Conversation([m.content for m in turns], system)


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(s == "" for s in stop):
        raise RequestError("stop strings must not be empty", "stop")
    return stop


def validation_message(errors) -> tuple[str, str | None]:
    """One line naming what FastAPI's validation found wrong, and the parameter (OpenAI's `param`)."""
    messages, params = [], []
    for e in errors:
        if e["type"] == "json_invalid":
            return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
        param = ".".join(str(p) for p in e["loc"] if p != "body") or None
        params.append(param)
        if e["type"] == "extra_forbidden":
            messages.append(f"unsupported parameter {param!r} (lima-core serves no such field)")
        else:
            messages.append(f"{param}: {e['msg']}" if param else e["msg"])
    return "; ".join(messages), params[0] if params else None
