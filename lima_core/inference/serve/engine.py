"""The server's decoding engine: one worker thread runs the decode core (lima_core.inference.decode)
over every request, taking waiting requests into the running batch between decode steps
(continuous batching) and sending each request its text as it is released.

A new request's prompt runs through the model (with the other new ones) and its rows join the
batch; a finished row leaves at once. Rows keep their own sampling settings, stop strings and
length. Rows joining or leaving cost one copy of the batch's cache; prompts joining a running
batch stall it for their forward (no chunked prefill). Every row of a batch writes at the same
cache slot, so the cache holds the longest row's tokens plus the most tokens any row may still
generate: up to twice the context a row, where one batch of `decode_batch` needs one.

On several ranks (`torchrun --nproc_per_node N -m lima_core.serve`, a tensor-parallel copy
of the model over the node: lima_core.parallel.decode_layout), rank 0 leads: between decode
steps it broadcasts a `Plan` (the requests joining, the rows whose clients left, whether to
stop), and every other rank `follow`s it, admitting the same sequences with the same seeds, so
every rank holds the same batch and draws the same tokens from the same logits. Idle, the
leader sends an empty plan every `HEARTBEAT_S` seconds, so no rank waits in a collective long
enough for its backend to time out.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import sys
import threading
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from lima_core.inference.decode import Decoder, Sequence
from lima_core.inference.text import TextStream
from lima_core.model.llama import Llama

log = logging.getLogger("lima_core.serve")
HEARTBEAT_S = 5.0


@dataclass(eq=False)
class Request(Sequence):
    """One chat completion on its way through the engine: a Sequence whose updates (text,
    finish_reason, error) the worker thread sends to the handler's event loop: a streamed
    request each piece of text as it is released, a plain one its whole text at the end."""

    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client left: the worker drops the row
    seed: int | None = None  # a seeded request's seed (its generator's), for the ranks that follow
    id: int = 0  # the engine's number for it

    def send(self, text: str = "", finish_reason: str | None = None, error: str | None = None):
        if self.loop is None:  # a following rank's copy: the leader answers the client
            return
        try:
            self.loop.call_soon_threadsafe(self.updates.put_nowait, (text, finish_reason, error))
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def released(self, text: str):
        """Send what a decode step released: a streamed row's new text, or a finished row's end."""
        if self.finish:
            self.send(text if self.stream else self.text.text, self.finish)
        elif text and self.stream:
            self.send(text)


@dataclass
class Plan:
    """What the leading rank does before a decode step; the following ranks do the same."""

    new: list[dict] = field(default_factory=list)  # each joining request's id, prompt, budget, settings, seed, stop
    cancelled: list[int] = field(default_factory=list)  # ids of rows whose clients left
    stop: bool = False
    reset: bool = False  # decoding failed on the leader: every rank drops its rows


class Engine:
    """One worker thread decodes every request. Between decode steps it takes the requests
    waiting (up to max_batch rows in all) into the decoder; each step draws every row's next
    token, sends each row's new text, drops the rows that are done and runs the rest one token
    further. Idle, it waits for a request."""

    def __init__(self, model: Llama, tokenizer, max_batch: int = 16, group=None):
        self.model, self.tokenizer, self.max_batch, self.group = model.eval(), tokenizer, max_batch, group
        self.device = model.tok_embeddings.weight.device
        generator = torch.Generator(self.device)  # unseeded requests' draws: the same on every rank
        generator.seed()
        generator.manual_seed(self._shared(generator.initial_seed()))
        self.decoder = Decoder(model, {tokenizer.eot_id, tokenizer.eos_id}, generator)
        self.waiting: queue.Queue[Request | None] = queue.Queue()
        self.largest_batch = 0  # most rows decoded in one step so far (logs and tests)
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def start(self):
        self._thread = threading.Thread(target=self._run, name="lima-decode", daemon=True)
        self._thread.start()

    def stop(self):
        self.waiting.put(None)
        self._thread.join()

    def submit(self, request: Request):
        request.id = next(self._ids)
        self.waiting.put(request)

    def _run(self):
        """The leader's loop (the only rank's, on one rank)."""
        stopping, reset, decoder = False, False, self.decoder
        with torch.inference_mode():  # grad mode is per thread
            while not stopping:
                new, stopping = self._take(block=not decoder.rows, room=self.max_batch - len(decoder.rows))
                new = [r for r in new if not r.cancelled]
                cancelled = [r for r in decoder.rows if r.cancelled]
                self._shared(Plan([_joining(r) for r in new], [r.id for r in cancelled], stopping, reset))
                reset = False
                try:
                    self._apply(new, cancelled, stopping)
                except Exception as e:  # e.g. out of memory: fail these requests, keep serving
                    log.exception("decoding failed")
                    for row in dict.fromkeys([*decoder.rows, *new]):
                        row.send(error=f"decoding failed: {type(e).__name__}: {e}")
                    decoder.clear()
                    reset = True  # the followers drop their rows too, with the next plan
            for row in [*decoder.rows, *self._take(block=False, room=sys.maxsize)[0]]:
                row.send(error="the server is shutting down")

    def follow(self):
        """A following rank's loop: the leader's plans, step by step, until it stops."""
        rows: dict[int, Sequence] = {}
        with torch.inference_mode():
            while True:
                plan = self._shared(None)
                if plan.reset:
                    self.decoder.clear()
                    rows.clear()
                new = [self._sequence(r) for r in plan.new]
                rows.update((r.id, r) for r in new)
                self._apply(new, [rows.pop(i) for i in plan.cancelled if i in rows], plan.stop)
                if plan.stop:
                    return
                for i in [i for i, r in rows.items() if r.finish is not None]:
                    del rows[i]

    def _apply(self, new: list[Sequence], cancelled: list[Sequence], stopping: bool):
        """Admit the new rows, drop the cancelled ones, and (unless stopping) decode one step."""
        self.decoder.admit(new)
        for row in cancelled:
            row.finish = "cancelled"  # its client is gone: nothing is sent
        if self.decoder.rows and not stopping:
            self._step()

    def _shared(self, value):
        """The leader's value (a plan, a seed) on every rank: the leader passes it, the others receive it."""
        if self.group is None:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]


    def _sequence(self, joining: dict) -> Request:
        """A follower's copy of a joining request (it sends nothing: it has no client)."""
        seed, stop = joining.pop("seed"), joining.pop("stop")
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        return Request(**joining, generator=generator, text=TextStream(self.tokenizer, stop), seed=seed)

    def _take(self, block: bool, room: int) -> tuple[list[Request], bool]:
        """Requests waiting (up to `room`; when `block`, at least one, or none after a heartbeat's
        wait when other ranks follow), and whether stop() was called."""
        taken = []
        timeout = HEARTBEAT_S if self.group is not None else None
        try:
            while len(taken) < room:
                request = self.waiting.get(block=block and not taken, timeout=timeout)
                if request is None:
                    return taken, True
                taken.append(request)
        except queue.Empty:
            pass
        return taken, False

    def _step(self):
        """Draw each row's next token, send its text, and run the rows still going one token further."""
        self.largest_batch = max(self.largest_batch, len(self.decoder.rows))
        for row, text in self.decoder.step():
            row.released(text)
        self.decoder.forward(compact=True)


def _joining(request: Request) -> dict:
    """What a follower needs to decode a request as the leader does."""
    return dict(id=request.id, prompt=request.prompt, budget=request.budget, temperature=request.temperature,
                top_p=request.top_p, repetition_penalty=request.repetition_penalty, seed=request.seed,
                stop=request.text.stop)
