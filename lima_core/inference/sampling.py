"""Choosing the next token the way `transformers` does: CTRL's repetition penalty, temperature,
nucleus (top-p) sampling, greedy at temperature 0. LIMA's settings are the defaults
(lima_core.config.SamplingConfig: p 0.9, temperature 0.7, penalty 1.2).
"""

from __future__ import annotations

import math

import torch

from lima_core.config import SamplingConfig

LIMA = SamplingConfig()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as transformers applies it): seen tokens' logits divided by the penalty
    when positive, multiplied when negative. logits [b, vocab], seen [b, vocab] bool."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """One token per row of logits [b, vocab] -> [b]: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it does.
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # [b, 1]
    return order.gather(-1, choice)[:, 0]


def check_settings(max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float):
    """The sampling settings' ranges (SamplingConfig's, for callers of the Python API)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1: none), got {repetition_penalty}")
