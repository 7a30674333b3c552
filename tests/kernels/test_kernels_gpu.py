"""The same checks on a real GPU with compiled (not interpreted) kernels, at LLaMA-like sizes.

Run on the GPU machine with `TRITON_INTERPRET=0 python3 -m pytest -m gpu -q` (bench/
gpu_check.sh does). Deselected on CPU by the `gpu` marker (pyproject addopts).
"""

import os

import pytest
import torch
import torch.utils.checkpoint
from lk_testing import DTYPES, assert_three_way, leaves, ulp_atol

import lima_kernels
from lima_kernels import reference as ref

pytestmark = pytest.mark.gpu

EPS = 1e-6
DEV = "cuda"


@pytest.fixture(autouse=True)
def _real_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("GPU tests must compile real kernels: run them with TRITON_INTERPRET=0")


def _rand(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def _gold_rms(x, w):
    h = x.double()
    return w.double() * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS))


# Tolerances below are the three-way rule of tests/kernels: 2x the same-dtype torch error plus
# one ulp at the output's scale (on the GPU: approximate rsqrt/exp and fused rounding).


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2048, 4096), (1000, 8192), (77, 123)])
def test_rms_norm_gpu(shape, dtype):
    x = _rand(*shape, dtype=dtype, scale=2)
    w = _rand(shape[-1], dtype=dtype, scale=0.5) + 1
    dy = _rand(*shape, dtype=dtype)
    xs, ws = leaves(x), leaves(w)
    outs = [lima_kernels.rms_norm(xs[0], ws[0], EPS), ref.rms_norm(xs[1], ws[1], EPS), _gold_rms(xs[2], ws[2])]
    assert_three_way(*outs, ulp_atol(dtype, outs[2]), "y")
    for o, g in zip(outs, (dy, dy, dy.double())):
        o.backward(g)
    assert_three_way(xs[0].grad, xs[1].grad, xs[2].grad, ulp_atol(dtype, xs[2].grad), "dx")
    assert_three_way(ws[0].grad, ws[1].grad, ws[2].grad, ulp_atol(dtype, ws[2].grad), "dw")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2048, 32, 128), (300, 8, 128), (7, 1, 16)])
def test_rotary_gpu(shape, dtype):
    tokens, heads, dim = shape
    pos = torch.arange(tokens, device=DEV) % 1000  # packed rows restart
    inv = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=DEV).double() / dim)
    emb = torch.cat([pos[:, None] * inv] * 2, -1)  # [T, D]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    x = _rand(*shape, dtype=dtype)
    dy = _rand(*shape, dtype=dtype)
    xs = leaves(x)
    outs = [lima_kernels.rotary(xs[0], cos, sin), ref.rotary(xs[1], cos, sin),
            ref.rotary(xs[2], cos.double(), sin.double())]
    assert_three_way(*outs, ulp_atol(dtype, outs[2]), "y")
    for o, g in zip(outs, (dy, dy, dy.double())):
        o.backward(g)
    assert_three_way(xs[0].grad, xs[1].grad, xs[2].grad, ulp_atol(dtype, xs[2].grad), "dx")


