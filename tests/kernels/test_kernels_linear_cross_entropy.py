"""Chunked linear + cross-entropy vs the fp32-logits reference: loss, count and gradients
three ways (incl. ignore_index rows), gradient scaling, the low-precision and autocast paths
against a plain-torch fp32 reference, out-of-range labels, and peak memory below the logits."""

import pytest
import torch
from lk_testing import DTYPES, assert_three_way, leaves, ulp_atol
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lima_kernels import reference as ref
from lima_kernels.ops.linear_cross_entropy import (
    LinearCrossEntropy,
    _addmm_fp32_,
    cross_entropy_rows,
    linear_cross_entropy,
    linear_cross_entropy_fwd,
)


def _gold(hidden, weight, labels, ignore_index=-100):
    """fp64 logits and cross-entropy (inputs already rounded to the tested dtype)."""
    logits = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().t()  # [T, V]
    y = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits, y, ignore_index=ignore_index, reduction="sum")
    return loss, (y != ignore_index).sum()


CASES = [
    # (hidden shape, vocab, chunk_size, ignored positions)
    ((37, 24), 101, 16, [0, 5, 36]),  # several chunks with a ragged tail, vocab not a power of 2
    ((5, 123), 64, None, [2]),  # odd hidden size, default chunking (one chunk)
    ((2, 9, 16), 50, 4, [3, 10, 11]),  # batched [B, S, H] with labels [B, S]
]


def _inputs(shape, vocab, ignored, dtype):
    hidden = (torch.randn(shape) * 2).to(dtype)
    weight = (torch.randn(vocab, shape[-1]) * shape[-1] ** -0.5 * 2).to(dtype)
    labels = torch.randint(0, vocab, shape[:-1])
    labels.view(-1)[ignored] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab,chunk,ignored", CASES)
def test_linear_cross_entropy_forward_backward(shape, vocab, chunk, ignored, dtype):
    hidden, weight, labels = _inputs(shape, vocab, ignored, dtype)
    hs = leaves(hidden)
    ws = leaves(weight)
    loss_k, n_k = linear_cross_entropy(hs[0], ws[0], labels, chunk_size=chunk)
    loss_t, n_t = ref.linear_cross_entropy(hs[1], ws[1], labels)
    loss_g, n_g = _gold(hs[2], ws[2], labels)
    assert n_k.dtype == torch.int64 and n_k.shape == () and int(n_k) == int(n_t) == int(n_g)
    assert loss_k.dtype == torch.float32 and loss_k.shape == ()
    # Loss: fp32 logits both sides; atol is fp32 rounding of a sum of |T| terms of size ~|loss|/T.
    assert_three_way(loss_k, loss_t, loss_g, 1e-6 * abs(loss_g.item()), "loss")
    # Mean over targets, as the trainer normalizes: backward scales the saved gradients.
    for loss, n in ((loss_k, n_k), (loss_t, n_t), (loss_g, n_g)):
        (loss / n).backward()
    assert_three_way(hs[0].grad, hs[1].grad, hs[2].grad, ulp_atol(dtype, hs[2].grad), "grad_hidden")
    assert_three_way(ws[0].grad, ws[1].grad, ws[2].grad, ulp_atol(dtype, ws[2].grad), "grad_weight")
    # Ignored rows get exactly zero gradient.
    rows = hs[0].grad.reshape(-1, shape[-1])[ignored]  # [len(ignored), H]
    assert torch.equal(rows, torch.zeros_like(rows))


def test_all_ignored():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    labels = torch.full((6,), -100)
    loss, n = linear_cross_entropy(hidden, weight, labels, chunk_size=4)
    assert int(n) == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(hidden.grad, torch.zeros_like(hidden))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_no_tokens():
    """No chunk runs: the fp32 accumulator no chunk overwrites is zero-filled instead."""
    hidden = torch.randn(0, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(10, 8, dtype=torch.bfloat16, requires_grad=True)
    loss, n = linear_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.int64))
    assert int(n) == 0 and loss.item() == 0.0
    loss.backward()
    assert hidden.grad.shape == (0, 8) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_custom_ignore_index_and_partial_requires_grad():
    hidden, weight, _ = _inputs((12, 20), 30, [], torch.float32)
    labels = torch.randint(0, 29, (12,))
    labels[[1, 7]] = 29  # ignore_index = 29 is also a real class id here
    w = weight.clone().requires_grad_()  # only the weight trains (frozen hidden)
    loss_k, n_k = linear_cross_entropy(hidden, w, labels, ignore_index=29, chunk_size=5)
    loss_r, n_r = ref.linear_cross_entropy(hidden, weight.clone().requires_grad_(), labels, ignore_index=29)
    assert int(n_k) == int(n_r) == 10
    # fp32 on both sides; only summation order differs.
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-5)
    loss_k.backward()
    assert w.grad is not None and hidden.grad is None
    w_ref = weight.clone().requires_grad_()
    ref.linear_cross_entropy(hidden, w_ref, labels, ignore_index=29)[0].backward()
    # fp32 accumulation over 12 tokens in a different order: a few fp32 ulps.
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-6)


