"""Generation: greedy decoding equals transformers' generate; the penalty and nucleus filter
equal transformers' logits processors; the CLI answers from an export."""

import subprocess
import sys

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

from helpers import ASSETS, make_hf_model
from lima_core.sampling import apply_repetition_penalty, generate, sample_next
from lima_core.hf import load_pretrained


@pytest.mark.parametrize("name", ["gqa-llama3-rope", "odd-tied"])
@pytest.mark.parametrize("penalty", [1.0, 1.2])
def test_greedy_decoding_equals_transformers(tmp_path, name, penalty):
    hf = make_hf_model(name).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    prompt = torch.randint(3, hf.config.vocab_size, (11,), generator=torch.Generator().manual_seed(5)).tolist()
    theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, repetition_penalty=penalty,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(ours, prompt, max_new_tokens=24, temperature=0, repetition_penalty=penalty) == theirs


def test_generation_stops_at_a_stop_token(tmp_path):
    hf = make_hf_model("gqa-llama3-rope").eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    free = generate(ours, [5, 6, 7], max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    stopped = generate(ours, [5, 6, 7], max_new_tokens=10, temperature=0, repetition_penalty=1.0, stop_ids={free[3]})
    assert stopped == free[:free.index(free[3]) + 1]


def test_repetition_penalty_equals_transformers():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([3, 7, 7, 20, 49])
    expected = RepetitionPenaltyLogitsProcessor(1.2)(seen[None], logits[None].clone())[0]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.2), expected)


def test_nucleus_sampling_draws_only_from_transformers_top_p_set():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 3
    kept = TopPLogitsWarper(0.9)(None, logits[None] / 0.7)[0].isfinite()
    g = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, 0.7, 0.9, g) for _ in range(3000)}
    assert drawn == set(kept.nonzero().flatten().tolist())  # every kept token appears in 3000 draws


def test_generate_cli_answers_from_an_export(tmp_path):
    from lima_core.config import ModelConfig
    from lima_core.hf import save_pretrained
    from lima_core.model import Llama
    from lima_core.tokenizer import Tokenizer

    tok = Tokenizer(ASSETS / "tokenizer.model")
    model = Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=32, n_heads=4, ffn_dim=32, n_layers=1))
    model.init_weights()
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tok)
    result = subprocess.run([sys.executable, "-m", "lima_core.chat", "--checkpoint", str(tmp_path / "ckpt"),
                             "--prompt", "How do I boil an egg?", "--max-new-tokens", "12"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    chat = subprocess.run([sys.executable, "-m", "lima_core.chat", "--checkpoint", str(tmp_path / "ckpt"),
                           "--chat", "--max-new-tokens", "5"], input="Hi!\nAnd then?\n\n", capture_output=True, text=True)
    assert chat.returncode == 0 and chat.stdout.count("lima>") == 2
