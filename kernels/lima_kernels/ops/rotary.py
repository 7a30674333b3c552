"""Rotary position embedding (rotate-half, HF layout) in one Triton kernel for both directions.

What: out = x * cos + rotate_half(x) * sin over x [..., seq, heads, head_dim] with
cos/sin [..., seq, head_dim] broadcast over heads (HF style: cat(freqs, freqs)). For packed
rows, where positions restart per example, pass x [tokens, heads, head_dim] and cos/sin
gathered per token [tokens, head_dim]. With x = (x1, x2) halves and cos = (c1, c2),
sin = (s1, s2):
    forward:  o1 = x1 c1 - x2 s1,   o2 = x2 c2 + x1 s2
    backward: g1 = d1 c1 + d2 s2,   g2 = d2 c2 - d1 s1
The backward is the forward with the sine negated and its halves swapped; for HF's
cos/sin (s1 == s2) that is exactly "rotary with the sine negated". One kernel with a
`tl.constexpr` BACKWARD flag serves both; the torch op `lima_kernels::rotary` takes the
flag as an argument, so its gradient is itself with the flag flipped.

Numerics: cos/sin are rounded to x's dtype first (HF returns them in the activation
dtype); the products and the sum are done in fp32 and rounded once to x's dtype.

Reference: `lima_kernels.reference.rotary` (= transformers' apply_rotary_pos_emb with
unsqueeze_dim=-2).

Limits: head_dim even and <= 1024; x's last dim must be contiguous (other layouts are
copied); no gradient flows to cos/sin (an error if they require grad); the output is a
new contiguous tensor (not in place).
"""

import torch
import triton
import triton.language as tl

from .._utils import check_device, interpreting, last_dim_contiguous, row_num_warps

# ----------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------


