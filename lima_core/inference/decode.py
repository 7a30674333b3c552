"""The one decode core. Every path that generates runs `Decoder`: batched generation
(`generate_batch`: dev generations across ranks, `eval generate` from a checkpoint, the chat
command) and the server's continuous batching (lima_core.inference.serve.engine).

A `Sequence` is one answer being decoded: its prompt, its token budget (the caller keeps it
within the model's context), its sampling settings and generator, and what stops it: a stop
token (EOT, EOS), a stop string (with a `TextStream`), or the budget. A `Decoder` holds the
sequences decoded together: `admit` runs new prompts through the model together (shorter ones
padded on the left, padding hidden from attention and from the repetition penalty, positions
restarting at each prompt's first token) and joins them to the batch; `step` draws every row's
next token and applies every stop; `forward` runs the rows one token further, first dropping
the finished ones when asked to (`compact`, one copy of the kept cache, which the KV cache does).

Sampling defaults are LIMA's (lima_core.config.SamplingConfig: nucleus p 0.9, temperature 0.7,
repetition penalty 1.2); temperature 0 is greedy. Rows with the same settings and generator are
drawn in one call, so a batch sharing one seeded generator draws what it always drew, and a
request with its own generator draws the same whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from lima_core.inference.sampling import LIMA, apply_repetition_penalty, check_settings, sample_next
from lima_core.inference.text import TextStream
from lima_core.model.kv_cache import KVCache
from lima_core.model.llama import Llama

if TYPE_CHECKING:
    from lima_core.parallel.topology import Collectives


@dataclass(eq=False)
class Sequence:
    """One answer being decoded, and why it ended."""

    prompt: list[int]
    budget: int
    """Most tokens to generate; the caller keeps prompt + budget within the model's context."""
    temperature: float = LIMA.temperature
    top_p: float = LIMA.top_p
    repetition_penalty: float = LIMA.repetition_penalty
    generator: torch.Generator | None = None
    """This sequence's draws; None: the decoder's."""
    text: TextStream | None = None
    """Its text as the tokens arrive; stop strings end the answer. None: token ids only."""
    tokens: list[int] = field(default_factory=list)
    """The tokens generated, a stop token included."""
    finish: str | None = None
    """None while decoding; then "stop" (a stop token or string), "length" (the budget) or "cancelled"."""

    def accept(self, token: int, stop_ids: set[int]) -> str:
        """Take the next token; return the text it releases (always "" without `text`)."""
        self.tokens.append(token)
        if token in stop_ids:
            self.finish = "stop"
            return self.text.flush() if self.text else ""
        released = self.text.add(token) if self.text else ""
        if self.text and self.text.stopped:
            self.finish = "stop"
        elif len(self.tokens) == self.budget:
            self.finish = "length"
            released += self.text.flush() if self.text else ""
        return released


@dataclass
class _Batch:
    """Rows decoded together: their cache (rows right-aligned, see KVCache), the logits of each
    row's next token, the tokens each row has seen (for the penalty), how many tokens each holds
    in the cache (its next position) and the tokens the last step drew."""

    rows: list[Sequence]
    cache: KVCache
    logits: torch.Tensor  # [b, vocab]
    seen: torch.Tensor  # [b, vocab] bool
    positions: torch.Tensor  # [b]
    drawn: torch.Tensor | None = None  # [b]


