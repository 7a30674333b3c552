"""The KV cache of incremental decoding: keys and values of past positions, one tensor pair a
layer, [b, max_len, hkv, d]. It owns its tensors: the decode core (lima_core.inference.decode)
asks it to keep some rows, to join another cache, or to append, and never touches them itself.
"""

from __future__ import annotations

import torch

from lima_core.model.config import ModelConfig


class KVCache:
    """Keys and values of past positions for incremental decoding, [b, max_len, hkv, d] per layer.

    `padding` [b, max_len] (True: a slot that holds no token, e.g. the left padding of a
    shorter prompt in a batch) keeps those slots out of every real query's attention."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype, padding=None):
        shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.max_len = max_len
        self.padding = padding

    def key_mask(self, end: int):
        """[b, end] True where a key may be attended to; None when nothing is padding."""
        return None if self.padding is None else ~self.padding[:, :end]

    def layer(self, i: int) -> "_LayerCache":
        return _LayerCache(self, i)

    def advance(self, n: int):
        self.length += n


class _LayerCache:
    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, k, v):
        c, start = self.cache, self.cache.length
        end = start + k.shape[1]
        if end > c.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {c.max_len}")
        c.k[self.i][:, start:end] = k
        c.v[self.i][:, start:end] = v
        return c.k[self.i][:, :end], c.v[self.i][:, :end]

    def key_mask(self, end: int):
        return self.cache.key_mask(end)
