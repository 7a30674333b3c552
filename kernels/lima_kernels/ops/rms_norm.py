"""RMSNorm forward and backward in Triton, with HF LlamaRMSNorm numerics.

What: y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype), statistics in fp32, the
normalized value rounded to x's dtype before the weight multiply (HF's cast order), the
product in fp32 rounded once to the output dtype (promote(x.dtype, weight.dtype), as torch
does for `weight * h`). Backward recomputes x_hat from x and the saved per-row rstd; the
weight gradient is reduced WITHOUT atomics: each program sums dy * x_hat over its own
contiguous block of rows into an fp32 partial row, and a second reduction (torch sum over
the partials) finishes it, so bf16/fp16 weights work and the result is deterministic.

Reference: `lima_kernels.reference.rms_norm` (= transformers' LlamaRMSNorm), re-exported
here as `rms_norm_reference`.

Limits: the whole row lives in one block, so hidden size N <= 65536; the last dim must be
contiguous (other layouts are copied); no gradient of eps; double backward unsupported.
Registered as torch.library custom ops `lima_kernels::rms_norm_fwd` / `rms_norm_bwd`
(fake + autograd registered), so torch.compile traces through without graph breaks.
"""

import torch
import triton
import triton.language as tl

from .. import reference
from .._utils import check_device, num_programs_persistent, row_config

# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD,
    M, N, stride_x, stride_y,
    eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < M
    mask = row_mask[:, None] & (cols < N)[None, :]  # [BLOCK_M, BLOCK_N]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)  # [BLOCK_M] fp32
    # HF cast order: normalize in fp32, round to x's dtype, then multiply by the weight.
    x_hat = (x * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)  # [BLOCK_N]
    y = w[None, :] * x_hat
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL,
    M, N, stride_dy, stride_x, stride_dx, rows_per_program,
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
        rows = r0 + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]  # [BLOCK_M, BLOCK_N]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)  # [BLOCK_M]
        x_hat = x * rstd[:, None]
        # y = w * cast(x_hat): dL/dw sums dy * cast(x_hat); the cast passes gradients through.
        dw_acc += tl.sum(dy * x_hat.to(X.dtype.element_ty).to(tl.float32), axis=0)
        g = dy * w[None, :]  # dL/dx_hat
        c = tl.sum(g * x_hat, axis=1) / N  # [BLOCK_M]
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, dw_acc, mask=col_mask)


# ----------------------------------------------------------------------------------------
# Launchers (2-D, last dim contiguous)
# ----------------------------------------------------------------------------------------


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, N] -> (y [M, N] in promote(x, weight) dtype, rstd [M] fp32)."""
    check_device(x, weight)
    x = _last_dim_contiguous(x)
    weight = weight.contiguous()
    m, n = x.shape
    y = torch.empty((m, n), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return y, rstd
    block_m, block_n, num_warps = row_config(n)
    grid = (triton.cdiv(m, block_m),)
    _rms_norm_fwd_kernel[grid](
        x, weight, y, rstd, m, n, x.stride(0), y.stride(0), eps,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return y, rstd


def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x [M, N], rstd [M] -> (dx [M, N] in x's dtype, dweight [N] in weight's dtype)."""
    check_device(dy, x, weight, rstd)
    dy = _last_dim_contiguous(dy)
    x = _last_dim_contiguous(x)
    weight = weight.contiguous()
    m, n = x.shape
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return dx, torch.zeros_like(weight)
    block_m, block_n, num_warps = row_config(n)
    programs = max(1, min(num_programs_persistent(x.device), triton.cdiv(m, block_m)))
    rows_per_program = triton.cdiv(m, programs)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)  # [programs, N]
    _rms_norm_bwd_kernel[(programs,)](
        dy, x, weight, rstd, dx, dw_partial,
        m, n, dy.stride(0), x.stride(0), dx.stride(0), rows_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    dw = dw_partial.sum(dim=0).to(weight.dtype)  # [N]: second-stage reduction, fp32
    return dx, dw


# ----------------------------------------------------------------------------------------
# Autograd: torch.library custom ops with fake and autograd registrations
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("lima_kernels::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_fwd(x, weight, eps)


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps):
    m, n = x.shape
    y = x.new_empty((m, n), dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty((m,), dtype=torch.float32)


@torch.library.custom_op("lima_kernels::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, x, weight, rstd)


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


# ----------------------------------------------------------------------------------------
# Public function and module
# ----------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., N] with weight [N]; HF LlamaRMSNorm numerics."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [..., N] -> [M, N]
    y, _rstd = _rms_norm_fwd_op(x2, weight, float(eps))
    return y.view(shape)  # [M, N] -> [..., N]


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


# ----------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------

rms_norm_reference = reference.rms_norm
