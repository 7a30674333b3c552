"""The model through the Triton kernels (run by the interpreter on this CPU) against the same
model through the plain-torch references: same loss and gradients, dropout masks included,
in every mode a GPU runs it: fp32, bf16 autocast over fp32 parameters, bf16 parameters."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig

VOCAB, DIM = 61, 32


def twin_models(**overrides):
    """Two copies of one model, differing only in the kernels they run."""
    cfg = dict(vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, **overrides)
    models = []
    for kernels in ("triton", "torch"):
        model = Llama(ModelConfig.from_name("tiny", **cfg), kernels=kernels)
        model.init_weights(torch.Generator().manual_seed(0))
        model.set_residual_dropout(0.3)
        models.append(model)
    return models


def packed_batch(device="cpu"):
    """Three examples packed in one row: tokens, labels (30% ignored), positions, cu_seqlens."""
    lengths = [7, 12, 3]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    labels = torch.where(torch.rand(tokens.shape, generator=g) < 0.7, tokens.roll(-1), -100)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    return tuple(t.to(device) for t in (tokens, labels, positions, cu))


def train_step(model, batch, autocast: bool):
    """Forward with residual dropout on, backward: (loss, target count, {name: grad})."""
    tokens, labels, positions, cu = batch
    with torch.autocast(tokens.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss, n = model(tokens, labels, positions=positions, cu_seqlens=cu, max_seqlen=12, dropout_seed=99)
    loss.backward()
    return loss, n, {k: p.grad for k, p in model.named_parameters()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error of a against b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def err(a: torch.Tensor, gold: torch.Tensor) -> float:
    return (a.double() - gold.double()).norm().item()


# mode -> (autocast on, parameter dtype)
MODES = {
    "fp32": (False, torch.float32),
    "bf16-autocast": (True, torch.float32),
    "bf16-params": (False, torch.bfloat16),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_triton_path_equals_reference_path_on_packed_rows(mode):
    compare_paths(mode, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(MODES))
def test_triton_path_equals_reference_path_on_the_gpu(mode):
    """The same, with compiled kernels (bench/gpu_check.sh runs it): the bf16 train step that
    once crashed at its first backward."""
    # Deselected on the CPU by the `gpu` marker; asked for where there is no GPU, it fails.
    assert torch.cuda.is_available(), "a gpu-marked test needs a CUDA device (bench/gpu_check.sh runs it)"
    compare_paths(mode, "cuda")


def compare_paths(mode: str, device: str):
    """Loss and every parameter gradient, untied and tied head. Prints the worst relative
    (normwise) differences of the kernel path from the reference path."""
    autocast, dtype = MODES[mode]
    batch = packed_batch(device)
    worst_loss, worst_grad, worst_name = 0.0, 0.0, ""
    for tied in (False, True):
        triton_model, torch_model = (m.to(device, dtype) for m in twin_models(tie_embeddings=tied))
        gold_model = copy.deepcopy(torch_model).double()  # same weights (and masks), in fp64
        loss_k, n_k, grads_k = train_step(triton_model, batch, autocast)
        loss_t, n_t, grads_t = train_step(torch_model, batch, autocast)
        assert int(n_k) == int(n_t)
        assert loss_k.dtype == loss_t.dtype == torch.float32
        assert set(grads_k) == set(grads_t) and all(g is not None for g in grads_k.values())
        worst_loss = max(worst_loss, rel_err(loss_k, loss_t))
        for name, grad in grads_t.items():
            assert grads_k[name].dtype == grad.dtype == dtype, name
            worst_grad, worst_name = max((worst_grad, worst_name),
                                         (rel_err(grads_k[name], grad), f"{'tied ' if tied else ''}{name}"))

        if mode == "fp32":
            # fp32 on both paths; the kernels reduce in another order (blocked sums, chunked logits).
            torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
            for name, grad in grads_t.items():
                torch.testing.assert_close(grads_k[name], grad, rtol=1e-4, atol=1e-6, msg=name)
            continue

        # bf16: both paths round activations to bf16 at every op, each its own way, and under
        # autocast the kernel path's logits are fp32 where the reference's are bf16 (HF's), so
        # the two differ by bf16 noise, not by a bound of their own. Each is measured against
        # an fp64 run of the reference path on the same weights (same dropout masks): the
        # kernel path's error (normwise) is at most 4x the reference path's. That is the kernel
        # tests' factor 2 (lk_testing.assert_three_way), doubled because the interpreter
        # truncates fp32 -> bf16 where torch (and the GPU) round to nearest: each kernel
        # rounding may be off by a whole ulp instead of half. (Measured: at most 3.0x as run
        # here, 1.9x with the interpreter patched to round to nearest.)
        loss_g, _, grads_g = train_step(gold_model, batch, autocast=False)
        assert err(loss_k, loss_g) <= 4 * err(loss_t, loss_g), f"loss, tied={tied}"
        for name, gold in grads_g.items():
            assert err(grads_k[name], gold) <= 4 * err(grads_t[name], gold), (
                f"{name} (tied={tied}): kernel path error {err(grads_k[name], gold):.3g} > "
                f"4 x reference path error {err(grads_t[name], gold):.3g}"
            )
    print(f"\n{mode} ({device}): worst loss error {worst_loss:.2e}, "
          f"worst grad error {worst_grad:.2e} (param {worst_name})")


def test_head_under_autocast_no_grad_has_fp32_logits():
    """Under torch.no_grad() and autocast the kernel head's loss is that of fp32 logits of the
    operands autocast hands a matmul (bf16 hidden and weight), not of logits rounded to bf16."""
    triton_model, _ = twin_models()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, DIM, generator=g) * 8  # logits of order 1 (init_std weights)
    labels = torch.randint(0, VOCAB, (2, 9), generator=g)
    labels[0, :2] = -100
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, n = triton_model.output(x, labels)
    h = x.reshape(-1, DIM).to(torch.bfloat16).double()  # [T, H]
    w = triton_model.output.matrix().detach().to(torch.bfloat16).double()  # [V, H]
    logits = h @ w.t()  # [T, V]: exact in fp64
    gold = F.cross_entropy(logits, labels.reshape(-1), reduction="sum")
    assert int(n) == 16 and loss.dtype == torch.float32
    # fp32 logits (exact products, fp32 sums) and an fp32 sum of T row losses: fp32 rounding
    # of values of size ~|loss| / T (the kernel tests' loss tolerance).
    tol = 1e-6 * gold.abs().item()
    assert (loss.double() - gold).abs() <= tol
    # Logits rounded to bf16 would miss that tolerance: the check sees their precision.
    bf16_logits_loss = F.cross_entropy(logits.to(torch.bfloat16).double(), labels.reshape(-1), reduction="sum")
    assert (bf16_logits_loss - gold).abs() > tol


def test_triton_path_logits_equal_reference_path():
    triton_model, torch_model = twin_models()
    tokens = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    # fp32, another order of summation in the norms
    torch.testing.assert_close(triton_model(tokens), torch_model(tokens), rtol=1e-5, atol=1e-5)
