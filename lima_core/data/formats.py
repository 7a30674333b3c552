"""LIMA data: JSONL conversations, read and checked line by line.

One JSON object a line, in any of the formats fine-tuning data comes in:

    {"conversations": ["user", "assistant", ...], "source": "..."}            LIMA's release
    {"conversations": [{"role": "user", "content": "..."}, ...]}
    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   OpenAI
    {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}    ShareGPT

Turns alternate user and assistant, user first and assistant last, after an optional leading
system turn (LIMA's bare strings have no roles, so no system turn). ShareGPT's "from" may also
say "user" and "assistant". A line keeps to one format; lines of different formats may share a
file (data gathered from several sources). Lines end at a line feed only (U+2028, U+2029 and
U+0085 are legal raw inside JSON strings); a CR before it and a BOM opening the file are fine.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

JSON_WHITESPACE = " \t\r"  # and "\n", which splits the lines; str.strip() would also take U+2028


class DataError(ValueError):
    """Bad training data; the message is one line, starting with `file:line:` (`file:` where the
    problem is the whole file's)."""


@dataclass
class Conversation:
    """One line of the data: its user and assistant turns (alternating, user first, assistant
    last), the system prompt before them or None, and the line it came from."""

    turns: list[str]
    system: str | None = None
    file: str = ""
    line: int = 0

    @property
    def prompt(self) -> Conversation:
        """The conversation up to its last user turn: what the model answers."""
        return Conversation(self.turns[:-1], self.system, self.file, self.line)


def read_conversations(path: str | Path) -> list[Conversation]:
    """Each line's conversation, validated; any problem raises DataError naming the file and line."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse_conversations(data, str(path))


def parse_conversations(data: bytes, file: str) -> list[Conversation]:
    """The conversations of a JSONL file's bytes (read_conversations without the reading)."""
    conversations = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark, as Windows editors write
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{file}:{number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
                            "of the line)") from None
        if line.strip(JSON_WHITESPACE):
            conversations.append(_parse_line(line, file, number))
    if not conversations:
        raise DataError(f"{file}: no conversations: the file is {'blank' if data else 'empty'}")
    return conversations


class _DuplicateKey(Exception):
    pass


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: a key given twice is an error, where json.loads keeps the last silently."""
    record = dict(pairs)
    if len(record) < len(pairs):
        keys = [k for k, _ in pairs]
        raise _DuplicateKey(next(k for i, k in enumerate(keys) if k in keys[:i]))
    return record


JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def _load_json(line: str, where: str):
    try:
        return json.loads(line, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as e:
        if e.msg.startswith("Unexpected UTF-8 BOM"):
            raise DataError(f"{where}: a byte-order mark (U+FEFF) opens the line; only the file's first line "
                            "may have one") from None
        raise DataError(f"{where}: not valid JSON: {e.msg} (column {e.colno})") from None
    except _DuplicateKey as e:
        raise DataError(f"{where}: key {_short(e.args[0])} appears twice in one object") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read") from None
    except ValueError:  # int("9" * 5000): Python's limit on converting long digit strings
        raise DataError(f"{where}: a number of more than {sys.get_int_max_str_digits()} digits") from None


# A turn is a string (LIMA: its position is its role) or an object; each kind of object: the
# key of its role, the role names as lima-core's, the key of its text.
TURN_OBJECTS = {
    "role": ("role", {"system": "system", "user": "user", "assistant": "assistant"}, "content"),
    "from": ("from", {"system": "system", "human": "user", "gpt": "assistant", "user": "user",
                      "assistant": "assistant"}, "value"),
}
TURN_KINDS_OF = {"conversations": ("string", "role", "from"), "messages": ("role",)}
TURN_KIND_NAMES = {"string": "a string", "role": "a {role, content} object", "from": "a {from, value} object"}


def _parse_line(line: str, file: str, number: int) -> Conversation:
    where = f"{file}:{number}"
    record = _load_json(line, where)
    if not isinstance(record, dict):
        hint = " (JSON Lines: one conversation object a line)" if isinstance(record, list) else ""
        raise DataError(f"{where}: expected a JSON object, got {JSON_TYPES[type(record)]}{hint}")
    fields = [f for f in TURN_KINDS_OF if f in record]
    if len(fields) != 1:
        raise DataError(f"{where}: " + ("has both 'conversations' and 'messages'; give one" if fields else
                                        "missing field 'conversations' (or 'messages')"))
    field = fields[0]
    turns = record[field]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: '{field}' must be a non-empty list of turns, not {_described(turns)}")
    kind = _turn_kind(turns[0])
    if kind not in TURN_KINDS_OF[field]:
        allowed = " or ".join(TURN_KIND_NAMES[f] for f in TURN_KINDS_OF[field])
        raise DataError(f"{where}: turn 1 is {_described(turns[0])}; a turn of '{field}' is {allowed}")
    roles, texts = zip(*(_role_and_text(turn, i, kind, where) for i, turn in enumerate(turns)))
    system = texts[0] if roles[0] == "system" else None
    start = 0 if system is None else 1
    for i in range(start, len(roles)):
        expected = ("user", "assistant")[(i - start) % 2]
        if roles[i] == "system":
            raise DataError(f"{where}: turn {i + 1} is a system turn; only the first turn may be one")
        if roles[i] != expected:
            raise DataError(f"{where}: turn {i + 1} has role {roles[i]!r}, expected {expected!r}: turns must "
                            "alternate, starting with the user (after an optional system turn)")
    if len(roles) - start < 2:
        raise DataError(f"{where}: a conversation needs at least two turns after any system turn (user, assistant)")
    if roles[-1] != "assistant":
        raise DataError(f"{where}: the conversation ends with a user turn; it must end with the assistant's")
    return Conversation(list(texts[start:]), system, file, number)


def _turn_kind(turn) -> str | None:
    if isinstance(turn, str):
        return "string"
    if isinstance(turn, dict):
        return next((f for f in ("role", "from") if f in turn), None)
    return None


def _role_and_text(turn, i: int, kind: str, where: str) -> tuple[str, str]:
    """A turn's role (by its position for a bare string) and text, validated. A line keeps to the
    format of its first turn."""
    if _turn_kind(turn) != kind:
        raise DataError(f"{where}: turn {i + 1} is {_described(turn)} where turn 1 is {TURN_KIND_NAMES[kind]}; "
                        "a line keeps to one format")
    if kind == "string":
        role, text = ("user", "assistant")[i % 2], turn
    else:
        role_key, roles, text_key = TURN_OBJECTS[kind]
        name = turn[role_key]
        if not isinstance(name, str) or name not in roles:
            raise DataError(f"{where}: turn {i + 1} has unknown {role_key} {_short(name)}; expected "
                            f"one of {', '.join(roles)}")
        role, text = roles[name], turn.get(text_key)
        if turn.get("weight", 1) != 1:  # OpenAI's weight 0: not trained on, which lima-core cannot honour
            raise DataError(f"{where}: turn {i + 1} has weight {_short(turn['weight'])}; per-turn weights are "
                            "not supported (every assistant turn is trained on)")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: turn {i + 1} must have non-empty text, not {_described(text)}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: turn {i + 1} holds a lone surrogate ({ascii(text[e.start])[1:-1]}) at "
                        f"character {e.start + 1}: such text cannot be encoded") from None
    return role, text


def _described(value) -> str:
    """What a JSON value is, for a message: its type, and a short look at it."""
    if isinstance(value, dict):
        return f"an object with keys {', '.join(_short(k) for k in list(value)[:5])}" if value else "an empty object"
    if isinstance(value, str):
        return f"the string {_short(value)}"
    if value == []:
        return "an empty array"
    return JSON_TYPES.get(type(value), type(value).__name__)


def _short(value, limit: int = 40) -> str:
    """repr of a value from the data, cut short: one line (repr escapes newlines, U+2028 and lone surrogates)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
