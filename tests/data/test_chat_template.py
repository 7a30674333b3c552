"""The export's chat template against lima-core's own tokenization (issue 10, part 7).

`transformers.AutoTokenizer.from_pretrained(export).apply_chat_template(messages)` must give the
ids lima-core trained on (data.encode_conversation), and with add_generation_prompt=True the ids
lima-core prompts with (data.prompt_ids), with and without a leading system turn (no loss, then
EOT like any utterance), for every tokenizer kind lima-core reads: sentencepiece
files (the bundled one and a real LLaMA-2-style 32k one) and tokenizer.json files (the one
transformers writes, a Metaspace "first" one, the LLaMA-2 hub layout with a Prepend normalizer,
and a byte-level one as LLaMA 3 uses). The reference is lima-core's per-turn encoding; the
template goes through transformers' own tokenizer, built from the exported files.

The one known difference: a turn whose text spells a special token (`<|end_of_turn|>`, `<s>`)
becomes that token in transformers (any chat template does this), where lima-core's
sentencepiece path keeps it as text; the last test pins this down. Near-misses are checked.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
from helpers import ASSETS
from transformers import AutoTokenizer

from lima_core.checkpoint.hf import save_pretrained
from lima_core.data.encode import encode_conversation, prompt_ids
from lima_core.data.formats import Conversation, read_conversations
from lima_core.data.tokenizer import EOT, Tokenizer
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig

NO_TRUNCATION = 10**9


def bundled_conversations() -> list[Conversation]:
    return read_conversations(ASSETS / "train.jsonl") + read_conversations(ASSETS / "dev.jsonl")


SYSTEMS = ["You are a helpful assistant.", "Answer in one word.\nNo more.", "  Be brief.  ",
           "日本語で答えて 🙂"]


# Text the bundled data lacks: spaces at the ends and in runs, newlines, tabs, unicode (accents,
# CJK, emoji, a no-break and a zero-width space, a ligature), digits, sentencepiece's own "▁",
# and near-misses of the special tokens.
WORDS = ["the", "egg", "Hello", "naïve", "café", "日本語", "🙂", "42", "3.14159", "2024-01-01", "x", "Ω", "—",
         "ﬁne", "\u00a0", "\u200b", "▁", "▁▁hi", "def f(x):", "return x", "**bold**", "`code`", "#", "0x1F",
         "<|end_of_turn|", "|end_of_turn|>", "<| end_of_turn |>", "<|END_OF_TURN|>", "end_of_turn", "< s>",
         "</ s>", "<s", "s>", "<unk", "<<|end_of_turn|"]
SEPARATORS = [" ", " ", " ", "  ", "   ", "    ", "\n", "\n\n", "\t", "", "\n    "]
ENDS = ["", "", "", " ", "  ", "\n", "\t", " \n", "\n\n", "    "]


def generated_conversations(n: int, seed: int = 0) -> list[Conversation]:
    """n conversations of 1 to 3 exchanges, every turn with some non-space text; a third of them
    open with a system turn."""
    rng = random.Random(seed)

    def turn() -> str:
        words = rng.choices(WORDS, k=rng.randint(1, 12))
        body = words[0] + "".join(rng.choice(SEPARATORS) + w for w in words[1:])
        return rng.choice(ENDS) + body + rng.choice(ENDS)

    conversations = []
    while len(conversations) < n:
        turns = [turn() for _ in range(2 * rng.randint(1, 3))]
        system = turn() if rng.random() < 1 / 3 else None
        if all(t.strip() for t in turns + [system or "x"]):
            conversations.append(Conversation(turns, system))
    return conversations


def with_systems(conversations: list[Conversation]) -> list[Conversation]:
    """Every fourth bundled conversation again, with a system turn."""
    return [Conversation(c.turns, SYSTEMS[i % len(SYSTEMS)]) for i, c in enumerate(conversations[::4])]


CONVERSATIONS = bundled_conversations() + with_systems(bundled_conversations()) + generated_conversations(160)


def llama2_32k_model(directory: Path) -> Path:
    """The LLaMA-2-style 32k sentencepiece model that mistral-common ships."""
    import mistral_common

    shutil.copyfile(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", directory / "tokenizer.model")
    return directory / "tokenizer.model"


def tokenizer_json_variant(directory: Path, variant: str) -> Path:
    """A tokenizer.json of the 32k model: as transformers writes it, or edited to another layout."""
    export(Tokenizer(llama2_32k_model(directory)), directory / "spm")
    AutoTokenizer.from_pretrained(directory / "spm").save_pretrained(directory / "written")
    path = directory / "written" / "tokenizer.json"
    if variant == "written":
        return path
    config = json.loads(path.read_text())
    if variant == "metaspace-first":  # as transformers' LlamaTokenizer(legacy=False) writes it
        config["normalizer"] = None
        config["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    elif variant == "hub-legacy":  # as meta-llama/Llama-2-7b-hf ships it
        config["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                                    {"type": "Replace", "pattern": {"String": " "},
                                                                     "content": "▁"}]}
        config["pre_tokenizer"] = None
    (directory / variant).mkdir()
    (directory / variant / "tokenizer.json").write_text(json.dumps(config, ensure_ascii=False))
    return directory / variant / "tokenizer.json"


def byte_level_tokenizer_json(directory: Path) -> Path:
    """A small byte-level BPE with LLaMA 3's BOS and EOS names, trained on the bundled turns."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([t for c in bundled_conversations() for t in c.turns], trainer)
    tok.save(str(directory / "tokenizer.json"))
    return directory / "tokenizer.json"


