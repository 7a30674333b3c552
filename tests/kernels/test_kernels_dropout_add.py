"""Triton residual dropout (+ fused RMSNorm) vs the reference: same mask bit for bit,
values three ways, recomputation under checkpointing, statistics of the mask."""

import pytest
import torch
import torch.utils.checkpoint
from lk_testing import DTYPES, assert_three_way, leaves, ulp_atol

from lima_kernels import reference as ref
from lima_kernels.ops.dropout_add import dropout_add
from lima_kernels.ops.rms_norm import DropoutAddRMSNorm, dropout_add_rms_norm

EPS = 1e-6


def _gold_dropout_add(x, r, keep, p):
    """fp64 residual + x / (1 - p) on the reference mask."""
    return r.double() + torch.where(keep, x.double() / (1 - p), torch.zeros((), dtype=torch.float64))


def _gold_rms(z, w):
    z = z.double()
    return w.double() * (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS))


@pytest.mark.parametrize("seed", [0, 1, 2**33 + 17])
@pytest.mark.parametrize("shape,offset", [((5, 123), 0), ((3, 7, 16), 1000), ((1, 1000), 2**32 - 500)])
def test_kernel_mask_equals_reference_mask(shape, offset, seed):
    """x = 1, residual = 0: the output is 1 / (1 - p) where kept and exactly 0 where dropped."""
    p = 0.3
    x = torch.ones(shape)
    zero = torch.zeros(shape)
    keep_ref = ref.dropout_mask(seed, offset, shape, p)
    keep_k = dropout_add(x, zero, p, seed, offset) != 0
    assert torch.equal(keep_k, keep_ref)
    new_res, _ = dropout_add_rms_norm(x, zero, torch.ones(shape[-1]), p, seed, offset, EPS)
    assert torch.equal(new_res != 0, keep_ref)
    # Same seed/offset -> same mask; another seed or offset -> another mask.
    assert torch.equal(dropout_add(x, zero, p, seed, offset) != 0, keep_k)
    assert not torch.equal(dropout_add(x, zero, p, seed + 1, offset) != 0, keep_k)
    assert not torch.equal(dropout_add(x, zero, p, seed, offset + 1) != 0, keep_k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 64), (1, 16)])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_dropout_add_forward_backward(shape, dtype, p):
    seed, offset = 1234, 77
    x, r, dy = (torch.randn(shape, dtype=dtype) for _ in range(3))
    keep = ref.dropout_mask(seed, offset, shape, p)
    xs = leaves(x)
    rs = leaves(r)
    y_k = dropout_add(xs[0], rs[0], p, seed, offset)
    y_t = ref.dropout_add(xs[1], rs[1], p, seed, offset)
    y_g = _gold_dropout_add(xs[2], rs[2], keep, p)
    assert_three_way(y_k, y_t, y_g, ulp_atol(dtype, y_g), "y")
    for out, g in ((y_k, dy), (y_t, dy), (y_g, dy.double())):
        out.backward(g)
    assert_three_way(xs[0].grad, xs[1].grad, xs[2].grad, ulp_atol(dtype, xs[2].grad), "dx")
    assert_three_way(rs[0].grad, rs[1].grad, rs[2].grad, ulp_atol(dtype, rs[2].grad), "dresidual")
    # The recomputed backward mask is the forward's: dropped elements get exactly zero.
    assert torch.equal(xs[0].grad != 0, keep & (dy != 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 123), (2, 3, 64), (1, 16)])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_add_rms_norm_forward_backward(shape, dtype, p):
    seed, offset = 2**40 + 3, 5
    x, r, dz, dy = (torch.randn(shape, dtype=dtype) for _ in range(4))
    w = (torch.randn(shape[-1]) * 0.5 + 1).to(dtype)
    keep = ref.dropout_mask(seed, offset, shape, p)
    xs = leaves(x)
    rs = leaves(r)
    ws = leaves(w)
    z_k, y_k = dropout_add_rms_norm(xs[0], rs[0], ws[0], p, seed, offset, EPS)
    z_t, y_t = ref.dropout_add_rms_norm(xs[1], rs[1], ws[1], p, seed, offset, EPS)
    z_g = _gold_dropout_add(xs[2], rs[2], keep, p)
    y_g = _gold_rms(z_g, ws[2])
    assert_three_way(z_k, z_t, z_g, ulp_atol(dtype, z_g), "new_residual")
    assert_three_way(y_k, y_t, y_g, ulp_atol(dtype, y_g), "normed")
    # Gradients arrive on both outputs (the residual stream and the normed branch).
    for zz, yy, gz, gy in ((z_k, y_k, dz, dy), (z_t, y_t, dz, dy), (z_g, y_g, dz.double(), dy.double())):
        torch.autograd.backward([zz, yy], [gz, gy])
    for name, ts in (("dx", xs), ("dresidual", rs), ("dweight", ws)):
        assert_three_way(ts[0].grad, ts[1].grad, ts[2].grad, ulp_atol(dtype, ts[2].grad), name)


