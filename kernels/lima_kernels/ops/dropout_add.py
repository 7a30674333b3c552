"""Residual dropout fused with the residual add: new_residual = residual + dropout_p(x).

What (docs/design.md, decision 4, LIMA's residual dropout): dropout_p keeps element i (of x
flattened row-major) iff u_i >= float32(p), where u_i = tl.rand(seed, offset + i) (Philox,
counter offset + i), and scales kept values by 1 / (1 - p). The mask is never stored:
backward recomputes it from (seed, offset), so activation checkpointing reproduces it
exactly. p is a Python float (the per-layer ramp); p == 0 skips the RNG and the kernel
(plain `residual + x`). One elementwise kernel serves both directions: with a residual it
is the forward, without one the backward (dx = dropout_p(dy), same mask). The variant fused
with the RMSNorm that follows, dropout_add_rms_norm, lives in rms_norm.py (it shares
RMSNorm's kernels).

Numerics: the sum is formed in fp32 and rounded once to promote(x, residual).

Reference: `lima_kernels.reference.dropout_add`, whose mask is the same bit for bit
(reference.philox_uniform reproduces tl.rand).

Limits: 0 <= p < 1; seed in [0, 2**63); residual has x's shape (no broadcasting);
independent masks need distinct seeds or disjoint counter ranges [offset, offset + numel);
no gradient for p/seed/offset.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .._utils import check_device, check_dropout_args, check_same_shape, interpreting

# ----------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------


@triton.jit
def _dropout_add_kernel(
    X, R, Y,
    numel, p, scale, seed, offset,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Y = R + where(keep, X * scale, 0) over flat contiguous tensors; without R it is the
    backward (dX = where(keep, dY * scale, 0))."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] int64
    mask = idx < numel
    x = tl.load(X + idx, mask=mask, other=0.0).to(tl.float32)
    keep = tl.rand(seed, offset + idx) >= p
    y = tl.where(keep, x * scale, 0.0)
    if HAS_RESIDUAL:
        y += tl.load(R + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + idx, y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launcher (flat)
# ----------------------------------------------------------------------------------------


def dropout_add_config() -> tuple[int, int]:
    """(BLOCK, num_warps) of _dropout_add_kernel: 4096 elements a program."""
    return (4096, 1) if interpreting() else (4096, 8)


def dropout_add_launch(
    x: torch.Tensor, residual: Optional[torch.Tensor], p: float, seed: int, offset: int, out_dtype: torch.dtype
) -> torch.Tensor:
    """x, residual [numel] -> residual + dropout(x) [numel] in out_dtype (residual None:
    dropout(x) alone, the backward)."""
    tensors = (x,) if residual is None else (x, residual)
    check_device(*tensors)
    x = x.contiguous()
    residual = None if residual is None else residual.contiguous()
    numel = x.numel()
    y = torch.empty((numel,), dtype=out_dtype, device=x.device)
    if numel == 0:
        return y
    block, num_warps = dropout_add_config()
    _dropout_add_kernel[(triton.cdiv(numel, block),)](
        x, x if residual is None else residual, y,
        numel, p, 1.0 / (1.0 - p), seed, offset,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    return y


# ----------------------------------------------------------------------------------------
# Autograd: torch.library custom ops with fake and autograd registrations
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("lima_kernels::dropout_add", mutates_args=())
def _dropout_add_op(x: torch.Tensor, residual: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    return dropout_add_launch(x, residual, p, seed, offset, torch.promote_types(x.dtype, residual.dtype))


@_dropout_add_op.register_fake
def _(x, residual, p, seed, offset):
    return x.new_empty((x.numel(),), dtype=torch.promote_types(x.dtype, residual.dtype))


@torch.library.custom_op("lima_kernels::dropout_bwd", mutates_args=())
def _dropout_bwd_op(dy: torch.Tensor, p: float, seed: int, offset: int, x_dtype: torch.dtype) -> torch.Tensor:
    return dropout_add_launch(dy, None, p, seed, offset, x_dtype)


@_dropout_bwd_op.register_fake
def _(dy, p, seed, offset, x_dtype):
    return dy.new_empty((dy.numel(),), dtype=x_dtype)


def _dropout_add_setup_context(ctx, inputs, output):
    x, residual, p, seed, offset = inputs
    ctx.p, ctx.seed, ctx.offset = p, seed, offset
    ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype


def _dropout_add_backward(ctx, dy):
    dx = _dropout_bwd_op(dy, ctx.p, ctx.seed, ctx.offset, ctx.x_dtype)
    return dx, dy.to(ctx.r_dtype), None, None, None


_dropout_add_op.register_autograd(_dropout_add_backward, setup_context=_dropout_add_setup_context)


# ----------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """residual + dropout_p(x), mask from tl.rand(seed, offset + flat index of x)."""
    check_dropout_args(p, seed, offset)
    check_same_shape(x, residual)
    if p == 0.0:
        return residual + x
    y = _dropout_add_op(x.reshape(-1), residual.reshape(-1), float(p), seed, offset)  # [numel]
    return y.view(x.shape)  # [numel] -> x.shape
