"""AdamW (the native fused op of csrc/, else torch's) and LIMA's learning-rate schedule
(linear from lr to lr_end, no warmup)."""

from __future__ import annotations

import sys

import torch


def adamw(groups: list[dict], lr: float, betas: tuple[float, float], *, fused: bool = True,
          moment_dtype: torch.dtype = torch.float32, copies: dict | None = None) -> torch.optim.Optimizer:
    """AdamW over prepared parameter groups (e.g. FSDP.param_groups: the shards only).

    fused: the native op (one pass over parameter, gradient and moments) when lima_core._C is
    built, else torch.optim.AdamW with a one-line notice. moment_dtype bfloat16 halves the
    optimizer state (moments stored with stochastic rounding) and needs the native op.
    copies ({parameter: low-precision tensor}, e.g. FSDP.param_copies()): rounded copies of the
    new parameters, written by the native op in its pass, else after each step."""
    from lima_core.native import adamw as fused_adamw

    copies = copies or {}
    if fused and fused_adamw.available():
        return fused_adamw.FusedAdamW(groups, lr=lr, betas=betas, moment_dtype=moment_dtype, copies=copies)
    if moment_dtype != torch.float32:
        why = "it was not asked for" if not fused else fused_adamw.unavailable_reason()
        raise ValueError(f"moment_dtype {moment_dtype} needs the native fused AdamW, which is not in use: {why}")
    if fused:
        print(f"lima-core: using torch.optim.AdamW: {fused_adamw.unavailable_reason()}", file=sys.stderr)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=False)
    if copies:
        optimizer.register_step_post_hook(lambda *_: _write_copies(copies))
    return optimizer


@torch.no_grad()
def _write_copies(copies: dict):
    for param, copy in copies.items():
        copy.copy_(param)


def lr_at(step: int, total_steps: int, lr: float, lr_end: float) -> float:
    """Learning rate of optimizer step `step` (0-based): lr at the first, lr_end at the last."""
    if total_steps <= 1:
        return lr
    return lr + (lr_end - lr) * step / (total_steps - 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr
