"""Tests of the native Philox op (csrc/philox_op.cpp, lima_core/native/philox_uniform.py).

The op against the plain-torch emulation `lima_kernels.philox.philox_uniform` (itself equal to
Triton's `tl.rand`), bit for bit: seeds at the 32-bit word edges and random ones; offsets 0,
odd, across and past 2**32 and at the end of the counter range; lengths 0, 1, 7 (shorter than
one vector), odd ones, and 1000003 (several threads, chunk edges anywhere). Then: the same
bits on 1 and 2 threads; torch.library.opcheck; argument errors; `uniform`'s fallback; and a
tiny Llama with residual dropout, whose loss and gradients are the same bits with the native
stream and with the emulation.
"""

import random

import pytest
import torch

from lima_core import native
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.native import philox_uniform as philox
from lima_kernels.philox import philox_uniform

_rng = random.Random(9)
SEEDS = [0, 1, 2**32 - 1, 2**32, 2**63 - 1, _rng.randrange(2**63), _rng.randrange(2**32)]
OFFSETS = [0, 1, 12345, 2**32 - 3, 2**32 + 2**31 + 1, 2**40 + 5]  # 2**32 - 3: the high word changes inside
LENGTHS = [0, 1, 7, 8, 9, 1003]



@pytest.fixture(autouse=True)
def native_op_is_built():
    """`make setup` builds lima_core/_C; a missing op is a failure with its reason, not a skip."""
    assert native.available(), native.unavailable_reason()


def _native(seed, offset, n):
    return torch.ops.lima.philox_uniform(seed, offset, n)


@pytest.mark.parametrize("seed", SEEDS)
def test_matches_emulation(seed):
    for offset in OFFSETS:
        for n in LENGTHS:
            ours, ref = _native(seed, offset, n), philox_uniform(seed, offset, n)
            assert ours.dtype == torch.float32 and ours.shape == (n,)
            assert torch.equal(ours, ref), (seed, offset, n)
    # The last counters: offset + n == 2**63.
    for n in (1, 7, 1003):
        assert torch.equal(_native(seed, 2**63 - n, n), philox_uniform(seed, 2**63 - n, n)), (seed, n)


@pytest.mark.parametrize("seed,offset", [(2**32 + 17, 2**32 - 500_001), (2**63 - 1, 2**63 - 1_000_003)],
                         ids=["across-2**32", "last-counters"])
def test_matches_emulation_long(seed, offset):
    n = 1_000_003  # odd, many grains: chunk edges fall between vectors
    ours, ref = _native(seed, offset, n), philox_uniform(seed, offset, n)
    assert torch.equal(ours, ref)
    # A uniform stream: the mean of 1e6 draws is 0.5 within 5 standard deviations (sd 2.9e-4).
    assert abs(float(ours.double().mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5


def test_threads_do_not_change_bits():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native(123, 2**32 - 77, 1_000_003)
        torch.set_num_threads(2)
        two = _native(123, 2**32 - 77, 1_000_003)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("args", [(0, 0, 0), (5, 3, 1001), (2**63 - 1, 2**32 - 2, 17)], ids=["empty", "odd", "edges"])
def test_opcheck(args):
    torch.library.opcheck(torch.ops.lima.philox_uniform.default, args)


@pytest.mark.parametrize("seed,offset,n,message", [
    (-1, 0, 4, "seed must be in"),
    (0, -1, 4, "offset must be >= 0"),
    (0, 0, -1, "n must be >= 0"),
    (0, 2**63 - 3, 4, "counters offset..offset\\+n"),
])
def test_bad_arguments(seed, offset, n, message):
    with pytest.raises(RuntimeError, match=message):
        _native(seed, offset, n)
    with pytest.raises(ValueError):  # uniform checks first, as the emulation does
        philox.uniform(seed, offset, n)


def test_uniform_equals_emulation_everywhere():
    # CPU: the native op when built; another device (meta here): the emulation, on that device.
    assert torch.equal(philox.uniform(7, 2**32 - 1, 99), philox_uniform(7, 2**32 - 1, 99))
    assert torch.equal(philox.uniform(7, 5, 99, "cpu"), philox_uniform(7, 5, 99, "cpu"))
    meta = philox.uniform(7, 5, 99, device="meta")
    assert meta.device.type == "meta" and meta.shape == (99,) and meta.dtype == torch.float32
    with pytest.raises(ValueError):
        philox.uniform(2**63, 0, 1)


def _loss_and_grads(model, tokens, labels, seed):
    model.zero_grad(set_to_none=True)
    loss_sum, n = model(tokens, labels, dropout_seed=seed)
    (loss_sum / n).backward()
    return loss_sum.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_model_dropout_same_bits_with_emulation(monkeypatch):
    """The CPU reference path (ops.dropout_add*, uniform=philox.uniform) drops the same
    elements with the native stream as with the emulation: same loss and gradients, bit for bit."""
    torch.manual_seed(0)
    model = Llama(ModelConfig.from_name("tiny"))  # CPU tensors: ops take the reference path
    model.init_weights(torch.Generator().manual_seed(0))
    model.set_residual_dropout(0.2)
    model.train()
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    labels = tokens.roll(-1, dims=1)
    labels[:, -1] = -100

    native_loss, native_grads = _loss_and_grads(model, tokens, labels, seed=2024)
    without, _ = _loss_and_grads(model, tokens, labels, seed=None)
    assert not torch.equal(native_loss, without)  # dropout did drop something
    with monkeypatch.context() as m:
        m.setattr(philox, "uniform", philox_uniform)  # ops looks philox.uniform up at each call
        emulated_loss, emulated_grads = _loss_and_grads(model, tokens, labels, seed=2024)
    assert torch.equal(native_loss, emulated_loss)
    for name, grad in native_grads.items():
        assert torch.equal(grad, emulated_grads[name]), name
