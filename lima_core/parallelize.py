"""`parallelize(model, ...)`: training transformations applied to a pure Llama from outside.

Order: 1. optional torch.compile of each Block's forward (innermost, so compiled code sees
plain tensors only); 2. activation checkpointing wraps that forward; 3. FSDP removes the
parameters into sharded flat units and hooks gather/free/reduce-scatter around each unit,
outside the checkpointed region, so a recomputed forward finds the block already gathered
(by the gradient hook on its output) and never gathers twice. compile is untested here.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lima_core.checkpointing import apply_checkpointing
from lima_core.fsdp import FSDP, fully_shard


def parallelize(model: nn.Module, *, group=None, checkpointing: str = "block", device=None,
                param_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32,
                compile: bool = False) -> FSDP:
    """Compile (optional), checkpointing, then FSDP over `group` (None: one process)."""
    if compile:
        for block in model.layers:
            block.forward = torch.compile(block.forward)
    apply_checkpointing(model.layers, checkpointing)
    return fully_shard(model, group, device=device, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
