"""RMSNorm, alone or fused with residual dropout and the residual add, in Triton.

What: one forward kernel and one backward kernel serve both ops, their variants chosen by
`tl.constexpr` flags (as flash-attention's ops/triton/layer_norm.py does):
    rms_norm:             y = rms_norm(x, weight, eps)
    dropout_add_rms_norm: z = residual + dropout_p(x), then (z, rms_norm(z, weight, eps))
                          in one pass (LIMA's residual dropout, docs/design.md, decision 4)
rms_norm(z) follows HF LlamaRMSNorm: statistics in fp32, the normalized value rounded to
z's dtype before the weight multiply (HF's cast order), the product in fp32 rounded once to
the output dtype (promote(z.dtype, weight.dtype), as torch does for `weight * h`). With a
residual, z is formed in fp32 and rounded once to promote(x, residual), and the norm reads
the rounded z (as HF would). dropout_p keeps element i of x (flattened row-major) iff
tl.rand(seed, offset + i) >= float32(p), and scales kept values by 1 / (1 - p); the mask is
never stored: backward recomputes it from (seed, offset), so activation checkpointing
reproduces it exactly. p == 0 compiles the RNG out.

Backward recomputes z_hat from z (x for plain RMSNorm) and the saved per-row rstd, adds the
gradient arriving on the residual stream z itself when there is one, and applies the
recomputed mask for dx. The weight gradient is reduced WITHOUT atomics: each program sums
dy * z_hat over its own contiguous block of rows into an fp32 partial row, and a second
reduction (torch sum over the partials) finishes it, so bf16/fp16 weights work and the
result is deterministic.

Reference: `lima_kernels.reference.rms_norm` (= transformers' LlamaRMSNorm) and
`lima_kernels.reference.dropout_add_rms_norm`, whose mask is the same bit for bit.

Limits: the whole row lives in one block, so hidden size N <= 65536; the last dim must be
contiguous (other layouts are copied); residual has x's shape (no broadcasting); 0 <= p < 1,
seed in [0, 2**63), and independent masks need distinct seeds or disjoint counter ranges
[offset, offset + numel); no gradient of eps, p, seed or offset; double backward unsupported.
Registered as torch.library custom ops `lima_kernels::rms_norm_fwd` / `rms_norm_bwd` and
`lima_kernels::dropout_add_rms_norm_fwd` / `dropout_add_rms_norm_bwd` (fake + autograd
registered), so torch.compile traces through without graph breaks.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from .._utils import (
    check_device,
    check_dropout_args,
    check_same_shape,
    last_dim_contiguous,
    num_programs_persistent,
    row_config,
)

# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    X, R, W, Z, Y, RSTD,
    M, N, stride_x, stride_r, stride_z, stride_y,
    eps, p, scale, seed, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Y = W * norm(Z) row by row, with Z = R + dropout(X) stored (HAS_RESIDUAL) or Z = X
    (then Z is X itself and only its dtype is read)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BLOCK_M]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]  # [BLOCK_M, BLOCK_N]
    z = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        flat = rows[:, None] * N + cols[None, :]  # [BLOCK_M, BLOCK_N] row-major index into x
        keep = tl.rand(seed, offset + flat) >= p
        z = tl.where(keep, z * scale, 0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # New residual, rounded to its dtype; the norm reads the rounded value (as HF would).
        z = (r + z).to(Z.dtype.element_ty)
        tl.store(Z + rows[:, None] * stride_z + cols[None, :], z, mask=mask)
        z = z.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(z * z, axis=1) / N + eps)  # [BLOCK_M] fp32
    # HF cast order: normalize in fp32, round to z's dtype, then multiply by the weight.
    z_hat = (z * rstd[:, None]).to(Z.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)  # [BLOCK_N]
    y = w[None, :] * z_hat
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, DZ, Z, W, RSTD, DX, DR, DW_PARTIAL,
    M, N, stride_dy, stride_dz, stride_z, stride_dx, stride_dr, rows_per_program,
    p, scale, seed, offset,
    HAS_DZ: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """From DY (gradient of the normed output) and, with HAS_DZ, DZ (gradient arriving on
    the residual stream Z itself): DR = dL/dZ (HAS_RESIDUAL), DX = dL/dX (through the
    recomputed mask with HAS_DROPOUT), and per-program fp32 partial rows of dL/dW."""
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
        # y = w * cast(z_hat): dL/dw sums dy * cast(z_hat); the cast passes gradients through.
        dw_acc += tl.sum(dy * z_hat.to(Z.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]  # dL/dz_hat
        c = tl.sum(g * z_hat, axis=1) / N  # [BLOCK_M]
        dz = (g - z_hat * c[:, None]) * rstd[:, None]  # through the norm
        if HAS_DZ:  # plus the gradient arriving on the residual stream itself
            dz += tl.load(DZ + rows[:, None] * stride_dz + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            tl.store(DR + rows[:, None] * stride_dr + cols[None, :], dz.to(DR.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            flat = rows[:, None] * N + cols[None, :]  # same counters as the forward
            keep = tl.rand(seed, offset + flat) >= p
            dz = tl.where(keep, dz * scale, 0.0)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dz.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=col_mask)


# ----------------------------------------------------------------------------------------
# Launchers (2-D, last dim contiguous)
# ----------------------------------------------------------------------------------------


def rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, eps: float,
    residual: Optional[torch.Tensor] = None, p: float = 0.0, seed: int = 0, offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, N], weight [N] (and residual [M, N]) -> (z [M, N], y [M, N], rstd [M] fp32):
    z = residual + dropout_p(x) in promote(x, residual), or x itself without a residual
    (dropout needs one); y = rms_norm(z) * weight in promote(z, weight)."""
    if residual is None and p > 0.0:
        raise ValueError("rms_norm_fwd: dropout needs a residual")
    check_device(x, weight, *(() if residual is None else (residual,)))
    x = last_dim_contiguous(x)
    weight = weight.contiguous()
    m, n = x.shape
    if residual is None:
        z = x
    else:
        residual = last_dim_contiguous(residual)
        z = torch.empty((m, n), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    y = torch.empty((m, n), dtype=torch.promote_types(z.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return z, y, rstd
    block_m, block_n, num_warps = row_config(n)
    r = x if residual is None else residual  # placeholder pointer when there is no residual
    _rms_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, r, weight, z, y, rstd,
        m, n, x.stride(0), r.stride(0), z.stride(0), y.stride(0),
        eps, p, 1.0 / (1.0 - p), seed, offset,
        HAS_RESIDUAL=residual is not None, HAS_DROPOUT=p > 0.0,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return z, y, rstd


def rms_norm_bwd(
    dy: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    dz: Optional[torch.Tensor] = None, p: float = 0.0, seed: int = 0, offset: int = 0,
    x_dtype: Optional[torch.dtype] = None, residual_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Gradients of rms_norm_fwd. dy (and dz) [M, N], gradients of y (and z); z [M, N] and
    rstd [M] from the forward -> (dx [M, N] in x_dtype (default z's), dresidual [M, N] in
    residual_dtype or None when residual_dtype is None (no residual), dweight [N])."""
    check_device(dy, z, weight, rstd)
    dy = last_dim_contiguous(dy)
    dz = None if dz is None else last_dim_contiguous(dz)
    z = last_dim_contiguous(z)
    weight = weight.contiguous()
    m, n = z.shape
    dx = torch.empty((m, n), dtype=z.dtype if x_dtype is None else x_dtype, device=z.device)
    dr = None if residual_dtype is None else torch.empty((m, n), dtype=residual_dtype, device=z.device)
    if m == 0:
        return dx, dr, torch.zeros_like(weight)
    block_m, block_n, num_warps = row_config(n)
    dz_arg = dy if dz is None else dz  # placeholder pointer when no gradient arrives on z
    dr_arg = dx if dr is None else dr  # placeholder pointer when there is no residual

    def args(programs, dw_partial=torch.float32):  # a dtype stands in for dw_partial before it exists
        return (
            dy, dz_arg, z, weight, rstd, dx, dr_arg, dw_partial,
            m, n, dy.stride(0), dz_arg.stride(0), z.stride(0), dx.stride(0), dr_arg.stride(0),
            triton.cdiv(m, programs), p, 1.0 / (1.0 - p), seed, offset,
        )

    meta = dict(
        HAS_DZ=dz is not None, HAS_RESIDUAL=dr is not None, HAS_DROPOUT=p > 0.0,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    programs = num_programs_persistent(_rms_norm_bwd_kernel, z.device, triton.cdiv(m, block_m), args, meta)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=z.device)  # [programs, N]
    _rms_norm_bwd_kernel[(programs,)](*args(programs, dw_partial), **meta)
    dw = dw_partial.sum(dim=0).to(weight.dtype)  # [N]: second-stage reduction, fp32
    return dx, dr, dw


# ----------------------------------------------------------------------------------------
# Autograd: torch.library custom ops with fake and autograd registrations
# ----------------------------------------------------------------------------------------


def _fake_fwd(x, residual, weight):
    """Fake (z, y, rstd) of rms_norm_fwd for x [M, N]; residual None: z is x."""
    m, n = x.shape
    z_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    z = x.new_empty((m, n), dtype=z_dtype)
    y = x.new_empty((m, n), dtype=torch.promote_types(z_dtype, weight.dtype))
    return z, y, x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("lima_kernels::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _x, y, rstd = rms_norm_fwd(x, weight, eps)
    return y, rstd


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps):
    _z, y, rstd = _fake_fwd(x, None, weight)
    return y, rstd


@torch.library.custom_op("lima_kernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, _dr, dw = rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape), torch.empty_like(weight, memory_format=torch.contiguous_format)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd_op(dy, x, weight, rstd)
    return dx, dw, None


_rms_norm_fwd_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)


@torch.library.custom_op("lima_kernels::dropout_add_rms_norm_fwd", mutates_args=())
def _dropout_add_rms_norm_fwd_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, p: float, seed: int, offset: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_fwd(x, weight, eps, residual, p, seed, offset)


@_dropout_add_rms_norm_fwd_op.register_fake
def _(x, residual, weight, p, seed, offset, eps):
    return _fake_fwd(x, residual, weight)


@torch.library.custom_op("lima_kernels::dropout_add_rms_norm_bwd", mutates_args=())
def _dropout_add_rms_norm_bwd_op(
    dz: Optional[torch.Tensor], dy: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
    p: float, seed: int, offset: int, x_dtype: torch.dtype, r_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, z, weight, rstd, dz, p, seed, offset, x_dtype, r_dtype)


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
# Public functions and modules
# ----------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., N] with weight [N]; HF LlamaRMSNorm numerics."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [..., N] -> [M, N]
    y, _rstd = _rms_norm_fwd_op(x2, weight, float(eps))
    return y.view(shape)  # [M, N] -> [..., N]


def dropout_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         p: float, seed: int, offset: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(new_residual, rms_norm(new_residual, weight, eps)) with new_residual =
    residual + dropout_p(x), in one pass over x [..., N] and residual [..., N]."""
    check_dropout_args(p, seed, offset)
    check_same_shape(x, residual)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [..., N] -> [M, N]
    r2 = residual.reshape(-1, shape[-1])  # [..., N] -> [M, N]
    z, y, _rstd = _dropout_add_rms_norm_fwd_op(x2, r2, weight, float(p), seed, offset, float(eps))
    return z.view(shape), y.view(shape)  # [M, N] -> [..., N]


class RMSNorm(torch.nn.Module):
    """Drop-in for transformers' LlamaRMSNorm backed by the Triton kernels."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.variance_epsilon}"


class DropoutAddRMSNorm(torch.nn.Module):
    """Residual dropout at rate p fused with the residual add and the following RMSNorm.

    forward(x, residual, seed, offset) -> (new_residual, normed); in eval mode the
    dropout is off (p = 0)."""

    def __init__(self, hidden_size: int, p: float, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        check_dropout_args(p, 0, 0)
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
