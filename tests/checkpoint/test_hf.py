"""HF import/export: transformers loads our exports with the same logits; keys round-trip;
save_pretrained replaces a folder only when it is an earlier export of its own. (Bad checkpoints:
tests/checkpoint/test_bad_checkpoints.py.)"""

import json

import pytest
import torch
from helpers import rel_err
from transformers import LlamaForCausalLM

from lima_core.checkpoint.hf import hf_key, load_pretrained, our_key, save_pretrained


def test_export_loads_in_transformers_with_the_same_logits(hf_checkpoint, tmp_path):
    hf, path = hf_checkpoint
    model = load_pretrained(path)
    save_pretrained(model, tmp_path / "export")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    tokens = torch.randint(0, model.cfg.vocab_size, (1, 19), generator=torch.Generator().manual_seed(0))
    err = rel_err(reloaded(tokens).logits, model(tokens))
    print(f"\nexport reloaded in transformers: logits relative error {err:.2e}")
    assert err < 1e-5  # the fp32 logits target
    # Renaming only: every tensor comes back bit for bit under the same HF key.
    theirs = hf.state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, theirs[key]), key


def test_sharded_export_has_an_index_and_loads_both_ways(tmp_path):
    from helpers import make_hf_model

    hf = make_hf_model("gqa-llama3-rope")
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    tokens = torch.randint(0, 101, (1, 9))
    ours_again = load_pretrained(tmp_path / "sharded")
    theirs = LlamaForCausalLM.from_pretrained(tmp_path / "sharded")
    assert torch.equal(ours_again(tokens), model(tokens))
    assert rel_err(theirs(tokens).logits, model(tokens)) < 1e-5  # the fp32 logits target


def test_key_map_round_trips():
    from lima_core.model.llama import Llama
    from lima_core.model.shapes import ModelConfig

    model = Llama(ModelConfig.from_name("tiny", n_layers=12, dim=32, n_heads=4, ffn_dim=16))
    for key in model.state_dict():
        assert our_key(hf_key(key)) == key
    assert our_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def test_a_failed_export_leaves_the_previous_one_intact(tmp_path):
    from helpers import make_hf_model

    hf = make_hf_model("odd-tied")
    hf.save_pretrained(tmp_path / "hf")
    model = load_pretrained(tmp_path / "hf")
    save_pretrained(model, tmp_path / "export")
    before = (tmp_path / "export" / "model.safetensors").read_bytes()

    class Broken:  # a tokenizer whose save fails half-way through the export
        eos_id, eot_id = 2, 3

        def save(self, directory):
            raise OSError("disk full")

    with pytest.raises(OSError):
        save_pretrained(model, tmp_path / "export", tokenizer=Broken())
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "hf"]  # no temporary left behind


# ---- save_pretrained replaces a folder whole, so only one it wrote ------------------------------


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.is_dir() else folder.read_bytes()


def _transformers_checkpoint(path):
    from helpers import make_hf_model

    make_hf_model("odd-tied").save_pretrained(path)


def _earlier_export(path, **kwargs):
    from helpers import tiny_model

    save_pretrained(tiny_model(seed=1), path, max_shard_bytes=20_000, **kwargs)  # several files, an index


def _tokenizer():
    from helpers import ASSETS

    from lima_core.data.tokenizer import Tokenizer

    return Tokenizer(ASSETS / "tokenizer.model")


def _with_file(setup, name):
    def make(path):
        setup(path)
        (path / name).write_text("my notes\n")
    return make


# (case, what the folder holds before, what the refusal says after "<folder>: "; None: allowed)
SAVE_CASES = [
    ("nothing there", lambda path: None, None),
    ("an empty folder", lambda path: path.mkdir(), None),
    ("an earlier export", _earlier_export, None),
    ("an earlier export with its tokenizer", lambda path: _earlier_export(path, tokenizer=_tokenizer()), None),
    ("a user's file", lambda path: path.mkdir() or (path / "notes.txt").write_text("mine\n"),
     "holds notes.txt, which no lima-core export contains"),
    ("a transformers checkpoint", _transformers_checkpoint, "not empty and not a lima-core export"),
    ("a user's file beside a transformers checkpoint", _with_file(_transformers_checkpoint, "notes.txt"),
     "holds notes.txt, which no lima-core export contains"),
    ("an earlier export with a user's file added", _with_file(_earlier_export, "README.md"),
     "holds README.md, which no lima-core export contains"),
    ("a file", lambda path: path.write_text("mine\n"), "exists and is not a folder"),
]


@pytest.mark.parametrize("case, setup, says", SAVE_CASES, ids=[c[0] for c in SAVE_CASES])
def test_save_pretrained_replaces_only_its_own_export(tmp_path, case, setup, says):
    from helpers import tiny_model

    path = tmp_path / "export"
    setup(path)
    before = _snapshot(path) if path.exists() else None
    model = tiny_model(seed=2)
    if says is not None:
        with pytest.raises(FileExistsError) as error:
            save_pretrained(model, path)
        assert str(error.value).startswith(f"{path}: {says}") and "\n" not in str(error.value)
        assert _snapshot(path) == before  # untouched
        assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary left behind
        return
    save_pretrained(model, path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((path / "config.json").read_text())["exported_by"] == "lima-core"
    tokens = torch.randint(0, 101, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(load_pretrained(path)(tokens), model(tokens))
