"""The optimizer's setup and LIMA's schedule: linear decay without warmup, weight decay on
matrices only."""

import pytest
from helpers import tiny_model

from lima_core.train.optim import lr_at, param_groups


def test_learning_rate_decays_linearly_without_warmup():
    lrs = [lr_at(s, 10, 1e-5, 1e-6) for s in range(10)]
    assert lrs[0] == 1e-5 and lrs[-1] == pytest.approx(1e-6)
    diffs = [a - b for a, b in zip(lrs, lrs[1:])]
    assert diffs == pytest.approx([1e-6] * 9)


def test_weight_decay_on_matrices_only():
    model = tiny_model()
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all("norm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
