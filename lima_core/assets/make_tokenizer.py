"""Rebuilds the bundled tiny tokenizer (tokenizer.model) from the bundled conversations.

    python lima_core/assets/make_tokenizer.py

A sentencepiece BPE model laid out as LLaMA's: <unk> 0, <s> 1, </s> 2, byte fallback, digits
split, no normalization (newlines and spaces survive). EOT is not in it: lima_core.data.tokenizer
appends it, as it does for any real LLaMA tokenizer.
"""

import io
import json
from pathlib import Path

import sentencepiece

HERE = Path(__file__).parent


def main(vocab_size: int = 1023):
    texts = [turn for name in ("train.jsonl", "dev.jsonl")
             for line in (HERE / name).read_text().splitlines() if line.strip()
             for turn in json.loads(line)["conversations"]]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2)
    (HERE / "tokenizer.model").write_bytes(model.getvalue())


if __name__ == "__main__":
    main()
