"""Tokenizer: a sentencepiece `tokenizer.model` or an HF `tokenizer.json`, plus LIMA's EOT.

LIMA ends every utterance with a new special end-of-turn token. It is appended after the base
vocabulary (id = base size) unless the file already has it, and the export writes it as an
added special token so that a `transformers` tokenizer loaded from the export gives it the
same id, and `generation_config.json` stops on it.

Each turn is encoded alone (data.encode_conversation), so each starts with its own word
boundary (sentencepiece's dummy prefix). The export's chat template puts the turns between
special tokens, and the export is written so that `transformers` gives every stretch of text
between special tokens that same prefix: the template's ids are then lima-core's, bit for bit
(tests/data/test_chat_template.py), except where a turn's text spells a special token itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from lima_core.checkpoint.atomic import write_bytes, write_json
from lima_core.config import ASSETS

EOT = "<|end_of_turn|>"
BUNDLED_TOKENIZER = ASSETS / "tokenizer.model"

# LIMA's conversation format as a `transformers` chat template: BOS, then every utterance and
# EOT, no role markers (an optional system turn first, then turns alternate, user first), as
# data.encode_conversation encodes them. The model answers right after the last user turn's
# EOT, so add_generation_prompt adds nothing.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set offset = 1 if messages and messages[0]['role'] == 'system' else 0 %}"
    "{% for message in messages %}"
    "{% if not (loop.first and offset) and message['role'] != ['user', 'assistant'][(loop.index0 - offset) % 2] %}"
    "{{ raise_exception('LIMA conversations alternate user and assistant turns, starting with the user, "
    "after an optional first system turn') }}"
    "{% endif %}"
    "{{ message['content'] }}" + EOT +
    "{% endfor %}"
)


class TokenizerError(ValueError):
    """A tokenizer file that is missing or cannot be read; the message is one line, starting with its path."""


class Tokenizer:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = find_tokenizer_file(path)
        elif not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer file (tokenizer.model or tokenizer.json)")
        self.path = path
        if path.suffix == ".json":
            self._init_hf(path)
        else:
            self._init_sentencepiece(path)

    def _init_sentencepiece(self, path: Path):
        import sentencepiece

        self.kind = "sentencepiece"
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError):  # "INTERNAL: could not parse ModelProto from ..."
            raise TokenizerError(f"{path}: not a sentencepiece model (it does not parse); a tokenizer.json must "
                                 "be named *.json") from None
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise TokenizerError(f"{path}: the sentencepiece model has no BOS or EOS token")
        self.base_vocab_size = self._sp.get_piece_size()
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        self.bos_token, self.eos_token = self._sp.id_to_piece(self.bos_id), self._sp.id_to_piece(self.eos_id)
        known = self._sp.piece_to_id(EOT)
        self.eot_id = known if known != self._sp.unk_id() else self.base_vocab_size

    def _init_hf(self, path: Path):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        self.kind = "tokenizer.json"
        config = _read_json(path)
        try:
            self._hf = HFTokenizer.from_str(_prefix_every_chunk(config))
        except Exception as e:  # tokenizers raises a bare Exception: "Model missing. at line 1 column 2"
            raise TokenizerError(f"{path}: not a tokenizer.json the tokenizers library can load: "
                                 f"{_one_line(e)}") from None
        self.base_vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = _special_tokens_of(path, self._hf)
        self.bos_id, self.eos_id = self._hf.token_to_id(self.bos_token), self._hf.token_to_id(self.eos_token)
        self._hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        self.eot_id = self._hf.token_to_id(EOT)

    @property
    def vocab_size(self) -> int:
        """Rows the model needs: the base vocabulary and EOT."""
        return max(self.base_vocab_size, self.eot_id + 1)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, with no BOS, EOS or EOT."""
        if self.kind == "sentencepiece":
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens (EOT included) left out."""
        specials = {self.bos_id, self.eos_id, self.eot_id}
        ids = [i for i in ids if i not in specials]
        if self.kind == "sentencepiece":
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=True)

    def save(self, directory: str | Path):
        """Write the tokenizer files and an HF tokenizer_config.json that declares EOT and the chat template."""
        directory = Path(directory)
        added = {str(self.eot_id): _added_token(EOT)}
        if self.kind == "sentencepiece":
            write_bytes(directory / "tokenizer.model", Path(self.path).read_bytes())
            added.update({str(self.bos_id): _added_token(self.bos_token),
                          str(self.eos_id): _added_token(self.eos_token)})
            unk = self._sp.unk_id()
            added[str(unk)] = _added_token(self._sp.id_to_piece(unk))
            # TokenizersBackend with legacy=True: transformers builds the tokenizer from the
            # model's own settings (merges ranked by piece score, a dummy prefix on every chunk
            # between special tokens, a leading space kept), so it encodes each turn of the chat
            # template as sentencepiece encodes it alone. LlamaTokenizer ranks merges by piece id
            # (LLaMA-2's whitespace pieces have low ids and score -1e9: runs of spaces split
            # differently) and, with legacy=False, prefixes only the text at the very start.
            config = {"tokenizer_class": "TokenizersBackend", "unk_token": self._sp.id_to_piece(unk),
                      "add_bos_token": True, "add_eos_token": False, "legacy": True}
        else:
            write_bytes(directory / "tokenizer.json", self._hf.to_str(pretty=True).encode())
            config = {"tokenizer_class": "PreTrainedTokenizerFast"}
        config.update({"bos_token": self.bos_token, "eos_token": self.eos_token,
                       "extra_special_tokens": [EOT], "added_tokens_decoder": added, "chat_template": CHAT_TEMPLATE})
        write_json(directory / "tokenizer_config.json", config)


def find_tokenizer_file(directory: Path) -> Path:
    """tokenizer.json or tokenizer.model inside a checkpoint folder."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (directory / name).is_file():
            return directory / name
    raise TokenizerError(f"{directory}: no tokenizer.json or tokenizer.model in this folder")


