"""Attention over packed rows: the block-diagonal SDPA path against per-example attention
written out by hand, and (on a GPU) the FlashAttention varlen paths against that reference."""

import math

import pytest
import torch

from lima_core.model.attention import attention, packed_causal_mask, sdpa_attention, varlen_attention


def naive_causal(q, k, v):
    """softmax(q k^T / sqrt(d) + causal) v for one sequence; q [s, h, d], k, v [s, hkv, d]."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    s = q.shape[0]
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).to(q.dtype)


def packed_inputs(lengths, h=4, hkv=2, d=16, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    total = sum(lengths)
    q, k, v = (torch.randn(1, total, n, d, generator=g).to(device, dtype) for n in (h, hkv, hkv))
    cu = torch.tensor([0] + lengths).cumsum(0).to(device=device, dtype=torch.int32)
    return q, k, v, cu


def test_packed_mask_is_block_diagonal_causal():
    mask = packed_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    assert torch.equal(mask, expected.bool())


@pytest.mark.parametrize("lengths", [[7], [3, 9, 1, 5], [1, 1, 1]])
def test_packed_sdpa_equals_each_example_alone(lengths):
    q, k, v, cu = packed_inputs(lengths)
    out = sdpa_attention(q, k, v, cu)[0]
    expected = torch.cat([naive_causal(q[0, a:b], k[0, a:b], v[0, a:b]) for a, b in zip(cu[:-1], cu[1:])])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)  # fp32 vs a float64 reference


def test_queries_after_a_cache_see_every_earlier_key():
    q, k, v, _ = packed_inputs([10])
    full = sdpa_attention(q, k, v)
    tail = sdpa_attention(q[:, 6:], k, v)  # the last 4 queries against all 10 keys
    torch.testing.assert_close(tail, full[:, 6:], rtol=1e-5, atol=1e-6)  # fp32, another op order


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_varlen_flash_attention_equals_the_reference_on_cuda(dtype):
    lengths = [100, 1, 333, 64, 2]
    q, k, v, cu = packed_inputs(lengths, h=8, hkv=2, d=64, device="cuda", dtype=dtype)
    out = varlen_attention(q, k, v, cu, max(lengths))
    ref = sdpa_attention(q.float(), k.float(), v.float(), cu)
    low = sdpa_attention(q, k, v, cu)  # torch's own low-precision error, the yardstick
    err, base = (out.float() - ref).abs().max(), (low.float() - ref).abs().max()
    assert err <= 2 * base + 1e-3, (err, base)  # at most twice torch's own rounding, plus an ulp of slack


@pytest.mark.gpu
def test_dispatch_uses_varlen_on_cuda_and_gives_the_same_answer():
    q, k, v, cu = packed_inputs([5, 17, 9], device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(attention(q, k, v, cu, 17).float(), sdpa_attention(q, k, v, cu).float(),
                               rtol=2e-2, atol=2e-2)  # two bf16 kernels, each within bf16 rounding
