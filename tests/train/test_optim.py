"""The optimizer's setup and LIMA's schedule: linear decay without warmup, weight decay on
matrices only."""

import pytest
from helpers import tiny_model

from lima_core.parallel.parallelize import parallelize
from lima_core.train.optim import lr_at


def test_learning_rate_decays_linearly_without_warmup():
    lrs = [lr_at(s, 10, 1e-5, 1e-6) for s in range(10)]
    assert lrs[0] == 1e-5 and lrs[-1] == pytest.approx(1e-6)
    diffs = [a - b for a, b in zip(lrs, lrs[1:])]
    assert diffs == pytest.approx([1e-6] * 9)


def test_weight_decay_on_matrices_only():
    """The trainer's groups (FSDP.param_groups, over the shards): every matrix decays, no norm weight does."""
    model = tiny_model()
    shapes = {n: p.shape for n, p in model.named_parameters()}
    matrices, norms = [n for n, s in shapes.items() if len(s) == 2], [n for n, s in shapes.items() if len(s) < 2]
    assert norms and all("norm" in n for n in norms)
    sharded = parallelize(model, checkpointing="none")
    decay, no_decay = sharded.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    slots = [s for u in sharded.units for s in u.slots]
    assert sorted(s.name for s in slots if s.decay) == sorted(matrices)
    assert sorted(s.name for s in slots if not s.decay) == sorted(norms)
    # One rank: a shard is its unit's whole flat vector, unpadded, so the groups hold exactly these elements.
    assert sum(p.numel() for p in decay["params"]) == sum(shapes[n].numel() for n in matrices)
    assert sum(p.numel() for p in no_decay["params"]) == sum(shapes[n].numel() for n in norms)
