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

import argparse
import asyncio
import json
import logging
import queue
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException

from lima_core.config import DTYPES, SamplingConfig
from lima_core.data import Conversation, prompt_ids
from lima_core.hf import load_pretrained
from lima_core.model import KVCache, Llama
from lima_core.sampling import apply_repetition_penalty, prefill, sample_next
from lima_core.tokenizer import Tokenizer

LIMA = SamplingConfig()
log = logging.getLogger("lima_core.serve")


# ---- the text of an answer as its tokens arrive ---------------------------------------------


class TextStream:
    """An answer's text as its tokens arrive, cut before the first stop string.

    Each new token's text is the difference of two decodings of a short window (from the token
    before the last released text onward), with and without the new tokens, so a piece's leading
    space (sentencepiece's word boundary) comes out as decoding the whole answer gives it, at a
    constant cost per token. A window that ends in U+FFFD ends inside a UTF-8 character (byte
    tokens): it waits for the character's other bytes. Text that could be the start of a stop
    string is held back until the next tokens settle it, so no part of one is ever released."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.start = self.end = 0  # the window is ids[start:]; ids[start:end] are already in text
        self.text = ""  # the answer so far, cut before a stop string once one appears
        self.sent = 0  # characters of text released
        self.stopped = False  # a stop string appeared

    def add(self, token: int) -> str:
        """Take the next token (not EOT/EOS); return the text it releases, often ""."""
        self.ids.append(token)
        window = self.tokenizer.decode(self.ids[self.start:])
        if window.endswith("\ufffd"):
            return ""
        self._extend(window)
        return self._release(final=False)

    def flush(self) -> str:
        """The rest of the text at the answer's end (an unfinished character as U+FFFD, as decode gives it)."""
        if self.stopped:
            return ""
        if self.end < len(self.ids):
            self._extend(self.tokenizer.decode(self.ids[self.start:]))
        return self._release(final=True)

    def _extend(self, window: str):
        self.text += window[len(self.tokenizer.decode(self.ids[self.start:self.end])):]
        self.start, self.end = self.end, len(self.ids)

    def _release(self, final: bool) -> str:
        cut = min((i for s in self.stop if (i := self.text.find(s, self.sent)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped, end = self.text[:cut], True, cut
        else:
            end = len(self.text) - (0 if final else self._held())
        released, self.sent = self.text[self.sent:end], end
        return released

    def _held(self) -> int:
        """Length of the longest unreleased tail that is a proper prefix of a stop string."""
        tail = self.text[self.sent:]
        return max((k for s in self.stop for k in range(1, min(len(s), len(tail) + 1)) if tail.endswith(s[:k])),
                   default=0)


# ---- the decoding engine ---------------------------------------------------------------------


@dataclass(eq=False)
class Request:
    """One chat completion on its way through the engine. The worker thread decodes it and
    sends (text, finish_reason, error) updates to the handler's event loop: a streamed request
    each piece of text as it is released, a plain one its whole text at the end."""

    prompt: list[int]
    budget: int  # most tokens to generate: max_tokens, within the model's context
    temperature: float
    top_p: float
    repetition_penalty: float
    generator: torch.Generator | None  # a seeded request's own; None: the engine's
    text: TextStream
    stream: bool
    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: int = 0
    cancelled: bool = False  # the client left: the worker drops the row

    def send(self, text: str = "", finish_reason: str | None = None, error: str | None = None):
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, (text, finish_reason, error))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def accept(self, token: int, stop_ids: set[int]) -> bool:
        """Take the row's next token and send what it releases; False when the row is done."""
        if self.cancelled:
            return False
        self.generated += 1
        if token in stop_ids:
            return self._finish(self.text.flush(), "stop")
        released = self.text.add(token)
        if self.text.stopped:
            return self._finish(released, "stop")
        if self.generated == self.budget:
            return self._finish(released + self.text.flush(), "length")
        if released and self.stream:
            self.send(released)
        return True

    def _finish(self, released: str, finish_reason: str) -> bool:
        self.send(released if self.stream else self.text.text, finish_reason)
        return False


@dataclass
class Batch:
    """Rows decoded together: their cache (each row's tokens end at the cache's last slot, left
    padding hidden), the logits of each row's next token, the tokens each row has seen (for
    the repetition penalty) and how many tokens each holds in the cache (its next position)."""

    rows: list[Request]
    cache: KVCache
    logits: torch.Tensor  # [b, vocab]
    seen: torch.Tensor  # [b, vocab] bool
    positions: torch.Tensor  # [b]


def prefill_rows(model: Llama, rows: list[Request], free_slots: int) -> Batch:
    """The rows' prompts through the model together (sampling.prefill), in a cache with
    `free_slots` slots after the longest prompt."""
    cache, logits, seen = prefill(model, [r.prompt for r in rows], free_slots)
    return Batch(rows, cache, logits, seen, torch.tensor([len(r.prompt) for r in rows], device=logits.device))


def repack(model: Llama, parts: list[tuple[Batch, list[int]]]) -> Batch:
    """The chosen rows of one or more batches in one fresh cache, with room for every row's
    remaining tokens. Each row's cached keys and values move so that they end at the new cache's
    last filled slot (a decode step writes every row's next key at one slot); the slots before a
    row's first token are padding. Keys were rotated before they were cached, and positions are
    per row, so moving them between slots changes nothing. Costs one copy of the kept cache."""
    rows = [batch.rows[i] for batch, kept in parts for i in kept]
    device = parts[0][0].logits.device
    index = [torch.tensor(kept, device=device) for _, kept in parts]
    spans = torch.cat([batch.positions[i] for (batch, _), i in zip(parts, index)])  # tokens each row holds
    length = int(spans.max())
    capacity = length + max(r.budget - r.generated for r in rows)
    slots = torch.arange(capacity, device=device)
    cache = KVCache(model.cfg, len(rows), capacity, device, parts[0][0].cache.k[0].dtype,
                    padding=slots[None, :] < (length - spans)[:, None])
    row = 0
    for (batch, _), i in zip(parts, index):
        old = batch.cache
        width = min(length, old.length)
        for new_k, new_v, k, v in zip(cache.k, cache.v, old.k, old.v):
            new_k[row:row + len(i), length - width:length] = k[i, old.length - width:old.length]
            new_v[row:row + len(i), length - width:length] = v[i, old.length - width:old.length]
        row += len(i)
    cache.advance(length)
    logits = torch.cat([batch.logits[i] for (batch, _), i in zip(parts, index)])
    seen = torch.cat([batch.seen[i] for (batch, _), i in zip(parts, index)])
    return Batch(rows, cache, logits, seen, spans)


class Engine:
    """One worker thread decodes every request. Between decode steps it takes the requests
    waiting (up to max_batch rows in all), runs their prompts through the model together and
    adds their rows to the batch; each step samples every row's next token (rows with the same
    settings and generator in one call of sampling.sample_next), sends each row's new text,
    drops the rows that are done and runs the rest one token further. Idle, it waits for a
    request.

    Rows joining or leaving cost one copy of the batch's cache (repack); prompts joining a
    running batch stall it for their forward (no chunked prefill). Every row of a batch writes
    at the same cache slot, so the cache holds the longest row's tokens plus the most tokens any
    row may still generate: up to twice the context a row, where generate_batch needs one."""

    def __init__(self, model: Llama, tokenizer, max_batch: int = 16):
        self.model, self.max_batch = model.eval(), max_batch
        self.stop_ids = {tokenizer.eot_id, tokenizer.eos_id}
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(self.device)  # unseeded requests' draws
        self.generator.seed()
        self.waiting: queue.Queue[Request | None] = queue.Queue()
        self.largest_batch = 0  # most rows decoded in one step so far (logs and tests)
        self._thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="lima-decode", daemon=True)
        self._thread.start()

    def stop(self):
        self.waiting.put(None)
        self._thread.join()

    def submit(self, request: Request):
        self.waiting.put(request)

    def _run(self):
        batch, stopping = None, False
        with torch.inference_mode():  # grad mode is per thread
            while not stopping:
                new, stopping = self._take(block=batch is None, room=self.max_batch - len(batch.rows if batch else []))
                try:
                    batch = self._join(batch, [r for r in new if not r.cancelled])
                    if batch is not None and not stopping:
                        batch = self._step(batch)
                except Exception as e:  # e.g. out of memory: fail these requests, keep serving
                    log.exception("decoding failed")
                    for row in dict.fromkeys([*(batch.rows if batch else []), *new]):
                        row.send(error=f"decoding failed: {type(e).__name__}: {e}")
                    batch = None
            for row in [*(batch.rows if batch else []), *self._take(block=False, room=sys.maxsize)[0]]:
                row.send(error="the server is shutting down")

    def _take(self, block: bool, room: int) -> tuple[list[Request], bool]:
        """Requests waiting (up to `room`; when `block`, at least one), and whether stop() was called."""
        taken = []
        try:
            while len(taken) < room:
                request = self.waiting.get(block=block and not taken)
                if request is None:
                    return taken, True
                taken.append(request)
        except queue.Empty:
            pass
        return taken, False

    def _join(self, batch: Batch | None, new: list[Request]) -> Batch | None:
        if not new:
            return batch
        if batch is None:
            return prefill_rows(self.model, new, free_slots=max(r.budget for r in new))
        fresh = prefill_rows(self.model, new, free_slots=0)
        return repack(self.model, [(batch, list(range(len(batch.rows)))), (fresh, list(range(len(new))))])

    def _step(self, batch: Batch) -> Batch | None:
        """Sample each row's next token, send its text, and run the rows still going one token further."""
        self.largest_batch = max(self.largest_batch, len(batch.rows))
        tokens = self._sample(batch)  # [b]
        batch.seen[torch.arange(len(batch.rows), device=self.device), tokens] = True
        going = [i for i, (row, token) in enumerate(zip(batch.rows, tokens.tolist()))
                 if row.accept(token, self.stop_ids)]
        if not going:
            return None
        if len(going) < len(batch.rows):
            batch, tokens = repack(self.model, [(batch, going)]), tokens[going]
        batch.logits = self.model(tokens[:, None], positions=batch.positions[:, None], cache=batch.cache)[:, -1]
        batch.positions += 1
        return batch

    def _sample(self, batch: Batch) -> torch.Tensor:
        """Each row's next token [b], drawn with its own settings; rows that share them (and a
        generator: greedy rows need none) in one call."""
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(batch.rows):
            generator = None if row.temperature == 0 else (row.generator or self.generator)
            key = (row.temperature, row.top_p, row.repetition_penalty, generator)
            groups.setdefault(key, []).append(i)
        if len(groups) == 1:
            (temperature, top_p, penalty, generator), = groups
            logits = apply_repetition_penalty(batch.logits.float(), batch.seen, penalty)
            return sample_next(logits, temperature, top_p, generator)
        tokens = torch.empty(len(batch.rows), dtype=torch.long, device=self.device)
        for (temperature, top_p, penalty, generator), rows in groups.items():
            i = torch.tensor(rows, device=self.device)
            logits = apply_repetition_penalty(batch.logits[i].float(), batch.seen[i], penalty)
            tokens[i] = sample_next(logits, temperature, top_p, generator)
        return tokens


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


# ---- the command line ------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lima_core.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="an HF-format folder (e.g. runs/lima/epoch-5)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="dtype the weights are loaded and computed in (bf16 halves the memory)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests decoded together")
    parser.add_argument("--model-name", help="the model's id in the API (default: the checkpoint folder's name)")
    args = parser.parse_args(argv)
    if args.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, got {args.max_batch}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    args.model_name = args.model_name or Path(args.checkpoint).resolve().name
    return args


def server_config(app: FastAPI, args: argparse.Namespace) -> uvicorn.Config:
    return uvicorn.Config(app, host=args.host, port=args.port, log_level="info")


def main(argv=None):
    args = parse_args(argv)
    try:
        model = load_pretrained(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device)
        tokenizer = Tokenizer(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:  # a bad checkpoint or tokenizer file
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    app = create_app(model, tokenizer, model_name=args.model_name, max_batch=args.max_batch)
    print(f"serving {args.model_name} ({args.checkpoint}, {args.dtype} on {args.device}, up to {args.max_batch} "
          f"requests a batch) at http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.Server(server_config(app, args)).run()


if __name__ == "__main__":
    main()
