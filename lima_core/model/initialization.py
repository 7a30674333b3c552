"""Initialisation of a sharded preset that does not depend on the number of ranks.

Each rank fills only its own part of each parameter: a parameter's flat values are drawn in
fixed chunks, each from its own generator keyed by (seed, parameter name, chunk index), so
any range of it can be drawn alone and every cut of the parameter into shards gives the same
values. (The values depend on the device type, as torch's CPU and CUDA generators differ.)
A 65B preset is thus never built in full on any rank.
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import torch

from lima_core.model.dispatch import mix_seed

if TYPE_CHECKING:  # the model package imports nothing of parallel/ at run time
    from lima_core.parallel.fsdp import FSDP

CHUNK = 1 << 20
"""Elements drawn per generator (fewer for a smaller parameter)."""


def keyed_normal(seed: int, name: str, numel: int, start: int, end: int, std: float, device) -> torch.Tensor:
    """Elements [start, end) of the flat N(0, std) initial values of the `numel`-element parameter `name`."""
    chunk = min(CHUNK, numel)
    key = zlib.crc32(name.encode())
    out = torch.empty(end - start, device=device)
    for c in range(start // chunk, math.ceil(end / chunk)):
        c0 = c * chunk
        generator = torch.Generator(device).manual_seed(mix_seed(seed, key, c))
        values = torch.empty(min(chunk, numel - c0), device=device).normal_(0.0, std, generator=generator)
        a, b = max(start, c0), min(end, c0 + values.numel())
        out[a - start:b - start] = values[a - c0:b - c0]
    return out


@torch.no_grad()
def init_sharded(sharded: FSDP, stds: dict[str, float | None], seed: int):
    """Fill this rank's shards of a model built on the meta device: N(0, std) where `stds`
    (Llama.init_stds, taken before sharding) gives a std, ones where it gives None."""
    for unit in sharded.units:
        lo, hi = unit.local_range
        for slot in unit.slots:
            a, b = max(lo, slot.offset), min(hi, slot.offset + slot.numel)
            if b <= a:
                continue
            std = stds[slot.name]
            if std is None:
                values = torch.ones(b - a, device=unit.shard.device)
            else:
                values = keyed_normal(seed, slot.name, slot.numel, a - slot.offset, b - slot.offset, std,
                                      unit.shard.device)
            unit.write_range(a, values)
