"""A global batch -> packed rows: best-fit decreasing into rows of at most `max_len` tokens, with
`cu_seqlens` marking the examples and positions restarting at 0 in each, so no padding is ever
computed. Rows are strided across ranks (`shard_batch`) and the epoch's order comes from the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lima_core.data.encode import IGNORE, Example


@dataclass
class Row:
    """Examples packed into one row: tokens, labels, positions [1, n]; cu_seqlens [k + 1]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device) -> "Row":
        def move(t):
            return t.to(device, non_blocking=True)

        return Row(move(self.tokens), move(self.labels), move(self.positions), move(self.cu_seqlens), self.max_seqlen)


def pack(examples: list[Example], max_len: int) -> list[Row]:
    """Pack examples into as few rows of at most max_len tokens as we can find, deterministically.

    Every row is a micro-batch (a full parameter all-gather at 65B), so fewer rows make a faster
    step; the loss is normalized over the whole global batch (RankBatch.num_targets), so the
    packing does not change it. Best-fit decreasing, or the examples in order where that needs
    fewer rows (BFD is not optimal: lengths 3, 2, 2, 3, 2, 2 fill two rows of 7 in order, three
    by BFD). An example longer than max_len gets a row of its own."""
    lengths = [len(e.ids) for e in examples]
    rows = min(best_fit_decreasing(lengths, max_len), in_order(lengths, max_len), key=len)
    return [_row([examples[i] for i in row]) for row in rows]


def best_fit_decreasing(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices of each row: longest first (ties in order), each into the fullest row it fits, else a new row."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if used[r] + lengths[i] <= max_len]
        if fits:
            best = max(fits, key=lambda r: used[r])  # the first of the fullest
            rows[best].append(i)
            used[best] += lengths[i]
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


def in_order(sizes: list[int], capacity: int) -> list[list[int]]:
    """The indices of the items in each bin, in order: a bin closes when the next item would take
    it past `capacity`, and an item larger than `capacity` gets a bin of its own. No items, no bins.

    Examples into rows of at most max_len tokens (the packing best-fit decreasing is weighed
    against), and tensors into safetensors files of at most max_shard_bytes
    (checkpoint.sharded: the rule transformers shards by)."""
    bins: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if not bins or used + size > capacity:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += size
    return bins


def _row(examples: list[Example]) -> Row:
    lengths = [len(e.ids) for e in examples]
    tokens = torch.tensor([i for e in examples for i in e.ids]).unsqueeze(0)  # [1, n]
    labels = torch.tensor([i for e in examples for i in e.labels]).unsqueeze(0)  # [1, n]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)  # [1, n]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # [k + 1]
    return Row(tokens, labels, positions, cu_seqlens, max(lengths))


@dataclass
class RankBatch:
    """One rank's share of a global batch: its rows, each with the row's index in the global
    batch (None for an idle row: a rank with fewer rows runs an all-ignored copy of a row, so
    every rank issues the same collectives), and the global batch's counts."""

    rows: list[tuple[int | None, Row]]
    num_targets: int
    """Target tokens of the whole global batch: the loss is normalized by it on every rank."""
    num_tokens: int
    """Tokens of the whole global batch."""


def shard_batch(batch: list[Example], max_len: int, rank: int = 0, world: int = 1) -> RankBatch:
    """Pack the global batch (every rank the same way, no collective) and take rows[rank::world]."""
    rows = pack(batch, max_len)
    mine: list[tuple[int | None, Row]] = [(i, rows[i]) for i in range(rank, len(rows), world)]
    idle = Row(rows[0].tokens, torch.full_like(rows[0].labels, IGNORE), rows[0].positions, rows[0].cu_seqlens,
               rows[0].max_seqlen)
    mine += [(None, idle)] * (math.ceil(len(rows) / world) - len(mine))
    return RankBatch(mine, sum(r.num_targets for r in rows), sum(r.tokens.numel() for r in rows))


def epoch_batches(examples: list[Example], batch_size: int, epoch: int, seed: int) -> list[list[Example]]:
    """The epoch's examples in a seeded random order, cut into global batches (the last may be short)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    shuffled = [examples[i] for i in order]
    return [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]
