"""The model's fused operations, in one place, so the model never chooses an implementation.

Each function here has the signature of the `lima_kernels` op of the same name. Today they run
the plain-torch references of `lima_kernels.reference` (exact HF numerics, differentiable,
any device).
"""

from __future__ import annotations

from lima_kernels import reference

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 chain): keys the dropout masks by
    (seed, step, micro-batch, layer, sublayer) so any recomputation reproduces them."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def rms_norm(x, weight, eps):
    return reference.rms_norm(x, weight, eps)


def rotary(x, cos, sin):
    """x [b, s, h, d] with cos, sin [b, s, d] (broadcast over heads)."""
    return reference.rotary(x, cos, sin)


def dropout_add(x, residual, p: float, seed: int, offset: int = 0):
    """residual + dropout(x, p); the mask is a function of (seed, offset, element index)."""
    if p == 0.0:
        return residual + x
    return reference.dropout_add(x, residual, p, seed, offset)


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100):
    """(sum of token losses in fp32, number of target tokens) of the LM head on hidden."""
    return reference.linear_cross_entropy(hidden, weight, labels, ignore_index)