class Decoder:
    """Sequences decoded together, one token each a step (see the module doc)."""

    def __init__(self, model: Llama, stop_ids, generator: torch.Generator | None = None):
        self.model = model
        self.stop_ids = set(stop_ids)
        self.generator = generator  # the draws of sampled rows that bring no generator of their own
        self.batch: _Batch | None = None

    @property
    def rows(self) -> list[Sequence]:
        return self.batch.rows if self.batch else []

    def admit(self, new: list[Sequence]):
        """Run the new sequences' prompts through the model together and add their rows."""
        if not new:
            return
        if self.batch is None:  # room after the longest prompt for the longest budget
            self.batch = _prefill_rows(self.model, new, free_slots=max(s.budget for s in new))
            return
        fresh = _prefill_rows(self.model, new, free_slots=0)
        self.batch = _merge([(self.batch, range(len(self.batch.rows))), (fresh, range(len(new)))])

    def step(self) -> list[tuple[Sequence, str]]:
        """Draw every row's next token and apply every stop. Returns (sequence, text released)
        for each row that was still decoding; a row that finished says so in its `finish`."""
        b = self.batch
        b.drawn = self._draw()  # [b]
        b.seen[torch.arange(len(b.rows), device=b.drawn.device), b.drawn] = True
        return [(row, row.accept(token, self.stop_ids))
                for row, token in zip(b.rows, b.drawn.tolist()) if row.finish is None]

    def forward(self, compact: bool):
        """Run the rows one token further. With `compact`, finished rows leave the batch first;
        without, they ride along (their tokens unused), so a batch sharing one generator keeps
        drawing as it did."""
        b, tokens = self.batch, self.batch.drawn
        if compact:
            going = [i for i, row in enumerate(b.rows) if row.finish is None]
            if not going:
                self.batch = None
                return
            if len(going) < len(b.rows):
                self.batch, tokens = _merge([(b, going)]), tokens[going]
                b = self.batch
        b.logits = self.model(tokens[:, None], positions=b.positions[:, None], cache=b.cache)[:, -1]
        b.positions += 1

    def clear(self):
        """Forget every row (after a failure: their requests were told)."""
        self.batch = None

    def _draw(self) -> torch.Tensor:
        """Each row's next token [b], drawn with its own settings; rows that share them (and a
        generator: greedy rows need none) in one call."""
        b = self.batch
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(b.rows):
            generator = None if row.temperature == 0 else (row.generator or self.generator)
            groups.setdefault((row.temperature, row.top_p, row.repetition_penalty, generator), []).append(i)
        if len(groups) == 1:
            (temperature, top_p, penalty, generator), = groups
            return sample_next(apply_repetition_penalty(b.logits.float(), b.seen, penalty), temperature, top_p,
                               generator)
        tokens = torch.empty(len(b.rows), dtype=torch.long, device=b.logits.device)
        for (temperature, top_p, penalty, generator), rows in groups.items():
            i = torch.tensor(rows, device=b.logits.device)
            logits = apply_repetition_penalty(b.logits[i].float(), b.seen[i], penalty)
            tokens[i] = sample_next(logits, temperature, top_p, generator)
        return tokens


def prefill(model: Llama, prompts: list[list[int]], free_slots: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """The prompts through the model together, shorter ones padded on the left (padding hidden
    from attention and from the repetition penalty, positions restarting at each prompt's first
    token), into a cache with `free_slots` slots after the longest prompt. Returns the cache,
    each row's next-token logits [b, vocab] and the tokens each row has seen [b, vocab] bool."""
    weight = model.tok_embeddings.weight
    device = weight.device
    b, longest = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)  # [b] left padding
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)  # [b, longest]
    slots = torch.arange(longest + free_slots, device=device)
    padding = slots[None, :] < pad[:, None] if any(len(p) < longest for p in prompts) else None
    cache = KVCache(model.cfg, b, longest + free_slots, device, weight.dtype, padding=padding)
    seen = torch.zeros(b, model.cfg.vocab_size, dtype=torch.bool, device=device)  # for the penalty
    for i, p in enumerate(prompts):
        seen[i, p] = True
    positions = (slots[None, :longest] - pad[:, None]).clamp(min=0)  # [b, longest]
    logits = model(tokens, positions=positions, cache=cache)[:, -1]  # [b, vocab]
    return cache, logits, seen


def _prefill_rows(model: Llama, rows: list[Sequence], free_slots: int) -> _Batch:
    cache, logits, seen = prefill(model, [r.prompt for r in rows], free_slots)
    return _Batch(list(rows), cache, logits, seen, torch.tensor([len(r.prompt) for r in rows], device=logits.device))


def _merge(parts: list[tuple[_Batch, list[int] | range]]) -> _Batch:
    """The chosen rows of one or more batches as one batch, with cache room for every row's
    remaining tokens."""
    rows = [batch.rows[i] for batch, kept in parts for i in kept]
    device = parts[0][0].logits.device
    index = [torch.tensor(list(kept), device=device) for _, kept in parts]
    spans = torch.cat([batch.positions[i] for (batch, _), i in zip(parts, index)])  # tokens each row holds
    cache = KVCache.merge([(batch.cache, i) for (batch, _), i in zip(parts, index)], spans,
                          free_slots=max(r.budget - len(r.tokens) for r in rows))
    logits = torch.cat([batch.logits[i] for (batch, _), i in zip(parts, index)])
    seen = torch.cat([batch.seen[i] for (batch, _), i in zip(parts, index)])
    return _Batch(rows, cache, logits, seen, spans)


