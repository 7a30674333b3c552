"""`parallelize(model, ...)`: training transformations applied to a pure Llama from outside.

Order: 1. activation checkpointing wraps each Block's forward; 2. FSDP removes the parameters
into sharded flat units and hooks gather/free/reduce-scatter around each unit, outside the
checkpointed region, so a recomputed forward finds the block already gathered (by the gradient
hook on its output) and never gathers twice. The blocks run eagerly (no torch.compile).
FSDP's collectives go through the run's `Collectives` (lima_core.parallel.topology), flat over
every rank or two-level (inside the node, then across; lima_core.parallel.fsdp lists what each
moves).

`llama_units` is LLaMA's unit list, read by FSDP and by the planner (lima_core.parallel.planning) alike.
The process groups themselves are lima_core.parallel.distributed's.
"""

from __future__ import annotations

import torch

from lima_core.model.llama import Llama
from lima_core.parallel.checkpointing import apply_checkpointing
from lima_core.parallel.fsdp import FSDP, UnitSpec, fully_shard
from lima_core.parallel.topology import Collectives


def llama_units(model: Llama) -> list[UnitSpec]:
    """The embeddings, each Block, and the final norm with the head, in forward order.

    Untied, the embedding's backward never reads its weight, so it is not gathered for it, and
    the head stays gathered from its forward to its backward, which follows at once. Tied, the
    head is part of the embedding unit, kept gathered from the first layer to the last."""
    tied = bool(model.output.tied)
    head = [model.norm, model.output]
    if tied:
        units = [UnitSpec("tok_embeddings", [model.tok_embeddings, *head], reshard_after_forward=False)]
    else:
        units = [UnitSpec("tok_embeddings", [model.tok_embeddings], gather_for_backward=False)]
    units += [UnitSpec(f"layers.{i}", [block]) for i, block in enumerate(model.layers)]
    if not tied:
        units.append(UnitSpec("head", head, reshard_after_forward=False))
    return units


def unit_numels(units: list[UnitSpec]) -> list[int]:
    """Parameter count of each unit (a parameter shared within a unit once)."""
    return [sum(p.numel() for p in {id(p): p for m in u.modules for p in m.parameters()}.values()) for u in units]


def parallelize(model: Llama, *, comm: Collectives | None = None, group=None, sharding: str = "flat",
                checkpointing: str = "block", device=None, param_dtype: torch.dtype = torch.float32,
                reduce_dtype: torch.dtype = torch.float32) -> FSDP:
    """Activation checkpointing, then FSDP over the ranks of `comm` (or of `group` alone, flat;
    neither: one process), `sharding` "flat" or "two-level" (flat on one node or nodes of one rank)."""
    apply_checkpointing(model.layers, checkpointing)
    return fully_shard(model, llama_units(model), group, comm=comm, sharding=sharding, device=device,
                       param_dtype=param_dtype, reduce_dtype=reduce_dtype)