@pytest.mark.parametrize("seed", [0, 1, 2**35 + 9])
@pytest.mark.parametrize("offset", [0, 2**32 - 1000])
def test_dropout_mask_bit_exact_gpu(seed, offset):
    shape, p = (512, 4096), 0.3
    keep_gpu_ref = ref.dropout_mask(seed, offset, shape, p, device=DEV)
    keep_cpu_ref = ref.dropout_mask(seed, offset, shape, p, device="cpu")
    assert torch.equal(keep_gpu_ref.cpu(), keep_cpu_ref)
    ones, zeros = torch.ones(shape, device=DEV), torch.zeros(shape, device=DEV)
    assert torch.equal(lima_kernels.dropout_add(ones, zeros, p, seed, offset) != 0, keep_gpu_ref)
    z, _ = lima_kernels.dropout_add_rms_norm(ones, zeros, torch.ones(shape[1], device=DEV), p, seed, offset, EPS)
    assert torch.equal(z != 0, keep_gpu_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_add_rms_norm_gpu(dtype, p):
    shape, seed, offset = (1024, 4096), 77, 123
    x, r, dz, dy = (_rand(*shape, dtype=dtype) for _ in range(4))
    w = _rand(shape[1], dtype=dtype, scale=0.5) + 1
    keep = ref.dropout_mask(seed, offset, shape, p, device=DEV)
    xs, rs, ws = leaves(x), leaves(r), leaves(w)
    z_k, y_k = lima_kernels.dropout_add_rms_norm(xs[0], rs[0], ws[0], p, seed, offset, EPS)
    z_t, y_t = ref.dropout_add_rms_norm(xs[1], rs[1], ws[1], p, seed, offset, EPS)
    z_g = rs[2] + torch.where(keep, xs[2] / (1 - p), torch.zeros((), dtype=torch.float64, device=DEV))
    y_g = _gold_rms(z_g, ws[2])
    assert_three_way(z_k, z_t, z_g, ulp_atol(dtype, z_g), "new_residual")
    assert_three_way(y_k, y_t, y_g, ulp_atol(dtype, y_g), "normed")
    for zz, yy, a, b in ((z_k, y_k, dz, dy), (z_t, y_t, dz, dy), (z_g, y_g, dz.double(), dy.double())):
        torch.autograd.backward([zz, yy], [a, b])
    for name, ts in (("dx", xs), ("dresidual", rs), ("dweight", ws)):
        assert_three_way(ts[0].grad, ts[1].grad, ts[2].grad, ulp_atol(dtype, ts[2].grad), name)


def test_checkpoint_identical_gradients_gpu():
    lin = torch.nn.Linear(1024, 1024, device=DEV, dtype=torch.bfloat16)
    w = torch.ones(1024, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    x0 = torch.randn(4, 256, 1024, device=DEV, dtype=torch.bfloat16)

    def block(h):
        res, normed = lima_kernels.dropout_add_rms_norm(lin(h), h, w, 0.3, 5, 0, EPS)
        return lima_kernels.dropout_add(lin(normed), res, 0.3, 5, h.numel())

    grads = []
    for ckpt in (False, True):
        h = x0.clone().requires_grad_()
        out = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if ckpt else block(h)
        out.float().square().sum().backward()
        grads.append(h.grad.clone())
        lin.zero_grad()
        w.grad = None
    assert torch.equal(*grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2048, 1024, 32000), (1000, 512, 128256)])
def test_linear_cross_entropy_gpu(shape, dtype):
    tokens, hidden, vocab = shape
    h = _rand(tokens, hidden, dtype=dtype)
    wt = _rand(vocab, hidden, dtype=dtype, scale=hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), device=DEV)
    labels[::7] = -100
    hs, ws = leaves(h), leaves(wt)
    loss_k, n_k = lima_kernels.linear_cross_entropy(hs[0], ws[0], labels, chunk_size=256)
    loss_t, n_t = ref.linear_cross_entropy(hs[1], ws[1], labels)
    logits = hs[2] @ ws[2].t()  # [T, V] fp64
    loss_g = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    assert int(n_k) == int(n_t)
    # fp32 logits on both sides (cuBLAS vs reference order); atol: fp32 rounding of the sum.
    assert_three_way(loss_k, loss_t, loss_g, 1e-6 * abs(loss_g.item()), "loss")
    for loss in (loss_k / n_k, loss_t / n_t, loss_g / int(n_t)):
        loss.backward()
    assert_three_way(hs[0].grad, hs[1].grad, hs[2].grad, ulp_atol(dtype, hs[2].grad), "grad_hidden")
    assert_three_way(ws[0].grad, ws[1].grad, ws[2].grad, ulp_atol(dtype, ws[2].grad), "grad_weight")


def test_linear_cross_entropy_peak_memory_gpu():
    """Forward + backward at a LLaMA-2-7B-like head (16k tokens, hidden 4096, vocab 32000, bf16):
    peak memory beyond the inputs stays below the fp32 [T, V] logits alone."""
    tokens, hidden, vocab = 16384, 4096, 32000
    h = _rand(tokens, hidden, dtype=torch.bfloat16).requires_grad_()
    w = _rand(vocab, hidden, dtype=torch.bfloat16, scale=hidden**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, n = lima_kernels.linear_cross_entropy(h, w, labels)
    (loss / n).backward()
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base
    full_logits = tokens * vocab * 4
    assert peak_extra < full_logits, (peak_extra / 2**20, full_logits / 2**20)


def test_compiled_inductor_gpu():
    """Inductor compiles a graph around the custom ops without graph breaks."""
    x = torch.randn(256, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w = torch.ones(512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    head = torch.randn(1000, 512, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (256,), device=DEV)

    def f(x):
        res, normed = lima_kernels.dropout_add_rms_norm(x * 2, x, w, 0.1, 3, 0, EPS)
        loss, n = lima_kernels.linear_cross_entropy(lima_kernels.rms_norm(res + normed, w, EPS), head, labels)
        return loss / n

    eager = torch.autograd.grad(f(x), (x, w, head))
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(x), (x, w, head))
    for a, b in zip(compiled, eager):
        # Inductor may fuse/reorder the bf16 elementwise ops around the kernels (one rounding
        # instead of two): within 4 bf16 ulps at the gradient's scale.
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 4 * 2**-8 * scale
