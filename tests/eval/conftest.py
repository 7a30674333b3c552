"""Fixtures the evaluation tests share: the tiny checkpoint the server, generate and the pages use."""

import pytest
from helpers import ASSETS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from lima_core.checkpoint.hf import save_pretrained
    from lima_core.data.tokenizer import Tokenizer
    from lima_core.model.llama import Llama
    from lima_core.model.shapes import ModelConfig

    tok = Tokenizer(ASSETS / "tokenizer.model")
    model = Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=32, n_heads=4, ffn_dim=32, n_layers=1))
    model.init_weights()
    path = tmp_path_factory.mktemp("ckpt") / "epoch-3"
    save_pretrained(model, path, tokenizer=tok)
    return path
