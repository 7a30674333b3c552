"""An OpenAI-compatible HTTP server for a checkpoint: chat completions, plain and streamed.

    python -m lima_core.serve --checkpoint runs/lima/epoch-5 [--host 127.0.0.1] [--port 8000]

Any OpenAI client talks to it (`openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`):

- `POST /v1/chat/completions`: `messages` are formatted exactly as training formats a
  conversation (data.prompt_ids: BOS, an optional first system turn, then user and assistant
  turns alternating, each followed by EOT; the last must be the user's). Sampling defaults are
  LIMA's (config.SamplingConfig); `temperature` (0: greedy), `top_p`, `max_tokens` (or
  `max_completion_tokens`; never past the model's context), `stop` (a string or a list),
  `seed` (the request draws from its own generator: the same request gives the same answer),
  `stream` (+ `stream_options.include_usage`), `n` (1 only) and LIMA's `repetition_penalty`
  as an extra field (`extra_body={"repetition_penalty": 1.2}`). A field not listed here is a
  400, not silently ignored (`user` is accepted and unused).
- `GET /v1/models`: the one model served, named by --model-name or the checkpoint's folder. A
  request naming another model gets a 404 (`model_not_found`), as OpenAI answers it.
- Bad requests get OpenAI's error object with status 400 (FastAPI's 422s included; fields are
  typed strictly: "0.7" is not a number). A streamed answer sends one `chat.completion.chunk`
  with `delta.role`, then the text, then one with `finish_reason`, then (with include_usage) one
  with no choices and the `usage`, as OpenAI does, then `data: [DONE]`.

`finish_reason` is "stop" at EOT, EOS or a stop string, "length" at max_tokens or the context's
end. A stop string cuts the text before its first occurrence; `completion_tokens` counts every
token generated, up to the stop token (EOT/EOS, counted) or the token that completed the stop
string. Streaming never sends a character of a stop string: text that could begin one is held
back until the next tokens settle it.

Concurrent requests are decoded together: one worker thread keeps a batch of up to --max-batch
rows and takes waiting requests into it between decode steps (continuous batching). A new
request's prompt runs through the model (with the other new ones) and its cache rows join the
batch; a finished row leaves at once. Rows keep their own sampling settings, stop strings and
length. See `Engine`. A client that leaves a stream frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Literal

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from lima_core.data.encode import prompt_ids
from lima_core.data.formats import Conversation
from lima_core.inference.sampling import LIMA
from lima_core.inference.serve.engine import Engine, Request
from lima_core.inference.text import TextStream
from lima_core.model.llama import Llama

# ---- the HTTP API ----------------------------------------------------------------------------


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


def create_app(model: Llama, tokenizer, *, model_name: str, max_batch: int = 16) -> FastAPI:
    """The server's app for a loaded model; its engine (app.state.engine) runs while the app does."""
    engine = Engine(model, tokenizer, max_batch)
    context = model.cfg.max_seq_len
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lima-core", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def refused(_, e: RequestError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return error_response(e.status_code, str(e.detail), code={404: "not_found"}.get(e.status_code))

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": started, "owned_by": "lima-core"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        check_model(name)
        return model_card()

    def check_model(name: str):
        if name != model_name:
            raise RequestError(f"The model `{name}` does not exist: this server serves `{model_name}`", "model",
                               "model_not_found", status=404)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        check_model(body.model)
        request = new_request(body)
        engine.submit(request)
        completion = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_name)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream_chunks(request, completion, include_usage), media_type="text/event-stream")
        text, finish_reason = "", None
        async for released, finish_reason in updates_of(request):
            text += released
        return {**completion, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish_reason}],
                "usage": usage(request)}

    def new_request(body: ChatRequest) -> Request:
        if body.n != 1:
            raise RequestError(f"n = {body.n}: only n = 1 is served (one choice per request)", "n")
        if body.stream_options is not None and not body.stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", "max_tokens")
        prompt = prompt_ids(tokenizer, conversation_of(body.messages))
        if len(prompt) >= context:
            raise RequestError(f"the messages are {len(prompt)} tokens; this model's context is {context} "
                               f"positions, so a prompt may hold at most {context - 1}", "messages",
                               "context_length_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens or LIMA.max_new_tokens
        generator = None if body.seed is None else torch.Generator(engine.device).manual_seed(body.seed)
        return Request(prompt, min(max_tokens, context - len(prompt)), body.temperature, body.top_p,
                       body.repetition_penalty, generator, TextStream(tokenizer, stop_strings(body.stop)),
                       body.stream, asyncio.get_running_loop())

    async def stream_chunks(request: Request, completion: dict, include_usage: bool):
        def chunk(delta: dict, finish_reason=None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse({**completion, "object": "chat.completion.chunk", "choices": [choice]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for released, finish_reason in updates_of(request):
                if released:
                    yield chunk({"content": released})
                if finish_reason:
                    yield chunk({}, finish_reason)
            if include_usage:
                yield sse({**completion, "object": "chat.completion.chunk", "choices": [], "usage": usage(request)})
            yield "data: [DONE]\n\n"
        except RequestError as e:  # the status line has gone out: the error travels as an event
            yield sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": None}})
        finally:
            request.cancelled = True  # a client that left frees its row; harmless once done

    return app


async def updates_of(request: Request):
    """(text, finish_reason) of each update the engine sends, until the finish."""
    while True:
        text, finish_reason, error = await request.updates.get()
        if error:
            raise RequestError(error, code="server_error", status=500)
        yield text, finish_reason
        if finish_reason:
            return


def usage(request: Request) -> dict:
    return {"prompt_tokens": len(request.prompt), "completion_tokens": request.generated,
            "total_tokens": len(request.prompt) + request.generated}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


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