def test_no_grad_forward_and_module():
    hidden, weight, labels = _inputs((9, 16), 40, [4], torch.float32)
    head = LinearCrossEntropy(16, 40)
    with torch.no_grad():
        head.weight.copy_(weight)
        loss, n = head(hidden, labels)
    loss_r, n_r = ref.linear_cross_entropy(hidden, weight, labels)
    assert int(n) == int(n_r) == 8
    # fp32 on both sides; only summation order differs.
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 101, 108, 2**40])
def test_out_of_range_label_raises(bad):
    hidden, weight, labels = _inputs((37, 24), 101, [0, 5], torch.float32)
    labels[36] = bad  # the last row of the last chunk: an unchecked read would pass the buffer
    with pytest.raises(RuntimeError, match=r"labels must be in \[0, 101\) or ignore_index \(-100\)"):
        linear_cross_entropy(hidden, weight, labels, chunk_size=16)


def test_ignore_index_minus_one_is_not_out_of_range():
    hidden, weight, labels = _inputs((12, 20), 30, [], torch.float32)
    labels[[2, 11]] = -1
    loss_k, n_k = linear_cross_entropy(hidden, weight, labels, ignore_index=-1, chunk_size=5)
    loss_r, n_r = ref.linear_cross_entropy(hidden, weight, labels, ignore_index=-1)
    assert int(n_k) == int(n_r) == 10
    # fp32 on both sides; only summation order differs.
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-5)


def test_kernel_never_reads_outside_the_row():
    """The kernel alone (the op asserts first): a row whose label is outside [0, V) reads
    nothing outside its row and counts as ignored. Row 0's label V would otherwise read row
    1's first logit, and the last row's would read past the buffer."""
    vocab = 40
    logits = torch.randn(4, vocab)
    labels = torch.tensor([vocab, 7, -3, vocab])
    loss = torch.full((4,), float("nan"))
    grad = logits.clone()  # in place, as the fp32 path runs it
    cross_entropy_rows(logits.clone(), labels, -100, loss, grad)
    expect_loss = torch.nn.functional.cross_entropy(logits[1:2], labels[1:2], reduction="sum")
    expect_grad = torch.softmax(logits[1], -1) - torch.nn.functional.one_hot(labels[1], vocab)
    assert torch.equal(loss[[0, 2, 3]], torch.zeros(3))
    assert torch.equal(grad[[0, 2, 3]], torch.zeros(3, vocab))
    # fp32 both sides, online vs two-pass softmax: a few fp32 ulps of values of size ~1.
    torch.testing.assert_close(loss[1], expect_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad[1], expect_grad, rtol=1e-6, atol=1e-6)


def test_grad_weight_accumulator_first_chunk_overwrites():
    """The fp32 accumulator is never zero-filled: beta=0 on the first chunk ignores what is
    in it (NaN here), beta=1 then adds."""
    a = torch.randn(30, 8).to(torch.bfloat16)
    b = torch.randn(8, 12).to(torch.bfloat16)
    acc = torch.full((30, 12), float("nan"))
    _addmm_fp32_(acc, a, b, beta=0.0)
    exact = a.double() @ b.double()  # [30, 12]
    # bf16 products are exact in fp32; their fp32 sums of 8 terms are off by a few fp32 ulps.
    torch.testing.assert_close(acc, exact.float(), rtol=1e-6, atol=1e-6)
    _addmm_fp32_(acc, a, b, beta=1.0)
    torch.testing.assert_close(acc, 2 * exact.float(), rtol=1e-6, atol=1e-6)


LOW_PRECISION = [
    # (dtype of the inputs, autocast dtype or None, dtype the op computes in)
    (torch.bfloat16, None, torch.bfloat16),
    (torch.float16, None, torch.float16),
    (torch.float32, torch.bfloat16, torch.bfloat16),  # fp32 parameters under autocast
]


