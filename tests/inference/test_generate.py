"""Generation: greedy decoding equals transformers' generate; the penalty and nucleus filter
equal transformers' logits processors; the CLI answers from an export."""

import subprocess
import sys

import pytest
import torch
from helpers import ASSETS, make_hf_model
from transformers import RepetitionPenaltyLogitsProcessor, TopPLogitsWarper

from lima_core.checkpoint.hf import load_pretrained
from lima_core.inference.decode import generate, generate_batch
from lima_core.inference.sampling import apply_repetition_penalty, sample_next


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


@pytest.mark.parametrize("name", ["gqa-llama3-rope", "odd-tied"])
def test_a_batch_of_prompts_decodes_as_each_prompt_alone(tmp_path, name):
    """Left padding is invisible: prompts of lengths 1 to 17 decoded together give the greedy
    answers each gives alone (which equal transformers', above), and each row stops on its own."""
    hf = make_hf_model(name).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, hf.config.vocab_size, (n,), generator=g).tolist() for n in (1, 5, 17, 2, 11, 8)]
    settings = dict(max_new_tokens=16, temperature=0, repetition_penalty=1.2)
    alone = [generate(ours, p, **settings) for p in prompts]
    assert generate_batch(ours, prompts, **settings) == alone
    stop_ids = {alone[2][3], alone[4][9]}  # two rows stop early, at different steps
    alone = [generate(ours, p, stop_ids=stop_ids, **settings) for p in prompts]
    assert any(len(a) < 16 for a in alone)
    assert generate_batch(ours, prompts, stop_ids=stop_ids, **settings) == alone


def test_repetition_penalty_equals_transformers():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    seen = torch.tensor([3, 7, 7, 20, 49])
    expected = RepetitionPenaltyLogitsProcessor(1.2)(seen[None], logits[None].clone())[0]
    seen_mask = torch.zeros(50, dtype=torch.bool).index_fill(0, seen, True)
    assert torch.equal(apply_repetition_penalty(logits[None], seen_mask[None], 1.2)[0], expected)


def test_nucleus_sampling_draws_only_from_transformers_top_p_set():
    logits = torch.randn(40, generator=torch.Generator().manual_seed(1)) * 3
    kept = TopPLogitsWarper(0.9)(None, logits[None] / 0.7)[0].isfinite()
    g = torch.Generator().manual_seed(0)
    drawn = set(sample_next(logits.expand(3000, -1), 0.7, 0.9, g).tolist())
    assert drawn == set(kept.nonzero().flatten().tolist())  # every kept token appears in 3000 draws


def test_generate_cli_answers_from_an_export(tmp_path):
    from lima_core.checkpoint.hf import save_pretrained
    from lima_core.data.tokenizer import Tokenizer
    from lima_core.model.llama import Llama
    from lima_core.model.shapes import ModelConfig

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
                           "--chat", "--max-new-tokens", "5"], input="Hi!\nAnd then?\n\n",
                          capture_output=True, text=True)
    assert chat.returncode == 0 and chat.stdout.count("lima>") == 2
    bf16 = subprocess.run([sys.executable, "-m", "lima_core.chat", "--checkpoint", str(tmp_path / "ckpt"),
                           "--dtype", "bf16", "--prompt", "Hi!", "--max-new-tokens", "5"],
                          capture_output=True, text=True)
    assert bf16.returncode == 0 and bf16.stdout.strip(), bf16.stderr