def _read_json(path: Path) -> dict:
    """A JSON object from a file; TokenizerError naming the file if it is not one."""
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, RecursionError, ValueError) as e:  # JSONDecodeError is a ValueError
        where = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else _one_line(e)
        raise TokenizerError(f"{path}: not valid JSON ({where})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path}: expected a JSON object at the top level")
    return config


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _prefix_every_chunk(config: dict) -> str:
    """The tokenizer.json with a Metaspace pre-tokenizer's prepend_scheme "first" made "always".

    "first" gives the word-boundary prefix only to text at the very start of the input; "always"
    gives it to every chunk between special tokens. The two agree on text encoded alone (with
    no special token spelled in it), as lima-core encodes every turn, so the training ids do not
    change; the export gets "always", and a chat template that puts each turn after a special
    token then encodes it as lima-core does."""
    stack = [config.get("pre_tokenizer")]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and node.get("prepend_scheme") == "first":
                node["prepend_scheme"] = "always"
            stack += node.get("pretokenizers") or []
    return json.dumps(config, ensure_ascii=False)


def _special_tokens_of(path: Path, hf) -> tuple[str, str]:
    """BOS and EOS of a tokenizer.json: from tokenizer_config.json beside it, else by convention."""
    config_path = path.parent / "tokenizer_config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        bos, eos = config.get("bos_token"), config.get("eos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if bos and eos:
            for name, token in (("bos_token", bos), ("eos_token", eos)):
                if not isinstance(token, str) or hf.token_to_id(token) is None:
                    raise TokenizerError(f"{config_path}: its {name} {token!r} is not a token of {path.name}")
            return bos, eos
    for bos, eos in (("<s>", "</s>"), ("<|begin_of_text|>", "<|end_of_text|>")):
        if hf.token_to_id(bos) is not None and hf.token_to_id(eos) is not None:
            return bos, eos
    raise TokenizerError(f"{path}: cannot tell its BOS and EOS tokens; put a tokenizer_config.json beside it")


def _added_token(content: str) -> dict:
    return {"content": content, "special": True, "lstrip": False, "rstrip": False,
            "normalized": False, "single_word": False}