@pytest.mark.parametrize("dtype,autocast,compute", LOW_PRECISION)
@pytest.mark.parametrize("grad", [True, False])
def test_low_precision_path_equals_fp32_reference(dtype, autocast, compute, grad):
    """bf16/fp16 operands (given, or cast by autocast): fp32 logits of the exact products,
    the logits' gradient rounded once to the compute dtype, both GEMMs summing in fp32.
    Against plain torch in fp32 on the same rounded operands, outside autocast; grad=False
    runs the op under torch.no_grad()."""
    hidden, weight, labels = _inputs((37, 24), 101, [0, 5, 36], dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        loss, n = linear_cross_entropy(h, w, labels, chunk_size=16)  # 3 chunks
    h32 = hidden.to(compute).float().requires_grad_()  # the operands the op multiplies
    w32 = weight.to(compute).float().requires_grad_()
    logits32 = h32 @ w32.t()  # [T, V] fp32: products of bf16/fp16 values are exact in fp32
    loss32 = torch.nn.functional.cross_entropy(logits32, labels, ignore_index=-100, reduction="sum")
    assert int(n) == 34
    # fp32 logits on both sides, summed in another order: fp32 rounding of a sum of T terms
    # of size ~|loss| / T (as in the three-way test above).
    tol = 1e-6 * loss32.abs().item()
    assert (loss - loss32).abs() <= tol
    # A tolerance low-precision logits would not meet (their rounding moves the loss more),
    # so the test sees whether the logits really are fp32.
    loss_lp = torch.nn.functional.cross_entropy(logits32.to(compute).float(), labels, reduction="sum")
    assert (loss_lp - loss32).abs() > tol
    if not grad:
        return
    loss.backward()
    loss32.backward()
    assert h.grad.dtype == dtype and w.grad.dtype == dtype  # the inputs' own dtypes
    g32 = torch.softmax(logits32.detach(), -1) - torch.nn.functional.one_hot(labels.clamp(min=0), 101)
    g32[labels == -100] = 0  # dloss/dlogits [T, V]
    eps = torch.finfo(compute).eps
    # Elementwise bound: the logits' gradient rounded to the compute dtype (< 1 ulp: the
    # interpreter truncates), the GEMM's fp32 sums (n terms, 2**-24 each) and the result
    # rounded to the compute dtype (half an ulp), each at most eps * (|g| @ |operand|).
    for got, want, scale, n_terms in (
        (h.grad, h32.grad, g32.abs() @ w32.detach().abs(), 101),
        (w.grad, w32.grad, g32.abs().t() @ h32.detach().abs(), 37),
    ):
        bound = (1.5 * eps + n_terms * 2**-24) * scale
        excess = (got.double() - want.double()).abs() - bound
        assert excess.max() <= 0, f"error exceeds the bound by {excess.max().item():.3g}"


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created by torch ops inside the mode, and the
    largest single one. Storages are tracked by weak reference and dropped once freed, so
    the figure is what the CPU allocator holds for tensors created in the region (CPU has
    no allocator statistics like torch.cuda.max_memory_allocated).

    A custom op's body runs below the dispatch mode, so for the op under test the mode runs
    its Python implementation itself, with the mode active: the per-chunk temporaries are
    counted. Not counted: tensors that existed before (inputs), and the Triton
    interpreter's numpy staging copies of a kernel's arguments (copies of the chunk's own
    buffers, on CPU only)."""

    _BODIES = {torch.ops.lima_kernels.linear_cross_entropy.default: linear_cross_entropy_fwd}

    def __init__(self):
        super().__init__()
        self.live = {}  # data_ptr -> (StorageWeakRef, nbytes)
        self.current = self.peak = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = self._BODIES.get(func)
        if body is not None:
            with self:  # count the op's internal allocations too
                out = body(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        for key in [k for k, (w, _) in self.live.items() if w.expired()]:
            self.current -= self.live.pop(key)[1]
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 0:
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.live:
                    self.live[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
                    self.largest = max(self.largest, storage.nbytes())
        self.peak = max(self.peak, self.current)
        return out


def test_peak_memory_below_full_logits():
    tokens, hdim, vocab, chunk = 512, 16, 500, 64
    hidden = torch.randn(tokens, hdim, requires_grad=True)
    weight = torch.randn(vocab, hdim, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    full_logits_bytes = tokens * vocab * 4

    with _LiveTensorBytes() as tracker:
        loss, n = linear_cross_entropy(hidden, weight, labels, chunk_size=chunk)
        (loss / n).backward()
    # The largest allocation is one fp32 logits chunk.
    assert tracker.largest == chunk * vocab * 4, tracker.largest
    # Everything held at once: the chunk, the gradients (+ fp32 accumulator) and their
    # scaled copies, the per-token losses; under half of the [T, V] fp32 logits.
    assert tracker.peak < full_logits_bytes / 2, (tracker.peak, full_logits_bytes)

    # The tracker does see a materialized [T, V]: the reference's peak exceeds it.
    h2, w2 = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    with _LiveTensorBytes() as tracker_ref:
        loss_r, n_r = ref.linear_cross_entropy(h2, w2, labels)
        (loss_r / n_r).backward()
    assert tracker_ref.largest >= full_logits_bytes
