"""The server's decoding engine: one worker thread runs the decode core (lima_core.inference.decode)
over every request, taking waiting requests into the running batch between decode steps
(continuous batching) and sending each request its text as it is released.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from dataclasses import dataclass, field

import torch

from lima_core.inference.decode import prefill
from lima_core.inference.sampling import apply_repetition_penalty, sample_next
from lima_core.inference.text import TextStream
from lima_core.model.kv_cache import KVCache
from lima_core.model.llama import Llama

log = logging.getLogger("lima_core.serve")


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
