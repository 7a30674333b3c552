"""Activation checkpointing policies for the Blocks of a Llama, applied from outside the model.

- "none": autograd keeps every activation a Block's backward needs.
- "block": each Block keeps only its inputs and recomputes its forward during backward
  (torch.utils.checkpoint, non-reentrant).
- "selective": like "block", but the outputs of matrix multiplications and attention are kept
  and only the cheap elementwise work (norms, rotary, SwiGLU, dropout) is recomputed.

Recomputation is exact: residual-dropout masks come from a counter-based RNG keyed by the
`dropout_seed` argument that the recomputed forward receives again. The Block's forward is
replaced on the instance only, so parameter names and state-dict keys do not change.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lima_core.config import CHECKPOINTING

# Matmul-like ops whose outputs the selective policy keeps (the expensive part to recompute).
_SAVE = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.linear.default, torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _keep_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_keep_matmuls)


def _checkpointed(forward, context_fn):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)
    return run


def apply_checkpointing(blocks: nn.ModuleList | list[nn.Module], policy: str):
    """Make each block recompute its forward in backward according to `policy` (in place)."""
    if policy not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {', '.join(CHECKPOINTING)}, got {policy!r}")
    if policy == "none":
        return
    context_fn = _selective_context if policy == "selective" else _noop_context
    for block in blocks:
        block.forward = _checkpointed(block.forward, context_fn)


def _noop_context():
    from torch.utils.checkpoint import noop_context_fn

    return noop_context_fn()
