"""Fine-tuning from an HF checkpoint on 1 and 2 ranks: the model is built on the meta device,
each rank reads only its slices of the (multi-file) safetensors, the vocabulary grows by EOT,
and the export streams unit by unit. With lr 0, AdamW changes nothing, so the export must
equal the checkpoint that transformers wrote, plus the new EOT row (the mean of the others)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ASSETS, TORCHRUN
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lima_core.data.tokenizer import Tokenizer


def exported_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A transformers checkpoint over the bundled tokenizer's base vocabulary, in several files."""
    base_vocab = Tokenizer(ASSETS / "tokenizer.model").base_vocab_size
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=base_vocab, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path_factory.mktemp("ckpt")
    LlamaForCausalLM(config).save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.mark.parametrize("ranks", [1, 2])
def test_sliced_loading_and_streaming_export_round_trip(checkpoint, tmp_path, ranks):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(line + "\n" for line in (ASSETS / "train.jsonl").read_text().splitlines()[:4]))
    args = ["-m", "lima_core.train", "--model", str(checkpoint), "--tokenizer", str(ASSETS / "tokenizer.model"),
            "--data", str(data), "--dev-data", "", "--out-dir", str(tmp_path / "runs"), "--name", "t",
            "--epochs", "1", "--batch-size", "4", "--lr", "0", "--lr-end", "0", "--plot", "false"]
    launcher = [sys.executable] if ranks == 1 else [TORCHRUN, "--standalone", "--nproc_per_node", str(ranks)]
    result = subprocess.run(launcher + args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    original = exported_tensors(checkpoint)
    exported = exported_tensors(tmp_path / "runs" / "t" / "epoch-1")
    assert set(exported) == set(original)
    for key, value in original.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert exported[key].shape[0] == value.shape[0] + 1  # EOT appended
            assert torch.equal(exported[key][:-1], value)
            # The new row is the mean of the old ones (computed in float64, stored in fp32).
            torch.testing.assert_close(exported[key][-1], value.double().mean(0).float(), rtol=0, atol=1e-7)
        else:
            assert torch.equal(exported[key], value), key


def test_two_ranks_from_a_bf16_checkpoint_stay_bf16_end_to_end(tmp_path):
    """--dtype bf16 on 2 gloo ranks from a bf16 checkpoint: the export is bf16 (the checkpoint's
    dtype), transformers reads it with lima-core's logits, and the dev answers decoded as one
    batch split over the ranks equal one-prompt-at-a-time greedy decoding of the export."""
    base_vocab = Tokenizer(ASSETS / "tokenizer.model").base_vocab_size
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=base_vocab, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    checkpoint = tmp_path / "ckpt"
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(checkpoint)
    lines = (ASSETS / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("".join(line + "\n" for line in lines[:4]))
    (tmp_path / "dev.jsonl").write_text("".join(line + "\n"
                                                for line in (ASSETS / "dev.jsonl").read_text().splitlines()[:5]))
    args = ["-m", "lima_core.train", "--model", str(checkpoint), "--tokenizer", str(ASSETS / "tokenizer.model"),
            "--data", str(tmp_path / "train.jsonl"),
            "--dev-data", str(tmp_path / "dev.jsonl"), "--out-dir", str(tmp_path / "runs"), "--name", "t",
            "--epochs", "1", "--batch-size", "4", "--lr", "0", "--lr-end", "0", "--plot", "false", "--dtype", "bf16",
            "--temperature", "0", "--max-new-tokens", "6"]
    result = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "t"

    original, exported = exported_tensors(checkpoint), exported_tensors(run / "epoch-1")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    for key, value in original.items():  # lr 0: bf16 in, bf16 out, bit for bit (but the new EOT row)
        assert torch.equal(exported[key][:value.shape[0]], value), key

    from helpers import rel_err

    from lima_core.checkpoint.hf import load_pretrained
    from lima_core.inference.decode import answer

    tokens = torch.randint(0, base_vocab, (1, 19), generator=torch.Generator().manual_seed(0))
    theirs = LlamaForCausalLM.from_pretrained(run / "epoch-1", dtype=torch.float32)(tokens).logits
    ours = load_pretrained(run / "epoch-1")(tokens)
    assert rel_err(ours, theirs) < 1e-5  # the same bf16 weights, both computed in fp32

    model = load_pretrained(run / "epoch-1", dtype=torch.bfloat16)
    tok = Tokenizer(run / "epoch-1")
    generations = __import__("json").loads((run / "generations-epoch-1.json").read_text())
    assert len(generations) == 5
    for g in generations:
        assert g["answer"] == answer(model, tok, g["prompt"], max_new_tokens=6, temperature=0), g["prompt"]


# ---- one rank, in this process: what the sharded path reads, and what it refuses ----------


def sharded_model(cfg, vocab_size: int):
    """A model built on the meta device as the trainer builds it, grown to vocab_size, sharded on one rank."""
    from lima_core.model.llama import Llama
    from lima_core.parallel.parallelize import parallelize

    with torch.device("meta"):
        model = Llama(cfg, kernels="torch")
    model.resize_vocab(vocab_size)
    return parallelize(model, checkpointing="none", device="cpu")


def full_state(sharded) -> dict[str, torch.Tensor]:
    from lima_core.checkpoint.hf import hf_key

    return {hf_key(k): v for unit in sharded.units for k, v in sharded.full_tensors(unit).items()}


def test_one_rank_reads_every_tensor_and_gives_the_new_vocabulary_row_the_mean(checkpoint):
    from lima_core.checkpoint.hf import load_sharded, read_config

    base_vocab = Tokenizer(ASSETS / "tokenizer.model").base_vocab_size
    sharded = sharded_model(read_config(checkpoint), base_vocab + 1)
    load_sharded(sharded, checkpoint)
    original, loaded = exported_tensors(checkpoint), full_state(sharded)
    assert set(loaded) == set(original)
    for key, value in original.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(loaded[key][:-1], value)
            torch.testing.assert_close(loaded[key][-1], value.double().mean(0).float(), rtol=0, atol=1e-7)
        else:
            assert torch.equal(loaded[key], value), key


def file_of(path: Path, key: str) -> Path:
    import json

    return path / json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][key]


def q_proj_half_rows(path: Path) -> Path:
    """Cut the first q_proj to 16 of its 32 rows (the sharded loader used to pad it with the mean
    row, as if it were a grown vocabulary); returns its file."""
    from safetensors.torch import save_file

    key = "model.layers.0.self_attn.q_proj.weight"
    tensors = load_file(file_of(path, key))
    tensors[key] = tensors[key][:16].clone()
    save_file(tensors, file_of(path, key), metadata={"format": "pt"})
    return file_of(path, key)


@pytest.mark.parametrize("case", ["q_proj with half its rows", "a model wider than the checkpoint",
                                  "a model with fewer vocabulary rows"])
def test_the_sharded_path_refuses_a_mismatch_before_writing_a_shard(checkpoint, tmp_path, case):
    import dataclasses
    import shutil

    from lima_core.checkpoint.hf import CheckpointError, load_sharded, read_config

    path = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    cfg = read_config(path)
    vocab = cfg.vocab_size + 1  # EOT, as the trainer grows it
    if case == "q_proj with half its rows":
        at_fault = q_proj_half_rows(path)
        says = "model.layers.0.self_attn.q_proj.weight has shape (16, 32), the config says (32, 32)"
    elif case == "a model wider than the checkpoint":
        cfg = dataclasses.replace(cfg, ffn_dim=64)
        at_fault = file_of(path, "model.layers.0.mlp.gate_proj.weight")
        says = "model.layers.0.mlp.gate_proj.weight has shape (56, 32), the model has (64, 32)"
    else:
        vocab = cfg.vocab_size - 1
        cfg = dataclasses.replace(cfg, vocab_size=vocab)
        at_fault = file_of(path, "model.embed_tokens.weight")
        says = f"model.embed_tokens.weight has shape ({vocab + 1}, 32), the model has ({vocab}, 32)"
    sharded = sharded_model(cfg, vocab)
    with pytest.raises(CheckpointError) as error:
        load_sharded(sharded, path)
    assert str(error.value) == f"{at_fault}: {says}"
    assert all(not unit.shard.any() for unit in sharded.units)  # refused before the first slot was read
