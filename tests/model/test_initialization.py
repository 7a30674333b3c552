"""A preset's sharded initialisation: each rank draws only its part, and the values do not
depend on how the parameters are cut into shards (checked on cut points here, and end to end
on 1 and 2 ranks in tests/train/test_train.py)."""

import torch
from helpers import TINY

from lima_core.model.initialization import CHUNK, keyed_normal
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig


def test_any_cut_of_a_parameter_draws_the_same_values():
    numel = 2 * CHUNK + 12345  # three chunks, the last one short
    whole = keyed_normal(7, "layers.0.attn.wq.weight", numel, 0, numel, 0.02, "cpu")
    g = torch.Generator().manual_seed(0)
    for parts in (2, 3, 64):
        cuts = sorted(torch.randint(0, numel, (parts - 1,), generator=g).tolist())
        bounds = [0, *cuts, numel]
        pieces = [keyed_normal(7, "layers.0.attn.wq.weight", numel, a, b, 0.02, "cpu")
                  for a, b in zip(bounds, bounds[1:])]
        assert torch.equal(torch.cat(pieces), whole)


def test_draws_are_normal_and_differ_by_name_and_seed():
    n = 1 << 16
    x = keyed_normal(7, "a", n, 0, n, 0.02, "cpu")
    # N(0, 0.02) over 65536 draws: the sample std within 2% (its standard error is 0.3%).
    assert abs(float(x.std()) / 0.02 - 1) < 0.02 and abs(float(x.mean())) < 0.001
    assert not torch.equal(x, keyed_normal(7, "b", n, 0, n, 0.02, "cpu"))
    assert not torch.equal(x, keyed_normal(8, "a", n, 0, n, 0.02, "cpu"))


def test_init_stds_follow_transformers_rule():
    model = Llama(ModelConfig(**TINY))
    stds = model.init_stds()
    assert set(stds) == {n for n, _ in model.named_parameters()}
    assert stds["norm.weight"] is None and stds["layers.0.attn_norm.weight"] is None
    assert stds["tok_embeddings.weight"] == stds["output.weight"] == stds["layers.1.mlp.w_down.weight"] == 0.02