@triton.jit
def _rotary_kernel(
    X, COS, SIN, Y,
    n_tokens, seq_len, n_heads, half,
    stride_xb, stride_xs, stride_xh,
    stride_cb, stride_cs, stride_sb, stride_ss,
    stride_yb, stride_ys, stride_yh,
    BACKWARD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] flat (b, s)
    head = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    d = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    tok_mask = tok < n_tokens
    b = (tok // seq_len).to(tl.int64)
    s = (tok % seq_len).to(tl.int64)

    # cos/sin rows: [BLOCK_T, BLOCK_HALF], rounded to x's dtype as HF does.
    cs_mask = tok_mask[:, None] & (d < half)[None, :]
    c_off = (b * stride_cb + s * stride_cs)[:, None] + d[None, :]
    s_off = (b * stride_sb + s * stride_ss)[:, None] + d[None, :]
    c1 = tl.load(COS + c_off, mask=cs_mask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    c2 = tl.load(COS + c_off + half, mask=cs_mask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    s1 = tl.load(SIN + s_off, mask=cs_mask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    s2 = tl.load(SIN + s_off + half, mask=cs_mask, other=0.0).to(X.dtype.element_ty).to(tl.float32)
    if BACKWARD:
        sin_a = -s2
        sin_b = -s1
    else:
        sin_a = s1
        sin_b = s2

    # x halves: [BLOCK_T, BLOCK_H, BLOCK_HALF]
    mask = tok_mask[:, None, None] & (head < n_heads)[None, :, None] & (d < half)[None, None, :]
    x_off = (
        (b * stride_xb + s * stride_xs)[:, None, None]
        + (head.to(tl.int64) * stride_xh)[None, :, None]
        + d[None, None, :]
    )
    x1 = tl.load(X + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_off + half, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1[:, None, :] - x2 * sin_a[:, None, :]
    y2 = x2 * c2[:, None, :] + x1 * sin_b[:, None, :]

    y_off = (
        (b * stride_yb + s * stride_ys)[:, None, None]
        + (head.to(tl.int64) * stride_yh)[None, :, None]
        + d[None, None, :]
    )
    tl.store(Y + y_off, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_off + half, y2.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Launcher (x [B, S, H, D], cos/sin [B, S, D])
# ----------------------------------------------------------------------------------------

MAX_HEAD_DIM = 1024


def rotary_config(heads: int, dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_H, BLOCK_HALF, num_warps) of _rotary_kernel for `heads` heads of even
    size `dim`."""
    block_half = triton.next_power_of_2(dim // 2)
    if interpreting():
        return 16, triton.next_power_of_2(heads), block_half, 1
    block_h = min(triton.next_power_of_2(heads), 32)
    block_t = max(1, 2048 // (block_h * block_half))  # ~4k elements (both halves) a program
    return block_t, block_h, block_half, row_num_warps(2 * block_t * block_h * block_half)


def rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [B, S, H, D], cos/sin [B, S, D] (any strides, last dim contiguous) -> y [B, S, H, D]."""
    check_device(x, cos, sin)
    bsz, seq, heads, dim = x.shape
    if dim % 2 or dim > MAX_HEAD_DIM:
        raise ValueError(f"rotary needs an even head_dim <= {MAX_HEAD_DIM}, got {dim}")
    x, cos, sin = last_dim_contiguous(x), last_dim_contiguous(cos), last_dim_contiguous(sin)
    y = torch.empty((bsz, seq, heads, dim), dtype=x.dtype, device=x.device)
    n_tokens = bsz * seq
    if n_tokens == 0 or heads == 0:
        return y
    half = dim // 2
    block_t, block_h, block_half, num_warps = rotary_config(heads, dim)
    grid = (triton.cdiv(n_tokens, block_t), triton.cdiv(heads, block_h))
    _rotary_kernel[grid](
        x, cos, sin, y,
        n_tokens, seq, heads, half,
        x.stride(0), x.stride(1), x.stride(2),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        y.stride(0), y.stride(1), y.stride(2),
        BACKWARD=backward, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return y


# ----------------------------------------------------------------------------------------
# Autograd: one custom op for both directions; its gradient is itself, flag flipped
# ----------------------------------------------------------------------------------------

_rotary_op = torch.library.custom_op("lima_kernels::rotary", rotary_launch, mutates_args=())


@_rotary_op.register_fake
def _(x, cos, sin, backward):
    return x.new_empty(x.shape)


def _rotary_setup_context(ctx, inputs, output):
    _x, cos, sin, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.backward_flag = backward


def _rotary_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rotary_op(dy, cos, sin, not ctx.backward_flag), None, None, None


_rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)


# ----------------------------------------------------------------------------------------
# Public function and module
# ----------------------------------------------------------------------------------------


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x [..., seq, heads, head_dim], cos/sin [..., seq, head_dim]
    broadcastable to x.shape[:-2] + (head_dim,). Returns a new tensor shaped like x."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("lima_kernels.rotary does not propagate gradients to cos/sin")
    if x.dim() < 3:
        raise ValueError(f"rotary expects x [..., seq, heads, head_dim], got shape {tuple(x.shape)}")
    shape = x.shape
    seq, heads, dim = shape[-3], shape[-2], shape[-1]
    x4 = x.reshape(-1, seq, heads, dim)  # [..., S, H, D] -> [B, S, H, D]
    lead = (*shape[:-2], dim)  # x.shape[:-2] + (D,) = (..., S, D)
    cos3 = cos.expand(lead).reshape(-1, seq, dim)  # [..., S, D] -> [B, S, D] (stride 0 if broadcast)
    sin3 = sin.expand(lead).reshape(-1, seq, dim)  # [..., S, D] -> [B, S, D]
    y = _rotary_op(x4, cos3, sin3, False)  # [B, S, H, D]
    return y.view(shape)  # [B, S, H, D] -> [..., S, H, D]


class Rotary(torch.nn.Module):
    """Applies rotary() to the tensors it is given; cos/sin come from the caller's cache."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rotary(x, cos, sin)
