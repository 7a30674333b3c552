"""Bad checkpoints: each is refused with one line that starts with the file at fault and says
what is wrong, by the Python API (lima_core.checkpoint.hf.load_pretrained raises CheckpointError) and by
the trainer's command line (exit status 2, `error: ...`, nothing written under the run folder).

Every case starts from a checkpoint transformers wrote itself (four safetensors files and an
index, over the bundled tokenizer's base vocabulary) and corrupts one thing. The one difference
a checkpoint may have from the model it fills, more vocabulary rows in the model (EOT), loads."""

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from helpers import ASSETS, run_entry
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lima_core.checkpoint.hf import INDEX, CheckpointError, check_checkpoint, load_pretrained, read_config
from lima_core.data.tokenizer import Tokenizer
from lima_core.model.llama import Llama

BASE_VOCAB = Tokenizer(ASSETS / "tokenizer.model").base_vocab_size


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=BASE_VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("pristine")
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="60KB")
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / INDEX).is_file()
    return path


@pytest.fixture
def ckpt(pristine, tmp_path) -> Path:
    """A fresh copy of the pristine checkpoint, to corrupt."""
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


# ---- corruptions: each takes the checkpoint folder and returns the path the error must name ----


def file_of(ckpt: Path, key: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][key]


def tensor(key: str, change):
    """Replace the stored tensor `key` by change(tensor); None removes it (the index still lists it)."""
    def corrupt(ckpt):
        file = file_of(ckpt, key)
        tensors = load_file(file)
        new = change(tensors.pop(key))
        save_file(tensors if new is None else {**tensors, key: new}, file, metadata={"format": "pt"})
        return file
    return corrupt


def added(key: str, like: str):
    """A tensor `key`, a copy of `like`, in like's file."""
    def corrupt(ckpt):
        file = file_of(ckpt, like)
        tensors = load_file(file)
        save_file({**tensors, key: tensors[like].clone()}, file, metadata={"format": "pt"})
        return file
    return corrupt


def truncated(key: str):
    def corrupt(ckpt):
        file = file_of(ckpt, key)
        file.write_bytes(file.read_bytes()[:-100])
        return file
    return corrupt


def lying_offsets(key: str):
    """The header says `key`'s bytes run 8 bytes further than they do (into the next tensor's)."""
    def corrupt(ckpt):
        file = file_of(ckpt, key)
        raw = file.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header[key]["data_offsets"][1] += 8
        text = json.dumps(header).encode()
        file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
        return file
    return corrupt


def config(change):
    def corrupt(ckpt):
        d = json.loads((ckpt / "config.json").read_text())
        change(d)
        (ckpt / "config.json").write_text(json.dumps(d))
        return ckpt / "config.json"
    return corrupt


def text(name: str, content: str):
    def corrupt(ckpt):
        (ckpt / name).write_text(content)
        return ckpt / name
    return corrupt


def without_shard(ckpt):
    file_of(ckpt, "model.norm.weight").unlink()
    return ckpt / INDEX


def without_weights(ckpt, pickle: bytes | None = None):
    for file in [*ckpt.glob("*.safetensors"), ckpt / INDEX]:
        file.unlink()
    if pickle is not None:
        (ckpt / "pytorch_model.bin").write_bytes(pickle)  # never loaded: a few bytes will do
    return ckpt


def set_field(name, value):
    return lambda d: d.update({name: value})


def drop_fields(*names):
    return lambda d: [d.pop(name) for name in names]


def wrong_heads(d):
    drop_fields("head_dim")(d)  # with an explicit head_dim, heads need not divide the width
    d.update(num_attention_heads=3, num_key_value_heads=1)


Q = "model.layers.0.self_attn.q_proj.weight"
UP = "model.layers.1.mlp.up_proj.weight"
K = "model.layers.1.self_attn.k_proj.weight"