# ---- batched generation: one batch, decoded until every row (on every rank) has stopped ------


@torch.no_grad()
def decode_batch(model: Llama, prompts: list[list[int]], *, max_new_tokens: int = LIMA.max_new_tokens,
                 temperature: float = LIMA.temperature, top_p: float = LIMA.top_p,
                 repetition_penalty: float = LIMA.repetition_penalty, stop_ids=(), generator=None,
                 comm: Collectives | None = None, level: str = "world") -> list[Sequence]:
    """Continue each prompt (token ids) as one batch; returns each prompt's Sequence (its tokens,
    its stop token included if reached, and why it finished). Every row may generate
    max_new_tokens, less where the longest prompt (of every rank) would pass the model's context:
    rows move in lockstep. With `comm`, a collective over the ranks of `level` ("world": a
    sharded model; "node": a node's tensor-parallel copy, lima_core.parallel.decode_layout): ranks
    may hold different numbers of prompts (even none), and every rank steps until every rank's
    rows are done (the model's forward holds collectives). Two collectives of its own, through
    `comm`: the longest prompt (one int64 all-reduce) and, each step, whether anyone is still
    decoding (one int32 all-reduce)."""
    check_settings(max_new_tokens, temperature, top_p, repetition_penalty)
    context = model.cfg.max_seq_len
    for p in prompts:
        if len(p) >= context:
            raise ValueError(f"a prompt of {len(p)} tokens: beyond the model's context ({context} positions)")
    device = model.tok_embeddings.weight.device  # collectives need the group's device (NCCL: CUDA)
    budget = min(max_new_tokens, context - _longest(prompts, comm, level, device))
    rows = [Sequence(p, budget, temperature, top_p, repetition_penalty, generator) for p in prompts]
    # A rank without prompts still runs every step's collectives, with one row that never decodes.
    batch = rows or [Sequence([0], budget, temperature=0, finish="stop")]
    was_training = model.training
    model.eval()
    decoder = Decoder(model, stop_ids)
    decoder.admit(batch)
    while True:
        decoder.step()
        if not _anyone_decoding(batch, comm, level, device):
            break
        decoder.forward(compact=False)
    model.train(was_training)
    return rows


def generate_batch(model: Llama, prompts: list[list[int]], **settings) -> list[list[int]]:
    """Each prompt's new token ids (its stop token included if reached); settings as decode_batch's."""
    return [s.tokens for s in decode_batch(model, prompts, **settings)]


def generate(model: Llama, prompt: list[int], **settings) -> list[int]:
    """Continue one prompt; `settings` as decode_batch's. Exported as `lima_core.generate`."""
    return generate_batch(model, [prompt], **settings)[0]


def answers(model: Llama, tokenizer, conversations: list, **settings) -> list[str]:
    """The assistant's reply to each conversation (turns ending with a user turn, or a
    data.formats.Conversation), decoded as one batch, stopping at EOT or EOS."""
    from lima_core.data.encode import prompt_ids  # here: `python -m lima_core.data` must not find it imported already

    ids = generate_batch(model, [prompt_ids(tokenizer, c) for c in conversations],
                         stop_ids={tokenizer.eot_id, tokenizer.eos_id}, **settings)
    return [tokenizer.decode(row) for row in ids]


def answer(model: Llama, tokenizer, turns: list[str], **settings) -> str:
    """The assistant's reply to a conversation that ends with a user turn."""
    return answers(model, tokenizer, [turns], **settings)[0]


def _longest(prompts: list[list[int]], comm: Collectives | None, level: str, device) -> int:
    """The longest prompt of this rank, or of every rank of the level."""
    longest = max((len(p) for p in prompts), default=1)  # a rank without prompts decodes a 1-token row
    if comm is None:
        return longest
    longest = torch.tensor(longest, device=device)
    comm.all_reduce(longest, level, op=dist.ReduceOp.MAX)
    return int(longest)


def _anyone_decoding(rows: list[Sequence], comm: Collectives | None, level: str, device) -> bool:
    """Whether a row of this rank, or of any rank of the level, has not stopped (one host sync with `comm`)."""
    busy = any(row.finish is None for row in rows)
    if comm is None:
        return busy
    busy = torch.tensor(int(busy), dtype=torch.int32, device=device)
    comm.all_reduce(busy, level, op=dist.ReduceOp.MAX)
    return bool(busy)
