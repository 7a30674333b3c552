"""Triton RMSNorm vs the HF-numerics reference: forward and backward, three ways."""

import pytest
import torch
from lk_testing import DTYPES, assert_three_way, leaves, ulp_atol

from lima_kernels import reference as ref
from lima_kernels.ops.rms_norm import RMSNorm, rms_norm

EPS = 1e-6


def _gold(x, w, eps):
    """RMSNorm in fp64 with no intermediate rounding."""
    h = x.double()
    return w.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 64), (1, 16), (37, 200)])
def test_rms_norm_forward_backward(shape, dtype):
    x = torch.randn(shape, dtype=dtype) * 3
    w = (torch.randn(shape[-1]) * 0.5 + 1).to(dtype)
    dy = torch.randn(shape, dtype=dtype)

    xs = leaves(x)
    ws = leaves(w)
    y_k = rms_norm(xs[0], ws[0], EPS)
    y_t = ref.rms_norm(xs[1], ws[1], EPS)
    y_g = _gold(xs[2], ws[2], EPS)
    assert_three_way(y_k, y_t, y_g, ulp_atol(dtype, y_g), "y")

    y_k.backward(dy)
    y_t.backward(dy)
    y_g.backward(dy.double())
    assert_three_way(xs[0].grad, xs[1].grad, xs[2].grad, ulp_atol(dtype, xs[2].grad), "dx")
    assert_three_way(ws[0].grad, ws[1].grad, ws[2].grad, ulp_atol(dtype, ws[2].grad), "dw")


def test_rms_norm_mixed_dtypes_and_strides():
    """bf16 activations with an fp32 weight (output promotes to fp32, as HF's weight * h),
    and a non-contiguous input (a row slice)."""
    base = torch.randn(7, 2 * 96, dtype=torch.bfloat16)
    x = base[:, ::2]  # [7, 96], last-dim stride 2: copied by the launcher
    w = torch.randn(96, dtype=torch.float32)
    y_k = rms_norm(x, w, EPS)
    y_t = ref.rms_norm(x, w, EPS)
    assert y_k.dtype == torch.float32
    # Same bf16-rounded x_hat times the same fp32 weight: only the fp32 rstd can differ
    # (reduction order), which moves x_hat by at most one bf16 ulp.
    torch.testing.assert_close(y_k, y_t, rtol=2 * torch.finfo(torch.bfloat16).eps, atol=1e-6)


def test_rms_norm_module_matches_hf():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(48, eps=1e-5)
    mine = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(48))
        mine.weight.copy_(hf.weight)
    x = torch.randn(3, 4, 48)
    # fp32 end to end: only summation order differs (a few fp32 ulps).
    torch.testing.assert_close(mine(x), hf(x), rtol=1e-5, atol=1e-6)


def test_rms_norm_weight_grad_many_rows_bf16():
    """More rows than programs: per-program partial sums then the second reduction."""
    x = torch.randn(301, 40, dtype=torch.bfloat16)
    w = torch.randn(40, dtype=torch.bfloat16)
    dy = torch.randn(301, 40, dtype=torch.bfloat16)
    wk, wt, wg = leaves(w)
    rms_norm(x, wk, EPS).backward(dy)
    ref.rms_norm(x, wt, EPS).backward(dy)
    _gold(x, wg, EPS).backward(dy.double())
    assert_three_way(wk.grad, wt.grad, wg.grad, ulp_atol(torch.bfloat16, wg.grad), "dw")
