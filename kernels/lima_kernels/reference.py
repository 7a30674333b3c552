"""Plain-PyTorch references for every lima_kernels op.

These are the numerics the Triton kernels are tested against and the path the CPU
trainer runs directly. They use torch ops only (no triton import), so autograd
differentiates them and `import lima_kernels.reference` works without triton.

Reference numerics (DESIGN.md decision 1) are Hugging Face `transformers`' LLaMA:
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


# ----------------------------------------------------------------------------------------
# Philox, bit for bit as triton.language.random (randint -> uint_to_uniform_float)
# ----------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
# Triton's scale for an int32 in [0, 2**31): the largest float with MAX_INT * scale < 1.
_UINT_TO_FLOAT_SCALE = 4.6566127342e-10


def _umulhi32(const: int, x: torch.Tensor) -> torch.Tensor:
    """High 32 bits of const * x for const, x in [0, 2**32), in int64 without overflow."""
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    # const * x = const * x_hi * 2**16 + const * x_lo; every partial product is < 2**48.
    return (const * x_hi + ((const * x_lo) >> 16)) >> 16


def _mullo32(const: int, x: torch.Tensor) -> torch.Tensor:
    """Low 32 bits of const * x for const, x in [0, 2**32), in int64 without overflow."""
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    return (const * x_lo + (((const * x_hi) & 0xFFFF) << 16)) & _M32


def _philox_c0(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """First output word of Philox-4x32-10 for key = seed and counter = (lo, hi, 0, 0).

    Triton: `randint4x` sets c0 = low 32 bits of the counter, c1 = its high 32 bits (0
    for int32 counters), c2 = c3 = 0; `philox` splits the 64-bit seed into
    k0 = seed & 0xFFFFFFFF and k1 = seed >> 32. `randint` returns c0.
    """
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_PHILOX_ROUNDS):
        prev_c0, prev_c2 = c0, c2
        c0 = _umulhi32(_PHILOX_ROUND_B, prev_c2) ^ c1 ^ k0
        c2 = _umulhi32(_PHILOX_ROUND_A, prev_c0) ^ c3 ^ k1
        c1 = _mullo32(_PHILOX_ROUND_B, prev_c2)
        c3 = _mullo32(_PHILOX_ROUND_A, prev_c0)
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0


def philox_uniform(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """n float32 uniforms in [0, 1), equal bit for bit to Triton's
    `tl.rand(seed, offset + tl.arange(0, n))` (element i uses counter offset + i)."""
    seed = int(seed)
    offset = int(offset)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if offset < 0 or offset + n > 2**63:
        raise ValueError(f"counters offset..offset+n must lie in [0, 2**63), got offset={offset}, n={n}")
    counter = torch.arange(n, dtype=torch.int64, device=device) + offset  # [n]
    word = _philox_c0(seed, counter)  # [n] int64 in [0, 2**32)
    # uint_to_uniform_float: bitcast to int32, x < 0 -> ~x (= 2**32 - 1 - word), then
    # int32 -> fp32 (round to nearest) times the fp32 scale, in fp32.
    x = torch.where(word >= 2**31, _M32 - word, word)  # [n] in [0, 2**31)
    scale = torch.tensor(_UINT_TO_FLOAT_SCALE, dtype=torch.float32, device=device)
    return x.to(torch.float32) * scale


def dropout_mask(seed: int, offset: int, shape, p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of `shape` (row-major counters): keep iff u >= float32(p)
    (kernels receive p as an fp32 scalar, so the threshold is compared in fp32)."""
    n = 1
    for s in shape:
        n *= int(s)
    u = philox_uniform(seed, offset, n, device)  # [n]
    threshold = torch.tensor(p, dtype=torch.float32, device=device)
    return (u >= threshold).view(shape)  # [n] -> [*shape]


# ----------------------------------------------------------------------------------------
# Residual dropout
# ----------------------------------------------------------------------------------------


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    """residual + dropout(x): keep x_i / (1 - p) iff u_i >= p (u over x flattened
    row-major, counters offset + i); p == 0 returns residual + x exactly."""
    _check_p(p)
    if p == 0.0:
        return residual + x
    keep = dropout_mask(seed, offset, x.shape, p, x.device)  # [*x.shape] bool
    return residual + torch.where(keep, x / (1.0 - p), torch.zeros((), dtype=x.dtype, device=x.device))


def dropout_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    p: float,
    seed: int,
    offset: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(new_residual, rms_norm(new_residual)) with new_residual = dropout_add(...)."""
    new_residual = dropout_add(x, residual, p, seed, offset)
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
