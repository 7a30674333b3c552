"""Plain-PyTorch references for every lima_kernels op.

These are the numerics the Triton kernels are tested against and the path the CPU
trainer runs directly. They use torch ops only (no triton import), so autograd
differentiates them and `import lima_kernels.reference` works without triton.

Reference numerics (lima-core docs/design.md, decision 1) are Hugging Face `transformers`' LLaMA:
  - rms_norm: LlamaRMSNorm (statistics in fp32, cast back to the input dtype before the
    weight multiply).
  - rotary: HF rotate-half RoPE, `q * cos + rotate_half(q) * sin`, cos/sin cast to q's dtype.
  - dropout masks: Triton's Philox `tl.rand(seed, offset + i)`, reproduced bit for bit in
    int64 torch arithmetic, so kernel and reference drop the same elements.

Dropout keep rule (used identically by the kernels): element i is KEPT iff
`u_i >= float32(p)`, where u_i = philox_uniform(seed, offset, n)[i] over x flattened row-major;
kept elements are scaled by 1 / (1 - p). P(keep) = 1 - p since u is uniform on [0, 1).

Limits: seeds are ints in [0, 2**63); counters offset + i must be < 2**64 (the reference
splits them into two 32-bit words exactly as Triton does for int64 counters). Calls that
must draw independent masks need different seeds or disjoint counter ranges
[offset, offset + numel).
"""

from __future__ import annotations

import torch

from .philox import philox_uniform

__all__ = [
    "rms_norm",
    "rotary",
    "rotate_half",
    "philox_uniform",
    "dropout_mask",
    "dropout_add",
    "dropout_add_rms_norm",
    "linear_cross_entropy",
]

# ----------------------------------------------------------------------------------------
# RMSNorm and rotary (HF numerics)
# ----------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: fp32 statistics, cast back to x.dtype, then times weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """cat(-x2, x1) over the last dim, x = cat(x1, x2) (HF layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [..., head_dim / 2] each
    return torch.cat((-x2, x1), dim=-1)  # [..., head_dim]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE as HF applies it.

    x: [..., seq, heads, head_dim]; cos, sin: [..., seq, head_dim] (HF style, already
    cat(freqs, freqs)), broadcast over heads. cos/sin are cast to x.dtype first, as HF's
    rotary embedding returns them in the activation dtype.
    """
    cos = cos.to(x.dtype).unsqueeze(-2)  # [..., seq, 1, head_dim]
    sin = sin.to(x.dtype).unsqueeze(-2)  # [..., seq, 1, head_dim]
    return x * cos + rotate_half(x) * sin


def dropout_mask(seed: int, offset: int, shape, p: float, device=None, *, uniform=philox_uniform) -> torch.Tensor:
    """Boolean keep-mask of `shape` (row-major counters): keep iff u >= float32(p)
    (kernels receive p as an fp32 scalar, so the threshold is compared in fp32).

    `uniform(seed, offset, n, device)` draws the stream: `philox_uniform` (plain torch) by
    default, or any implementation equal to it bit for bit (a native op, say)."""
    n = 1
    for s in shape:
        n *= int(s)
    u = uniform(seed, offset, n, device)  # [n]
    threshold = torch.tensor(p, dtype=torch.float32, device=device)
    return (u >= threshold).view(shape)  # [n] -> [*shape]


# ----------------------------------------------------------------------------------------
# Residual dropout
# ----------------------------------------------------------------------------------------


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, seed: int, offset: int, *,
                uniform=philox_uniform) -> torch.Tensor:
    """residual + dropout(x): keep x_i / (1 - p) iff u_i >= p (u over x flattened
    row-major, counters offset + i); p == 0 returns residual + x exactly."""
    _check_p(p)
    if p == 0.0:
        return residual + x
    keep = dropout_mask(seed, offset, x.shape, p, x.device, uniform=uniform)  # [*x.shape] bool
    return residual + torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))


def dropout_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    eps: float,
    *,
    uniform=philox_uniform,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new_residual, rms_norm(new_residual)) with new_residual = dropout_add(...)."""
    new_residual = dropout_add(x, residual, p, seed, offset, uniform=uniform)
    return new_residual, rms_norm(new_residual, weight, eps)


# ----------------------------------------------------------------------------------------
# Linear + cross-entropy
# ----------------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies over labels != ignore_index, their count).

    hidden: [..., H]; weight: [V, H]; labels: [...] aligned to hidden's rows (no shift).
    Logits = hidden @ weight.T computed in fp32 (both operands upcast). Returns an fp32
    scalar and an int64 scalar tensor.
    """
    h = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
    y = labels.reshape(-1)  # [T]
    logits = h.float() @ weight.float().t()  # [T, V] fp32
    loss_sum = torch.nn.functional.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    n_targets = (y != ignore_index).sum()
    return loss_sum, n_targets
