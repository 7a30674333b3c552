"""The model against transformers' LlamaForCausalLM, packing, dropout and the KV cache."""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_hf_model, rel_err, tiny_model
from torch.utils.checkpoint import checkpoint

from lima_core.checkpoint.hf import hf_key, load_pretrained
from lima_core.model.kv_cache import KVCache
from lima_core.model.llama import rope_cos_sin

WORST = {}  # name -> worst error seen, printed at the end of the session


def record(name, value):
    WORST[name] = max(WORST.get(name, 0.0), value)


@pytest.fixture(scope="module", autouse=True)
def report_worst():
    yield
    print("\nworst errors vs transformers:", {k: f"{v:.2e}" for k, v in WORST.items()})


def test_logits_and_gradients_equal_transformers(hf_checkpoint):
    hf, path = hf_checkpoint
    model = load_pretrained(path)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    ours, theirs = model(tokens), hf(tokens).logits
    err = rel_err(ours, theirs)
    record("logits", err)
    assert err < 1e-5  # the target for fp32 logits

    F.cross_entropy(ours.flatten(0, 1), tokens.flatten()).backward()
    F.cross_entropy(theirs.flatten(0, 1), tokens.flatten()).backward()
    their_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        err = rel_err(p.grad, their_params[hf_key(name)].grad)
        record("grad", err)
        assert err < 1e-4, name  # the target for parameter gradients


def test_packed_row_equals_each_example_alone():
    model = load_pretrained_from(make_hf_model("gqa-llama3-rope"))
    lengths = [5, 11, 1, 8]
    examples = [torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    tokens = torch.cat(examples)[None]  # [1, 25]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0] + lengths).cumsum(0).int()
    packed = model(tokens, positions=positions, cu_seqlens=cu, max_seqlen=max(lengths))[0]
    alone = torch.cat([model(e[None])[0] for e in examples])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)  # fp32 rounding of a different op order


def load_pretrained_from(hf_model):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hf_model.save_pretrained(d)
        return load_pretrained(d)


def test_residual_dropout_ramp_is_linear_in_depth():
    model = tiny_model(n_layers=4)
    model.set_residual_dropout(0.3)
    assert [b.dropout for b in model.layers] == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_dropout_masks_are_keyed_by_seed_and_reproduced_by_recomputation():
    model = tiny_model()
    model.set_residual_dropout(0.2)
    tokens = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b, c = model(tokens, dropout_seed=7), model(tokens, dropout_seed=7), model(tokens, dropout_seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    model.eval()
    assert torch.equal(model(tokens, dropout_seed=7), model(tokens))  # no dropout outside training
    model.train()

    def loss(recompute):
        model.zero_grad()
        x = model.tok_embeddings(tokens)
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(16).expand(2, 16), x.dtype)
        for block in model.layers:
            x = (checkpoint(block, x, cos, sin, None, None, 7, use_reentrant=False) if recompute
                 else block(x, cos, sin, None, None, 7))
        x.square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for g1, g2 in zip(loss(False), loss(True)):
        assert torch.equal(g1, g2)  # the recomputed masks are the same bits


def test_kv_cache_decoding_equals_full_forward():
    model = tiny_model().eval()
    tokens = torch.randint(0, 101, (1, 12), generator=torch.Generator().manual_seed(3))
    full = model(tokens)
    cache = KVCache(model.cfg, 1, 12, "cpu", torch.float32)
    steps = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-6)  # fp32, different op order
