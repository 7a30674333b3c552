"""Residual dropout fused with the residual add, and with the RMSNorm that follows.

What (DESIGN.md decision 4, LIMA's residual dropout):
    dropout_add:          new_residual = residual + dropout_p(x)
    dropout_add_rms_norm: (new_residual, rms_norm(new_residual, weight, eps)) in one pass
dropout_p keeps element i (of x flattened row-major) iff u_i >= float32(p), where
u_i = tl.rand(seed, offset + i) (Philox, counter offset + i), and scales kept values by
1 / (1 - p). The mask is never stored: backward recomputes it from (seed, offset), so
activation checkpointing reproduces it exactly. p is a Python float (the per-layer ramp);
p == 0 skips the RNG (dropout_add then is plain `residual + x`).

Numerics: the sum is formed in fp32 and rounded once to promote(x, residual); the fused
norm then follows HF LlamaRMSNorm on that rounded residual (fp32 statistics, normalized
value rounded to the residual dtype, times weight in fp32, rounded to the output dtype).
The RMSNorm weight gradient is reduced without atomics (per-program fp32 partials, then a
second reduction), as in rms_norm.py.

Reference: `lima_kernels.reference.dropout_add` / `dropout_add_rms_norm`, whose mask is the
same bit for bit (reference.philox_uniform reproduces tl.rand); re-exported here as
`dropout_add_reference` / `dropout_add_rms_norm_reference`.

Limits: 0 <= p < 1; seed in [0, 2**63); residual has x's shape (no broadcasting);
independent masks need distinct seeds or disjoint counter ranges [offset, offset + numel);
hidden size <= 65536 for the fused op; no gradient for p/seed/offset.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .._utils import check_device, interpreting, num_programs_persistent, row_config

# ----------------------------------------------------------------------------------------
# Kernels
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


@triton.jit
def _dropout_add_rms_norm_fwd_kernel(
    X, R, W, Z, Y, RSTD,
    M, N, stride_x, stride_r, stride_z, stride_y,
    p, scale, seed, offset, eps,
    HAS_DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]  # [BLOCK_M, BLOCK_N]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        flat = rows[:, None] * N + cols[None, :]  # [BLOCK_M, BLOCK_N] row-major index into x
        keep = tl.rand(seed, offset + flat) >= p
        x = tl.where(keep, x * scale, 0.0)
    # New residual, rounded to its dtype; the norm reads the rounded value (as HF would).
    z = (r + x).to(Z.dtype.element_ty)
    tl.store(Z + rows[:, None] * stride_z + cols[None, :], z, mask=mask)
    z = z.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(z * z, axis=1) / N + eps)  # [BLOCK_M] fp32
    z_hat = (z * rstd[:, None]).to(Z.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)  # [BLOCK_N]
    y = w[None, :] * z_hat
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _dropout_add_rms_norm_bwd_kernel(
    DZ, DY, Z, W, RSTD, DX, DR, DW_PARTIAL,
    M, N, stride_dz, stride_dy, stride_z, stride_dx, stride_dr, rows_per_program,
    p, scale, seed, offset,
    HAS_DZ: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_mask = cols < N
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)  # [BLOCK_N]
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = (r0 + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]  # [BLOCK_M, BLOCK_N]
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)  # [BLOCK_M]
        z_hat = z * rstd[:, None]
        dw_acc += tl.sum(dy * z_hat.to(Z.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]
        c = tl.sum(g * z_hat, axis=1) / N  # [BLOCK_M]
        dz = (g - z_hat * c[:, None]) * rstd[:, None]  # through the norm
        if HAS_DZ:  # plus the gradient arriving on the residual stream itself
            dz += tl.load(DZ + rows[:, None] * stride_dz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DR + rows[:, None] * stride_dr + cols[None, :], dz.to(DR.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            flat = rows[:, None] * N + cols[None, :]  # same counters as the forward
            keep = tl.rand(seed, offset + flat) >= p
            dz = tl.where(keep, dz * scale, 0.0)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=col_mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def _check_args(p: float, seed, offset) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if isinstance(seed, int) and not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if isinstance(offset, int) and offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
    block, num_warps = (4096, 1) if interpreting() else (4096, 8)
    _dropout_add_kernel[(triton.cdiv(numel, block),)](
        x, x if residual is None else residual, y,
        numel, p, 1.0 / (1.0 - p), seed, offset,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    return y


def dropout_add_rms_norm_fwd(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, p: float, seed: int, offset: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual [M, N], weight [N] -> (new_residual [M, N], normed [M, N], rstd [M])."""
    check_device(x, residual, weight)
    x = _last_dim_contiguous(x)
    residual = _last_dim_contiguous(residual)
    weight = weight.contiguous()
    m, n = x.shape
    z_dtype = torch.promote_types(x.dtype, residual.dtype)
    z = torch.empty((m, n), dtype=z_dtype, device=x.device)
    y = torch.empty((m, n), dtype=torch.promote_types(z_dtype, weight.dtype), device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return z, y, rstd
    block_m, block_n, num_warps = row_config(n)
    _dropout_add_rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, residual, weight, z, y, rstd,
        m, n, x.stride(0), residual.stride(0), z.stride(0), y.stride(0),
        p, 1.0 / (1.0 - p), seed, offset, eps,
        HAS_DROPOUT=p > 0.0, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return z, y, rstd


def dropout_add_rms_norm_bwd(
    dz: Optional[torch.Tensor], dy: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    p: float, seed: int, offset: int, x_dtype: torch.dtype, r_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (new_residual, normed) [M, N] -> (dx [M, N], dresidual [M, N], dweight [N])."""
    check_device(dy, z, weight, rstd)
    dy = _last_dim_contiguous(dy)
    dz = None if dz is None else _last_dim_contiguous(dz)
    weight = weight.contiguous()
    m, n = z.shape
    dx = torch.empty((m, n), dtype=x_dtype, device=z.device)
    dr = torch.empty((m, n), dtype=r_dtype, device=z.device)
    if m == 0:
        return dx, dr, torch.zeros_like(weight)
    block_m, block_n, num_warps = row_config(n)
    programs = max(1, min(num_programs_persistent(z.device), triton.cdiv(m, block_m)))
    rows_per_program = triton.cdiv(m, programs)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=z.device)  # [programs, N]
    _dropout_add_rms_norm_bwd_kernel[(programs,)](
        dy if dz is None else dz, dy, z, weight, rstd, dx, dr, dw_partial,
        m, n, dy.stride(0) if dz is None else dz.stride(0), dy.stride(0), z.stride(0),
        dx.stride(0), dr.stride(0), rows_per_program,
        p, 1.0 / (1.0 - p), seed, offset,
        HAS_DZ=dz is not None, HAS_DROPOUT=p > 0.0,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    dw = dw_partial.sum(dim=0).to(weight.dtype)  # [N]: second-stage reduction, fp32
    return dx, dr, dw


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


@torch.library.custom_op("lima_kernels::dropout_add_rms_norm_fwd", mutates_args=())
def _dropout_add_rms_norm_fwd_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, p: float, seed: int, offset: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dropout_add_rms_norm_fwd(x, residual, weight, p, seed, offset, eps)


@_dropout_add_rms_norm_fwd_op.register_fake
def _(x, residual, weight, p, seed, offset, eps):
    m, n = x.shape
    z_dtype = torch.promote_types(x.dtype, residual.dtype)
    z = x.new_empty((m, n), dtype=z_dtype)
    y = x.new_empty((m, n), dtype=torch.promote_types(z_dtype, weight.dtype))
    return z, y, x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("lima_kernels::dropout_add_rms_norm_bwd", mutates_args=())
def _dropout_add_rms_norm_bwd_op(
    dz: Optional[torch.Tensor], dy: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    p: float, seed: int, offset: int, x_dtype: torch.dtype, r_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return dropout_add_rms_norm_bwd(dz, dy, z, weight, rstd, p, seed, offset, x_dtype, r_dtype)


@_dropout_add_rms_norm_bwd_op.register_fake
def _(dz, dy, z, weight, rstd, p, seed, offset, x_dtype, r_dtype):
    m, n = z.shape
    return (
        z.new_empty((m, n), dtype=x_dtype),
        z.new_empty((m, n), dtype=r_dtype),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


def _dropout_add_rms_norm_setup_context(ctx, inputs, output):
    x, residual, weight, p, seed, offset, _eps = inputs
    z, _y, rstd = output
    ctx.save_for_backward(z, weight, rstd)
    ctx.p, ctx.seed, ctx.offset = p, seed, offset
    ctx.x_dtype, ctx.r_dtype = x.dtype, residual.dtype


def _dropout_add_rms_norm_backward(ctx, dz, dy, _drstd):
    z, weight, rstd = ctx.saved_tensors
    dx, dr, dw = _dropout_add_rms_norm_bwd_op(
        dz, dy, z, weight, rstd, ctx.p, ctx.seed, ctx.offset, ctx.x_dtype, ctx.r_dtype
    )
    return dx, dr, dw, None, None, None, None


_dropout_add_rms_norm_fwd_op.register_autograd(
    _dropout_add_rms_norm_backward, setup_context=_dropout_add_rms_norm_setup_context
)


# ----------------------------------------------------------------------------------------
# Public functions and module
# ----------------------------------------------------------------------------------------


def _check_shapes(x: torch.Tensor, residual: torch.Tensor) -> None:
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """residual + dropout_p(x), mask from tl.rand(seed, offset + flat index of x)."""
    _check_args(p, seed, offset)
    _check_shapes(x, residual)
    if p == 0.0:
        return residual + x
    y = _dropout_add_op(x.reshape(-1), residual.reshape(-1), float(p), seed, offset)  # [numel]
    return y.view(x.shape)  # [numel] -> x.shape


def dropout_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new_residual, rms_norm(new_residual, weight, eps)) with new_residual =
    residual + dropout_p(x), in one pass over x [..., N] and residual [..., N]."""
    _check_args(p, seed, offset)
    _check_shapes(x, residual)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [..., N] -> [M, N]
    r2 = residual.reshape(-1, shape[-1])  # [..., N] -> [M, N]
    z, y, _rstd = _dropout_add_rms_norm_fwd_op(x2, r2, weight, float(p), seed, offset, float(eps))
    return z.view(shape), y.view(shape)  # [M, N] -> [..., N]


class DropoutAddRMSNorm(torch.nn.Module):
    """Residual dropout at rate p fused with the residual add and the following RMSNorm.

    forward(x, residual, seed, offset) -> (new_residual, normed); in eval mode the
    dropout is off (p = 0)."""

    def __init__(self, hidden_size: int, p: float, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        _check_args(p, 0, 0)
        self.p = p
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor, seed: int, offset: int):
        p = self.p if self.training else 0.0
        return dropout_add_rms_norm(x, residual, self.weight, p, seed, offset, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, p={self.p}, eps={self.variance_epsilon}"


# ----------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------

dropout_add_reference = reference.dropout_add
dropout_add_rms_norm_reference = reference.dropout_add_rms_norm