def test_dropout_add_rms_norm_only_normed_used():
    """If only the normed output feeds the loss, the residual's gradient is the norm's."""
    x, r = torch.randn(4, 40), torch.randn(4, 40)
    w = torch.randn(40)
    xk, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    _, y_k = dropout_add_rms_norm(xk, r, w, 0.25, 3, 0, EPS)
    _, y_r = ref.dropout_add_rms_norm(xr, r, w, 0.25, 3, 0, EPS)
    y_k.sum().backward()
    y_r.sum().backward()
    # fp32 end to end; differences are reduction order (a few fp32 ulps of values ~1).
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_p_zero_is_identity():
    x = torch.randn(6, 50, dtype=torch.bfloat16)
    r = torch.randn(6, 50, dtype=torch.bfloat16)
    # p == 0 is plain residual + x: identical bits to torch's add.
    assert torch.equal(dropout_add(x, r, 0.0, 9, 0), r + x)
    z, _ = dropout_add_rms_norm(x.float(), r.float(), torch.ones(50), 0.0, 9, 0, EPS)
    # fp32 kernel: fp32(r + x) is one correctly rounded add either way: identical.
    assert torch.equal(z, r.float() + x.float())


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_kept_fraction_and_scaling(p):
    """Kept count ~ Binomial(n, 1 - p); output mean ~ 1 for x = 1. Bounds: 5 sigma."""
    n_rows, n_cols = 200, 1000
    n = n_rows * n_cols
    out = dropout_add(torch.ones(n_rows, n_cols), torch.zeros(n_rows, n_cols), p, 4242, 0)
    kept = out != 0
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    # Kept values are exactly fp32(1 / (1 - p)).
    assert torch.all(out[kept] == torch.tensor(1 / (1 - p), dtype=torch.float32))
    # out = B / (1 - p) with B ~ Bernoulli(1 - p): mean 1, variance p / (1 - p).
    assert abs(out.double().mean().item() - 1.0) < 5 * (p / (1 - p) / n) ** 0.5


def test_checkpoint_recompute_gives_identical_gradients():
    """Under activation checkpointing the block runs twice; the recomputed mask is the same,
    so gradients equal the un-checkpointed run bit for bit."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 32)
    norm_w = torch.randn(32, requires_grad=True)
    x0 = torch.randn(3, 5, 32)

    def block(h):
        res, normed = dropout_add_rms_norm(lin(h), h, norm_w, 0.3, 11, 100, EPS)
        return dropout_add(lin(normed), res, 0.2, 11, 100 + h.numel())

    grads = []
    for use_ckpt in (False, True):
        h = x0.clone().requires_grad_()
        for prm in (*lin.parameters(), norm_w):
            prm.grad = None
        out = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if use_ckpt else block(h)
        out.square().sum().backward()
        grads.append([h.grad.clone(), norm_w.grad.clone(), *(q.grad.clone() for q in lin.parameters())])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_module_eval_disables_dropout():
    m = DropoutAddRMSNorm(16, p=0.5)
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    m.eval()
    z, _ = m(x, r, seed=1, offset=0)
    # fp32, p = 0: residual + x with one correctly rounded add: identical bits.
    assert torch.equal(z, r + x)
    m.train()
    z, _ = m(x, r, seed=1, offset=0)
    assert not torch.equal(z, r + x)


def test_invalid_arguments():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError):
        dropout_add(x, x, 1.0, 0, 0)
    with pytest.raises(ValueError):
        dropout_add(x, x, 0.1, -1, 0)
    with pytest.raises(ValueError):
        dropout_add(x, torch.randn(8), 0.1, 0, 0)