KINDS = ["sentencepiece-bundled", "sentencepiece-llama2-32k", "tokenizer.json-written",
         "tokenizer.json-metaspace-first", "tokenizer.json-hub-legacy", "tokenizer.json-byte-level"]


def tokenizer_of(kind: str, directory: Path) -> Tokenizer:
    if kind == "sentencepiece-bundled":
        return Tokenizer(ASSETS / "tokenizer.model")
    if kind == "sentencepiece-llama2-32k":
        return Tokenizer(llama2_32k_model(directory))
    if kind == "tokenizer.json-byte-level":
        return Tokenizer(byte_level_tokenizer_json(directory))
    return Tokenizer(tokenizer_json_variant(directory, kind.removeprefix("tokenizer.json-")))


def export(tok: Tokenizer, path: Path) -> Path:
    """A whole HF export of a tiny model with this tokenizer, as the trainer writes one."""
    model = Llama(ModelConfig.from_name("tiny", vocab_size=tok.vocab_size, dim=16, n_heads=2, n_kv_heads=1,
                                        ffn_dim=16, n_layers=1))
    save_pretrained(model, path, tokenizer=tok)
    return path


def template_ids(hf_tok, conversation: Conversation, add_generation_prompt: bool = False) -> list[int]:
    messages = [{"role": "system", "content": conversation.system}] if conversation.system is not None else []
    messages += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(conversation.turns)]
    out = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # transformers 5 returns a BatchEncoding


@pytest.fixture(scope="module", params=KINDS)
def tokenizers(request, tmp_path_factory):
    """(kind, lima-core's tokenizer, transformers' tokenizer loaded from lima-core's export of it)."""
    directory = tmp_path_factory.mktemp(request.param)
    tok = tokenizer_of(request.param, directory)
    return request.param, tok, AutoTokenizer.from_pretrained(export(tok, directory / "export"))


def test_the_template_gives_the_training_ids_and_the_prompt_ids(tokenizers):
    kind, tok, hf_tok = tokenizers
    systems = sum(c.system is not None for c in CONVERSATIONS)
    assert len(CONVERSATIONS) >= 200 and systems >= 60
    for c in CONVERSATIONS:
        assert template_ids(hf_tok, c) == encode_conversation(tok, c, NO_TRUNCATION).ids, c
        assert template_ids(hf_tok, c.prompt, add_generation_prompt=True) == prompt_ids(tok, c.prompt), c
    turns = [c.turns for c in CONVERSATIONS]
    print(f"\n{kind} (vocab {tok.vocab_size}, {type(hf_tok).__name__}): {len(CONVERSATIONS)} conversations "
          f"({systems} with a system turn), {sum(map(len, turns))} turns ({sum(len(t) // 2 for t in turns)} "
          f"exchanges, {sum(len(t) == 2 for t in turns)} single-turn) match, and their prompts")


@pytest.mark.parametrize("roles", [["assistant"], ["user", "user"], ["system", "assistant"],
                                   ["system", "system", "user"], ["user", "system", "assistant"],
                                   ["user", "assistant", "system"]])
def test_the_template_rejects_turns_out_of_order(tokenizers, roles):
    # As data.read_conversations does: a system turn only first, then user and assistant alternate.
    _, _, hf_tok = tokenizers
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template([{"role": r, "content": "Hi"} for r in roles], tokenize=False)


def test_a_special_token_spelled_in_text_is_the_one_difference(tmp_path):
    # lima-core's sentencepiece path encodes "<|end_of_turn|>" in a turn as text; the rendered
    # template is one string to transformers, which finds the special token in it.
    tok = Tokenizer(ASSETS / "tokenizer.model")
    turns = Conversation([f"What does {EOT} mean?", "It ends a turn."])
    hf_tok = AutoTokenizer.from_pretrained(export(tok, tmp_path / "export"))
    ours, theirs = encode_conversation(tok, turns, NO_TRUNCATION).ids, template_ids(hf_tok, turns)
    assert ours.count(tok.eot_id) == 2 and theirs.count(tok.eot_id) == 3
