"""An OpenAI-compatible HTTP server for a checkpoint: chat completions, plain and streamed.

    python -m lima_core.serve --checkpoint runs/lima/epoch-5 [--host 127.0.0.1] [--port 8000]

Any OpenAI client talks to it (`openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")`):

- `POST /v1/chat/completions`: `messages` are formatted exactly as training formats a
  conversation (data.encode.prompt_ids: BOS, an optional first system turn, then user and assistant
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
length (lima_core.inference.serve.engine). A client that leaves a stream frees its row at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from lima_core.data.encode import prompt_ids
from lima_core.inference.sampling import LIMA
from lima_core.inference.serve.engine import Engine, Request
from lima_core.inference.serve.schemas import (
    ChatRequest,
    RequestError,
    conversation_of,
    error_response,
    stop_strings,
    validation_message,
)
from lima_core.inference.text import TextStream
from lima_core.model.llama import Llama


def create_app(model: Llama, tokenizer, *, model_name: str, max_batch: int = 16, group=None) -> FastAPI:
    """The server's app for a loaded model; its engine (app.state.engine) runs while the app does.
    With `group`, the model is one rank's share and the group's other ranks follow the engine."""
    engine = Engine(model, tokenizer, max_batch, group)
    server = ChatServer(engine, tokenizer, model_name, context=model.cfg.max_seq_len)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="lima-core", lifespan=lifespan)
    app.state.engine = engine
    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.get("/v1/models")(server.models)
    app.get("/v1/models/{name:path}")(server.model_info)
    app.post("/v1/chat/completions")(server.chat_completions)
    return app


async def refused(_, e: RequestError):
    return error_response(e.status, e.message, e.param, e.code)


async def invalid(_, e: RequestValidationError):
    message, param = validation_message(e.errors())
    return error_response(400, message, param)


async def http_error(_, e: HTTPException):
    return error_response(e.status_code, str(e.detail), code={404: "not_found"}.get(e.status_code))


class ChatServer:
    """The endpoints of one served model: its card, and chat completions through the engine."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, context: int):
        self.engine, self.tokenizer, self.model_name, self.context = engine, tokenizer, model_name, context
        self.started = int(time.time())

    async def models(self):
        return {"object": "list", "data": [self.model_card()]}

    async def model_info(self, name: str):
        self.check_model(name)
        return self.model_card()

    async def chat_completions(self, body: ChatRequest):
        self.check_model(body.model)
        request = self.new_request(body)
        self.engine.submit(request)
        completion = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name)
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

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "lima-core"}

    def check_model(self, name: str):
        if name != self.model_name:
            raise RequestError(f"The model `{name}` does not exist: this server serves `{self.model_name}`", "model",
                               "model_not_found", status=404)

    def new_request(self, body: ChatRequest) -> Request:
        """The request's sequence for the engine: its prompt in the training format, its budget
        within the context, its sampling settings and own generator when seeded."""
        if body.n != 1:
            raise RequestError(f"n = {body.n}: only n = 1 is served (one choice per request)", "n")
        if body.stream_options is not None and not body.stream:
            raise RequestError("stream_options is only allowed with stream: true", "stream_options")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise RequestError("give max_tokens or max_completion_tokens, not both", "max_tokens")
        context = self.context
        prompt = prompt_ids(self.tokenizer, conversation_of(body.messages))
        if len(prompt) >= context:
            raise RequestError(f"the messages are {len(prompt)} tokens; this model's context is {context} "
                               f"positions, so a prompt may hold at most {context - 1}", "messages",
                               "context_length_exceeded")
        max_tokens = body.max_completion_tokens or body.max_tokens or LIMA.max_new_tokens
        generator = None if body.seed is None else torch.Generator(self.engine.device).manual_seed(body.seed)
        return Request(prompt, min(max_tokens, context - len(prompt)), temperature=body.temperature,
                       top_p=body.top_p, repetition_penalty=body.repetition_penalty, generator=generator,
                       text=TextStream(self.tokenizer, stop_strings(body.stop)), stream=body.stream,
                       loop=asyncio.get_running_loop(), seed=body.seed)


async def stream_chunks(request: Request, completion: dict, include_usage: bool):
    """The server-sent events of a streamed answer, as OpenAI sends them."""
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
    generated = len(request.tokens)
    return {"prompt_tokens": len(request.prompt), "completion_tokens": generated,
            "total_tokens": len(request.prompt) + generated}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
