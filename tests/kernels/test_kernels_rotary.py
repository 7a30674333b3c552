"""Triton rotary vs the HF rotate-half reference: forward and backward, three ways."""

import pytest
import torch
from lk_testing import DTYPES, assert_three_way, leaves, ulp_atol

from lima_kernels import reference as ref
from lima_kernels.ops.rotary import _rotary_op, rotary


def _cos_sin(positions: torch.Tensor, dim: int, base: float = 10000.0):
    """HF-style tables: cat(freqs, freqs) at the given positions -> [*positions.shape, dim]."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = positions.double()[..., None] * inv_freq  # [..., dim / 2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., dim]
    return emb.cos(), emb.sin()


def _gold(x, cos, sin):
    """fp64 rotate-half with no intermediate rounding (cos/sin already in x's dtype)."""
    return ref.rotary(x.double(), cos.double(), sin.double())


CASES = [
    # (x shape, cos/sin shape): batch-broadcast tables, packed per-token tables,
    # one head, head_dim 16 and 128, extra leading dims.
    ((2, 5, 3, 16), (5, 16)),
    ((7, 1, 16), (7, 16)),
    ((1, 4, 2, 128), (1, 4, 128)),
    ((2, 2, 3, 4, 8), (2, 1, 3, 8)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,cs_shape", CASES)
def test_rotary_forward_backward(x_shape, cs_shape, dtype):
    positions = torch.randint(0, 4096, cs_shape[:-1])
    cos, sin = (t.to(dtype) for t in _cos_sin(positions, cs_shape[-1]))
    x = torch.randn(x_shape, dtype=dtype)
    dy = torch.randn(x_shape, dtype=dtype)
    xs = leaves(x)
    y_k = rotary(xs[0], cos, sin)
    y_t = ref.rotary(xs[1], cos, sin)
    y_g = _gold(xs[2], cos, sin)
    assert_three_way(y_k, y_t, y_g, ulp_atol(dtype, y_g), "y")
    y_k.backward(dy)
    y_t.backward(dy)
    y_g.backward(dy.double())
    assert_three_way(xs[0].grad, xs[1].grad, xs[2].grad, ulp_atol(dtype, xs[2].grad), "dx")


def test_rotary_packed_positions_restart():
    """Packed row of two examples (lengths 3 and 4): positions 0,1,2,0,1,2,3; per-token
    tables give the same result as applying the rotary to each example on its own."""
    positions = torch.tensor([0, 1, 2, 0, 1, 2, 3])
    cos, sin = (t.float() for t in _cos_sin(positions, 32))
    x = torch.randn(7, 4, 32)  # [tokens, heads, head_dim]
    y = rotary(x, cos, sin)
    cos_a, sin_a = (t.float() for t in _cos_sin(torch.arange(3), 32))  # example 1 alone
    cos_b, sin_b = (t.float() for t in _cos_sin(torch.arange(4), 32))  # example 2 alone
    y_a = ref.rotary(x[:3], cos_a, sin_a)
    y_b = ref.rotary(x[3:], cos_b, sin_b)
    # fp32: kernel fuses the two products into one rounding, torch rounds each: ~1 ulp.
    torch.testing.assert_close(y, torch.cat([y_a, y_b]), rtol=2e-6, atol=2e-6)


def test_rotary_general_tables_backward():
    """Tables whose sine halves differ (not HF's layout): the backward still equals
    autograd of the reference, since the kernel swaps the sine halves as well as negating."""
    x = torch.randn(3, 5, 2, 24, dtype=torch.float64).float().requires_grad_()
    cos, sin = torch.randn(5, 24), torch.randn(5, 24)
    dy = torch.randn(3, 5, 2, 24)
    (gx_ref,) = torch.autograd.grad(ref.rotary(x, cos, sin), x, dy)
    (gx,) = torch.autograd.grad(rotary(x, cos, sin), x, dy)
    # fp32 throughout, sums of two products: a few fp32 ulps of values ~10.
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)


def test_rotary_backward_is_forward_with_sine_negated():
    positions = torch.arange(6)
    cos, sin = (t.float() for t in _cos_sin(positions, 16))
    dy = torch.randn(6, 3, 16)
    x4 = dy.view(1, 6, 3, 16)  # [B=1, S, H, D]
    back = _rotary_op(x4, cos[None], sin[None], True)
    fwd_neg = _rotary_op(x4, cos[None], -sin[None], False)
    # HF tables have equal sine halves, so the two are the same arithmetic: identical bits.
    assert torch.equal(back, fwd_neg)


def test_rotary_fp32_tables_bf16_activations_and_strided_x():
    """cos/sin in fp32 are rounded to x's dtype like HF; x may be a strided view (q of a
    fused qkv projection)."""
    qkv = torch.randn(2, 5, 3, 2, 16, dtype=torch.bfloat16)  # [B, S, heads, (q, k), D]
    q = qkv[..., 0, :]  # [B, S, 3, 16], head stride 32
    cos, sin = (t.float() for t in _cos_sin(torch.arange(5), 16))
    y = rotary(q, cos, sin)
    y_t = ref.rotary(q, cos, sin)
    # Kernel rounds once, torch rounds each product and the sum: within 1 bf16 ulp at |y|.
    torch.testing.assert_close(y, y_t, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-2)


def test_rotary_rejects_tables_requiring_grad():
    cos = torch.ones(4, 8, requires_grad=True)
    with pytest.raises(ValueError):
        rotary(torch.randn(4, 1, 8), cos, torch.zeros(4, 8))
