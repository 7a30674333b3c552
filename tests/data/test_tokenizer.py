"""The tokenizer wrapper and its EOT, on the bundled tiny tokenizer and a real 32k LLaMA-2-style one."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ASSETS
from transformers import AutoTokenizer

from lima_core.checkpoint.hf import save_pretrained
from lima_core.data.tokenizer import EOT, Tokenizer
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig


def mistral_v1_tokenizer(tmp_path) -> Path:
    """The LLaMA-2-style 32k sentencepiece model that mistral-common ships."""
    import mistral_common

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    shutil.copyfile(src, tmp_path / "tokenizer.model")
    return tmp_path / "tokenizer.model"


@pytest.fixture(params=["bundled", "llama2-32k"])
def tokenizer_file(request, tmp_path):
    return ASSETS / "tokenizer.model" if request.param == "bundled" else mistral_v1_tokenizer(tmp_path)


# Runs of spaces and a leading space: transformers' LlamaTokenizer ranks the 32k model's merges
# by piece id and merges "a    b" as [a, ____, b] where sentencepiece gives [a, ___, _b]; the
# export names TokenizersBackend, whose merges follow the piece scores as sentencepiece's do.
TEXTS = ["How do I boil an egg?", "Line one.\nLine two: 42 apples, 3.5 kg!", "def f(x):\n\treturn x # tab",
         "a    b", "  indented\n    code", " leading and trailing "]


def test_eot_is_a_new_token_after_the_base_vocabulary(tokenizer_file):
    tok = Tokenizer(tokenizer_file)
    assert tok.eot_id == tok.base_vocab_size and tok.vocab_size == tok.base_vocab_size + 1
    for text in TEXTS:
        assert tok.eot_id not in tok.encode(text + " " + EOT)  # user text cannot forge the special token
        assert tok.decode(tok.encode(text)) == text  # lossless: newlines, tabs and spaces survive


def test_export_round_trips_eot_through_transformers(tokenizer_file, tmp_path):
    tok = Tokenizer(tokenizer_file)
    model = Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=16, n_heads=2, n_kv_heads=1,
                                        ffn_dim=16, n_layers=1))
    save_pretrained(model, tmp_path / "export", tokenizer=tok)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "export")
    assert hf_tok.convert_tokens_to_ids(EOT) == tok.eot_id
    assert hf_tok.encode(EOT, add_special_tokens=False) == [tok.eot_id]
    for text in TEXTS:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
    generation = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert tok.eot_id in generation["eos_token_id"]


def test_tokenizer_json_files_work_too(tmp_path):
    # A tokenizer.json as transformers writes it for the 32k LLaMA-2-style model.
    tok = Tokenizer(mistral_v1_tokenizer(tmp_path))
    model = Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=16, n_heads=2, ffn_dim=16, n_layers=1))
    save_pretrained(model, tmp_path / "spm", tokenizer=tok)
    AutoTokenizer.from_pretrained(tmp_path / "spm").save_pretrained(tmp_path / "fast")
    fast = Tokenizer(tmp_path / "fast" / "tokenizer.json")
    assert fast.eot_id == tok.eot_id and (fast.bos_id, fast.eos_id) == (tok.bos_id, tok.eos_id)
    for text in TEXTS:
        assert fast.encode(text) == tok.encode(text), text
    save_pretrained(model, tmp_path / "export", tokenizer=fast)
    assert AutoTokenizer.from_pretrained(tmp_path / "export").convert_tokens_to_ids(EOT) == tok.eot_id


def test_a_metaspace_first_tokenizer_json_encodes_text_alone_as_before(tmp_path):
    # lima-core gives every chunk between special tokens the word-boundary prefix ("always");
    # the file says "first". On text encoded alone, as every turn is, the ids must not change.
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    tok = Tokenizer(mistral_v1_tokenizer(tmp_path))
    save_pretrained(Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=16, n_heads=2, ffn_dim=16,
                                                n_layers=1)), tmp_path / "spm", tokenizer=tok)
    AutoTokenizer.from_pretrained(tmp_path / "spm").save_pretrained(tmp_path / "fast")
    config = json.loads((tmp_path / "fast" / "tokenizer.json").read_text())
    config["normalizer"] = None
    config["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}]}
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "tokenizer.json").write_text(json.dumps(config))
    as_written = HFTokenizer.from_file(str(tmp_path / "first" / "tokenizer.json"))
    as_written.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    ours = Tokenizer(tmp_path / "first" / "tokenizer.json")
    for text in TEXTS + [" x", "▁x", "\nx"]:
        assert ours.encode(text) == as_written.encode(text, add_special_tokens=False).ids, text
    # After a special token, "first" gives no prefix and "always" does: that is the change.
    assert ours.encode(EOT + "x")[1:] == as_written.encode("x", add_special_tokens=False).ids
    assert as_written.encode(EOT + "x", add_special_tokens=False).ids[1:] != ours.encode("x")
    assert as_written.encode(EOT + "x", add_special_tokens=False).ids[0] == ours.eot_id


def test_new_token_rows_start_at_the_mean_of_the_others():
    model = Llama(ModelConfig.from_name("tiny", vocab_size=50, dim=16, n_heads=2, ffn_dim=16, n_layers=1))
    model.init_weights()
    before_emb, before_out = model.tok_embeddings.weight.clone(), model.output.weight.clone()
    model.resize_vocab(51)
    assert model.tok_embeddings.weight.shape == (51, 16) and model.output.weight.shape == (51, 16)
    assert torch.equal(model.tok_embeddings.weight[:50], before_emb)
    torch.testing.assert_close(model.tok_embeddings.weight[50], before_emb.mean(0))
    torch.testing.assert_close(model.output.weight[50], before_out.mean(0))
    assert model(torch.tensor([[50, 3]])).shape == (1, 2, 51)