# (case, corruption, what the message says after "<path>: ")
CASES = [
    ("fewer rows", tensor(Q, lambda t: t[:16].clone()), f"{Q} has shape (16, 32), the config says (32, 32)"),
    ("half the columns", tensor(UP, lambda t: t[:, :16].clone()), f"{UP} has shape (56, 16), the config says (56, 32)"),
    ("extra rows", tensor(K, lambda t: torch.cat([t, t[:8]])), f"{K} has shape (24, 32), the config says (16, 32)"),
    ("fewer vocabulary rows than config.json", tensor("lm_head.weight", lambda t: t[:-1].clone()),
     f"lm_head.weight has shape ({BASE_VOCAB - 1}, 32), the config says ({BASE_VOCAB}, 32)"),
    ("integer tensor", tensor("model.norm.weight", lambda t: t.to(torch.int64)),
     "model.norm.weight is stored as I64; weights must be floating point"),
    ("bool tensor", tensor(Q, lambda t: t > 0), f"{Q} is stored as BOOL; weights must be floating point"),
    ("missing tensor", tensor(UP, lambda t: None), f"lacks {UP}"),
    ("a layer config.json does not have", added("model.layers.2.mlp.up_proj.weight", UP),
     "holds model.layers.2.mlp.up_proj.weight, which has no place in the 2-layer model"),
    ("truncated safetensors", truncated(Q), "not a readable safetensors file, truncated or corrupt ("),
    ("header offsets lie", lying_offsets(Q), "not a readable safetensors file, truncated or corrupt ("),
    ("config.json syntax", text("config.json", '{"hidden_size": 32,}'), "not valid JSON ("),
    ("missing field", config(drop_fields("intermediate_size")), "no intermediate_size (a Llama config.json needs"),
    ("zero heads", config(set_field("num_attention_heads", 0)), "num_attention_heads is 0, not a positive integer"),
    ("string size", config(set_field("hidden_size", "32")), 'hidden_size is "32", not a positive integer'),
    ("heads do not divide the width", config(wrong_heads), "hidden_size 32 is not divisible by num_attention_heads 3"),
    ("index not JSON", text(INDEX, '{"weight_map": '), "not valid JSON ("),
    ("index names a missing file", without_shard, ".safetensors, which is not a file in"),
    ("no weights", without_weights, "no weights (no model.safetensors, no model.safetensors.index.json)"),
    ("only pytorch_model.bin", lambda ckpt: without_weights(ckpt, b"\x80\x04\x95not a real pickle"),
     "holds only pickled weights (pytorch_model.bin); lima-core reads safetensors only and never unpickles"),
]


@pytest.mark.parametrize("case, corrupt, says", [pytest.param(*c, id=c[0]) for c in CASES])
def test_load_pretrained_names_the_file_and_the_fault(ckpt, case, corrupt, says):
    at_fault = corrupt(ckpt)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(ckpt)
    message = str(error.value)
    assert message.startswith(f"{at_fault}: ") and says in message, message
    assert "\n" not in message


@pytest.mark.parametrize("case, corrupt, says", [pytest.param(*c, id=c[0]) for c in CASES])
def test_the_trainer_refuses_before_writing(ckpt, tmp_path, case, corrupt, says):
    at_fault = corrupt(ckpt)
    outcome = train(ckpt, tmp_path)
    assert outcome.status == 2, outcome.err[-2000:]
    assert f"error: {at_fault}: " in outcome.err and says in outcome.err, outcome.err
    assert outcome.written == []


def train(ckpt: Path, tmp_path: Path):
    from lima_core.train.loop import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(line + "\n" for line in (ASSETS / "train.jsonl").read_text().splitlines()[:4]))
    argv = ["--model", str(ckpt), "--tokenizer", str(ASSETS / "tokenizer.model"), "--data", str(data),
            "--dev-data", "", "--out-dir", str(tmp_path / "runs"), "--name", "t", "--epochs", "1",
            "--batch-size", "4", "--lr", "0", "--lr-end", "0", "--plot", "false"]
    return run_entry(main, argv, tmp_path / "runs")


# ---- what is allowed: the model's vocabulary grows by EOT --------------------------------------


def test_a_grown_vocabulary_is_allowed_and_nothing_else_is(pristine):
    cfg = read_config(pristine)
    grown = dataclasses.replace(cfg, vocab_size=BASE_VOCAB + 1)
    assert check_checkpoint(pristine, grown) == cfg
    with torch.device("meta"):
        model = Llama(cfg)
    model.resize_vocab(BASE_VOCAB + 1)
    check_checkpoint(pristine, model)
    refused = {"fewer vocabulary rows": dict(vocab_size=BASE_VOCAB - 1), "wider": dict(dim=48, n_heads=6, n_kv_heads=3),
               "wider MLP": dict(ffn_dim=64)}
    for name, change in refused.items():
        with pytest.raises(CheckpointError, match=r"has shape \(.*\), the model has \(.*\)"):
            check_checkpoint(pristine, dataclasses.replace(cfg, **change))


def test_the_trainer_trains_from_a_checkpoint_whose_vocabulary_grows(pristine, tmp_path):
    outcome = train(pristine, tmp_path)
    assert outcome.status == 0, outcome.err[-2000:]
    export = tmp_path / "runs" / "t" / "epoch-1"
    assert read_config(export).vocab_size == BASE_VOCAB + 1
