"""The model's fused operations, in one place, so the model never chooses an implementation.

Each function has the signature of the `lima_kernels` op of the same name plus `kernels`,
the model's `kernels` choice (`Llama(cfg, kernels=...)`): "triton" runs the Triton kernel, "torch" the plain-torch
reference (`lima_kernels.reference`: HF numerics, differentiable, any device), and "auto" the
kernel on CUDA tensors and the reference elsewhere. Both compute the same function, dropout
masks included: the reference draws Triton's Philox stream bit for bit with
`lima_core.native.philox_uniform.uniform` (the native CPU op when lima_core/_C.so is built, else the
plain-torch emulation, which gives the same bits).
"""

from __future__ import annotations

import lima_kernels
from lima_core.native import philox_uniform
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


def _impl(x, kernels: str):
    """The module holding the implementation for tensor x under the `kernels` choice."""
    return lima_kernels if kernels == "triton" or (kernels == "auto" and x.is_cuda) else reference


def rms_norm(x, weight, eps: float, kernels: str = "auto"):
    return _impl(x, kernels).rms_norm(x, weight, eps)


def rotary(x, cos, sin, kernels: str = "auto"):
    """x [b, s, h, d] with cos, sin [b, s, d] (broadcast over heads)."""
    return _impl(x, kernels).rotary(x, cos, sin)


def dropout_add(x, residual, p: float, seed: int, kernels: str = "auto"):
    """residual + dropout(x, p); the mask is a function of (seed, element index)."""
    impl = _impl(x, kernels)
    if impl is reference:
        return reference.dropout_add(x, residual, p, seed, 0, uniform=philox_uniform.uniform)
    return impl.dropout_add(x, residual, p, seed, 0)


def dropout_add_rms_norm(x, residual, weight, p: float, seed: int, eps: float, kernels: str = "auto"):
    """(h, rms_norm(h)) with h = residual + dropout(x, p), in one pass on the kernel path."""
    impl = _impl(x, kernels)
    if impl is reference:
        return reference.dropout_add_rms_norm(x, residual, weight, p, seed, 0, eps, uniform=philox_uniform.uniform)
    return impl.dropout_add_rms_norm(x, residual, weight, p, seed, 0, eps)


def linear_cross_entropy(hidden, weight, labels, ignore_index: int = -100, kernels: str = "auto"):
    """(sum of token losses in fp32, number of target tokens) of the LM head on hidden,
    without materialising the [tokens, vocab] logits on the kernel path. Under autocast the
    kernel path's logits are fp32 (operands cast to the autocast dtype, summed in fp32); the
    reference's follow autocast (low-precision logits, as transformers' model computes them)."""
    return _impl(hidden, kernels).linear_cross_entropy(hidden, weight.to(hidden.dtype), labels, ignore_index)
