"""The KV cache of incremental decoding: keys and values of past positions, one tensor pair a
layer, [b, max_len, hkv, d]. It owns its tensors: the decode core (lima_core.inference.decode)
builds one for a batch of prompts, asks it to keep some rows or to join other caches' rows
(`merge`), and the model appends through `layer(i).update`; nobody else touches them.

Every row of a batch writes its next key at the same slot, so rows are right-aligned: each row's
tokens end at the last filled slot, and the slots before its first token are padding, hidden
from attention by `padding`. Keys are rotated before they are cached and positions are per row,
so moving a row's keys between slots changes nothing.
"""

from __future__ import annotations

import torch

from lima_core.model.shapes import ModelConfig


class KVCache:
    """Keys and values of past positions for incremental decoding, [b, max_len, hkv, d] per layer.

    `padding` [b, max_len] (True: a slot that holds no token, e.g. the left padding of a
    shorter prompt in a batch) keeps those slots out of every real query's attention."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype, padding=None):
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.cfg = cfg
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.max_len = max_len
        self.padding = padding

    @classmethod
    def merge(cls, parts: list[tuple[KVCache, torch.Tensor]], spans: torch.Tensor, free_slots: int) -> KVCache:
        """The rows `index` of each `(cache, index)` part, in order, in one new cache with
        `free_slots` slots after the longest row. `spans` [rows] is how many tokens each kept row
        holds (its next position). Each row's keys and values move to end at the new cache's last
        filled slot. Costs one copy of the kept rows."""
        first = parts[0][0]
        device, dtype = spans.device, first.k[0].dtype
        length = int(spans.max())
        slots = torch.arange(length + free_slots, device=device)
        merged = cls(first.cfg, len(spans), length + free_slots, device, dtype,
                     padding=slots[None, :] < (length - spans)[:, None])  # [rows, slots]
        row = 0
        for old, index in parts:
            width = min(length, old.length)  # a row's tokens lie in the old cache's last `width` slots
            for new_k, new_v, k, v in zip(merged.k, merged.v, old.k, old.v):
                new_k[row:row + len(index), length - width:length] = k[index, old.length - width:old.length]
                new_v[row:row + len(index), length - width:length] = v[index, old.length - width:old.length]
            row += len(index)
        merged.advance(length)
        return merged

    def key_mask(self, end: int):
        """[b, end] True where a key may be attended to; None when nothing is padding."""
        return None if self.padding is None else ~self.padding[:, :end]

    def layer(self, i: int) -> _LayerCache:
        return _LayerCache(self, i)

    def advance(self, n: int):
        self.length += n


class _LayerCache:
    """Layer i's view of the cache, as the model's attention sees it."""

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k, v):
        """Append k, v [b, t, hkv, d] after the filled slots; returns every filled slot's keys and values."""
        c, start = self.cache, self.cache.length
        end = start + k.shape[1]
        if end > c.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {c.max_len}")
        c.k[self.i][:, start:end] = k
        c.v[self.i][:, start:end] = v
        return c.k[self.i][:, :end], c.v[self.i][:, :end]

    def key_mask(self, end: int):
        return self.cache.key_mask(end)
