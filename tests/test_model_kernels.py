"""The model through the Triton kernels (run by the interpreter on this CPU) against the same
model through the plain-torch references: same loss and gradients, dropout masks included."""

import pytest
import torch

from lima_core.config import ModelConfig
from lima_core.model import Llama


def twin_models(**overrides):
    """Two copies of one model, differing only in the kernels they run."""
    cfg = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, **overrides)
    models = []
    for kernels in ("triton", "torch"):
        model = Llama(ModelConfig.from_name("tiny", **cfg), kernels=kernels)
        model.init_weights(torch.Generator().manual_seed(0))
        model.set_residual_dropout(0.3)
        models.append(model)
    return models


@pytest.mark.parametrize("tied", [False, True])
def test_triton_path_equals_reference_path_on_packed_rows(tied):
    triton_model, torch_model = twin_models(tie_embeddings=tied)
    lengths = [7, 12, 3]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 61, (1, sum(lengths)), generator=g)
    labels = torch.where(torch.rand(tokens.shape, generator=g) < 0.7, tokens.roll(-1), -100)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    results = []
    for model in (triton_model, torch_model):
        loss, n = model(tokens, labels, positions=positions, cu_seqlens=cu, max_seqlen=12, dropout_seed=99)
        loss.backward()
        results.append((loss, n, {k: p.grad for k, p in model.named_parameters()}))
    (loss_k, n_k, grads_k), (loss_t, n_t, grads_t) = results
    assert int(n_k) == int(n_t)
    # fp32 on both paths; the kernels reduce in another order (blocked sums, chunked logits).
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    for name, grad in grads_t.items():
        torch.testing.assert_close(grads_k[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_triton_path_logits_equal_reference_path():
    triton_model, torch_model = twin_models()
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    # fp32, another order of summation in the norms
    torch.testing.assert_close(triton_model(tokens), torch_model(tokens), rtol=1e-5, atol=1e-5)
