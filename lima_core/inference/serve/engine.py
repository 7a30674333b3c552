"""The server's decoding engine: one worker thread runs the decode core (lima_core.inference.decode)
over every request, taking waiting requests into the running batch between decode steps
(continuous batching) and sending each request its text as it is released.

A new request's prompt runs through the model (with the other new ones) and its rows join the
batch; a finished row leaves at once. Rows keep their own sampling settings, stop strings and
length. Rows joining or leaving cost one copy of the batch's cache; prompts joining a running
batch stall it for their forward (no chunked prefill). Every row of a batch writes at the same
cache slot, so the cache holds the longest row's tokens plus the most tokens any row may still
generate: up to twice the context a row, where one batch of `decode_batch` needs one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from dataclasses import dataclass, field

import torch

from lima_core.inference.decode import Decoder, Sequence
from lima_core.model.llama import Llama

log = logging.getLogger("lima_core.serve")


@dataclass(eq=False)
class Request(Sequence):
    """One chat completion on its way through the engine: a Sequence whose updates (text,
    finish_reason, error) the worker thread sends to the handler's event loop: a streamed
    request each piece of text as it is released, a plain one its whole text at the end."""

    stream: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client left: the worker drops the row

    def send(self, text: str = "", finish_reason: str | None = None, error: str | None = None):
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


class Engine:
    """One worker thread decodes every request. Between decode steps it takes the requests
    waiting (up to max_batch rows in all) into the decoder; each step draws every row's next
    token, sends each row's new text, drops the rows that are done and runs the rest one token
    further. Idle, it waits for a request."""

    def __init__(self, model: Llama, tokenizer, max_batch: int = 16):
        self.model, self.max_batch = model.eval(), max_batch
        self.device = model.tok_embeddings.weight.device
        generator = torch.Generator(self.device)  # unseeded requests' draws
        generator.seed()
        self.decoder = Decoder(model, {tokenizer.eot_id, tokenizer.eos_id}, generator)
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
        stopping, decoder = False, self.decoder
        with torch.inference_mode():  # grad mode is per thread
            while not stopping:
                new, stopping = self._take(block=not decoder.rows, room=self.max_batch - len(decoder.rows))
                try:
                    decoder.admit([r for r in new if not r.cancelled])
                    if decoder.rows and not stopping:
                        self._step()
                except Exception as e:  # e.g. out of memory: fail these requests, keep serving
                    log.exception("decoding failed")
                    for row in dict.fromkeys([*decoder.rows, *new]):
                        row.send(error=f"decoding failed: {type(e).__name__}: {e}")
                    decoder.clear()
            for row in [*decoder.rows, *self._take(block=False, room=sys.maxsize)[0]]:
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

    def _step(self):
        """Draw each row's next token, send its text, and run the rows still going one token further."""
        self.largest_batch = max(self.largest_batch, len(self.decoder.rows))
        for row in self.decoder.rows:
            if row.cancelled:
                row.finish = "cancelled"  # its client is gone: nothing is sent
        for row, text in self.decoder.step():
            row.released(text)
        self.decoder.forward(compact=True)
