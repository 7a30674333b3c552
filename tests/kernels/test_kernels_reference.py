"""The plain-torch references themselves: against Triton's RNG and against HF transformers."""

import pytest
import torch
import triton
import triton.language as tl

from lima_kernels import reference as ref


@triton.jit
def _rand_kernel(out_ptr, seed, offset, n, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if WIDE:
        counter = idx.to(tl.int64) + offset  # int64 counters (hi word used)
    else:
        counter = idx + offset  # int32 counters, as a kernel with small offsets has them
    tl.store(out_ptr + idx, tl.rand(seed, counter), mask=idx < n)


def _triton_rand(seed: int, offset: int, n: int, wide: bool) -> torch.Tensor:
    out = torch.empty(n, dtype=torch.float32)
    block = 256
    _rand_kernel[(triton.cdiv(n, block),)](out, seed, offset, n, BLOCK=block, WIDE=wide)
    return out


SEEDS = [0, 1, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 12345, 987654321987654321, 2**63 - 1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("offset", [0, 1, 777, 2**31 - 100])
def test_philox_matches_triton_rand_int32_counters(seed, offset):
    n = 300  # not a multiple of the block: a masked tail
    got = ref.philox_uniform(seed, offset, n)
    want = _triton_rand(seed, offset, n, wide=False)
    # Bit-for-bit: compare the raw float32 bits, not values.
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("seed", [3, 2**32 + 5, 2**62 + 11])
@pytest.mark.parametrize("offset", [2**32 - 150, 2**33 + 3, 2**40])
def test_philox_matches_triton_rand_int64_counters(seed, offset):
    n = 300  # the first offset crosses 2**32 inside the range (hi word changes)
    got = ref.philox_uniform(seed, offset, n)
    want = _triton_rand(seed, offset, n, wide=True)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_philox_is_uniform():
    u = ref.philox_uniform(1234, 0, 200_000)
    assert u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # Mean of n uniforms has sd sqrt(1/12/n) = 6.5e-4 for n = 2e5; 5 sigma bound.
    assert abs(float(u.double().mean()) - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5
    # Different seeds and shifted offsets give different streams.
    assert not torch.equal(u[:1000], ref.philox_uniform(1235, 0, 1000))
    assert torch.equal(u[10:1010], ref.philox_uniform(1234, 10, 1000))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_reference_is_hf(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hf = LlamaRMSNorm(123, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(123))
    x = torch.randn(5, 7, 123, dtype=dtype)
    # Same ops in the same order: identical bits.
    assert torch.equal(ref.rms_norm(x, hf.weight, 1e-6), hf(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_reference_is_hf(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, s, h, d = 2, 5, 3, 16
    q = torch.randn(b, s, h, d, dtype=dtype)
    freqs = torch.randn(b, s, d // 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, d]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want, _ = apply_rotary_pos_emb(q, q, cos, sin, unsqueeze_dim=2)
    # Same ops in the same order: identical bits.
    assert torch.equal(ref.rotary(q, cos, sin), want)


def test_dropout_add_reference_semantics():
    x = torch.randn(4, 33, requires_grad=True)
    r = torch.randn(4, 33, requires_grad=True)
    p, seed, offset = 0.3, 99, 5
    out = ref.dropout_add(x, r, p, seed, offset)
    u = ref.philox_uniform(seed, offset, x.numel()).view(4, 33)  # [4, 33]
    keep = u >= p
    # Elementwise: a kept x / (1 - p) plus the residual, in fp32: exact match.
    assert torch.equal(out, r + torch.where(keep, x / (1 - p), torch.zeros(())))
    out.backward(torch.ones_like(out))
    assert torch.equal(r.grad, torch.ones_like(r))
    assert torch.equal(x.grad, torch.where(keep, torch.full_like(x, 1 / (1 - p)), torch.zeros(())))
    # p == 0 is exactly residual + x.
    assert torch.equal(ref.dropout_add(x, r, 0.0, seed, offset), r + x)
    with pytest.raises(ValueError):
        ref.dropout_add(x, r, 1.0, seed, offset)


def test_linear_cross_entropy_reference():
    t, hdim, v = 9, 12, 17
    hidden = torch.randn(t, hdim, dtype=torch.float64)
    weight = torch.randn(v, hdim, dtype=torch.float64)
    labels = torch.randint(0, v, (t,))
    labels[[1, 4]] = -100
    loss, n = ref.linear_cross_entropy(hidden.float(), weight.float(), labels)
    logits = hidden @ weight.t()  # [t, v] fp64
    valid = labels != -100
    lse = torch.logsumexp(logits, dim=-1)
    want = (lse - logits.gather(1, labels.clamp(min=0)[:, None])[:, 0])[valid].sum()
    assert n.dtype == torch.int64 and int(n) == 7
    # fp32 logits over 12 terms vs fp64: relative rounding ~1e-6 of the loss.
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
