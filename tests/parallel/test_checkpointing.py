"""Activation checkpointing recomputes exactly: gradients with "block" and "selective" equal
those without checkpointing, with residual dropout on (masks keyed by the dropout seed)."""

import pytest
import torch
from helpers import tiny_model

from lima_core.parallel.checkpointing import apply_checkpointing


def grads(policy: str, seed: int = 99) -> dict[str, torch.Tensor]:
    model = tiny_model()
    model.set_residual_dropout(0.3)
    apply_checkpointing(model.layers, policy)
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(3, 101, (1, 40), generator=g), torch.randint(3, 101, (1, 40), generator=g)
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    positions = torch.cat([torch.arange(17), torch.arange(23)])[None]
    loss, n = model(tokens, labels, positions=positions, cu_seqlens=cu, max_seqlen=23, dropout_seed=seed)
    (loss / n).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("policy", ["block", "selective"])
def test_gradients_with_checkpointing_equal_those_without(policy):
    want, got = grads("none"), grads(policy)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    print(f"\n{policy}: worst absolute gradient difference vs none, dropout 0.3: {worst:.1e}")
    assert worst == 0.0  # the same ops on the same inputs in the same order: bit-identical on CPU
    # The test has teeth: another dropout seed gives other gradients.
    other = grads(policy, seed=100)
    assert max(float((other[k] - want[k]).abs().max()) for k in want) > 1e-4


def test_unknown_policy_is_an_error_naming_it():
    with pytest.raises(ValueError, match="checkpointing"):
        apply_checkpointing(tiny_model().layers, "sometimes")
