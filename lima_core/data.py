"""LIMA data: JSONL conversations -> token ids and loss mask -> packed rows.

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

Every utterance, the system turn included, ends with EOT; the loss covers assistant tokens and
their EOT only. A global batch is packed into rows of at most `max_len` tokens (best-fit
decreasing) with `cu_seqlens` marking the examples and positions that restart at 0 in each, so no
padding is ever computed.

    python -m lima_core.data stats FILE.jsonl [--tokenizer PATH] [--max-len 2048] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lima_core.tokenizer import BUNDLED_TOKENIZER, Tokenizer, TokenizerError

IGNORE = -100
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


@dataclass
class Example:
    """One conversation as model input: ids [n] and next-token labels [n] (IGNORE where no loss)."""

    ids: list[int]
    labels: list[int]


def _utterances(conversation: Conversation | list[str]) -> list[tuple[str, bool]]:
    """(text, trained on) of each utterance in order: the system prompt, if any, then the turns.
    A plain list of turns is a conversation without a system prompt."""
    if isinstance(conversation, Conversation):
        system, turns = conversation.system, conversation.turns
    else:
        system, turns = None, conversation
    utterances = [] if system is None else [(system, False)]
    return utterances + [(turn, i % 2 == 1) for i, turn in enumerate(turns)]


def encode_conversation(tokenizer, conversation: Conversation | list[str], max_len: int) -> Example:
    """BOS, then every utterance followed by EOT; labels on assistant tokens and their EOT; truncated."""
    ids, trained = [tokenizer.bos_id], [False]
    for text, is_target in _utterances(conversation):
        piece = tokenizer.encode(text) + [tokenizer.eot_id]
        ids += piece
        trained += [is_target] * len(piece)
    # Position t predicts token t + 1: its label is that token when the token is trained on.
    labels = [nxt if keep else IGNORE for nxt, keep in zip(ids[1:], trained[1:])] + [IGNORE]
    return truncate(Example(ids, labels), max_len)


def truncate(example: Example, max_len: int) -> Example:
    """The example's first max_len tokens; the last of them predicts nothing."""
    if len(example.ids) <= max_len:
        return example
    return Example(example.ids[:max_len], example.labels[:max_len - 1] + [IGNORE])


def prompt_ids(tokenizer, conversation: Conversation | list[str]) -> list[int]:
    """The ids a model continues to answer the last user turn of `conversation` (an odd number of turns)."""
    ids = [tokenizer.bos_id]
    for text, _ in _utterances(conversation):
        ids += tokenizer.encode(text) + [tokenizer.eot_id]
    return ids


def has_target(example: Example) -> bool:
    return any(label != IGNORE for label in example.labels)


def check_targets(conversations: list[Conversation], examples: list[Example], max_len: int) -> str | None:
    """None when every example keeps a target token within max_len; else a one-line warning that
    says how many lose them all (their assistant turns start past max_len) and on which lines.
    Raises DataError when none keeps one: nothing to train on, or a dev loss of 0 / 0."""
    lost = [c for c, e in zip(conversations, examples, strict=True) if not has_target(e)]
    if not lost:
        return None
    file = lost[0].file
    if len(lost) == len(conversations):
        raise DataError(f"{file}: every conversation ({len(lost)}) starts its assistant turns past --max-len "
                        f"{max_len}: nothing to train on or measure (raise --max-len or shorten the prompts, "
                        f"from line {lost[0].line})")
    lines = ", ".join(str(c.line) for c in lost[:10]) + (", ..." if len(lost) > 10 else "")
    return (f"{file}: {len(lost)} of {len(conversations)} conversations have no assistant token within "
            f"--max-len {max_len} and are trained on nothing (lines {lines})")


@dataclass
class Row:
    """Examples packed into one row: tokens, labels, positions [1, n]; cu_seqlens [k + 1]."""

    tokens: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE).sum())

    def to(self, device) -> "Row":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Row(move(self.tokens), move(self.labels), move(self.positions), move(self.cu_seqlens), self.max_seqlen)


def pack(examples: list[Example], max_len: int) -> list[Row]:
    """Pack examples into as few rows of at most max_len tokens as we can find, deterministically.

    Every row is a micro-batch (a full parameter all-gather at 65B), so fewer rows make a faster
    step; the loss is normalized over the whole global batch (RankBatch.num_targets), so the
    packing does not change it. Best-fit decreasing, or the examples in order where that needs
    fewer rows (BFD is not optimal: lengths 3, 2, 2, 3, 2, 2 fill two rows of 7 in order, three
    by BFD). An example longer than max_len gets a row of its own."""
    lengths = [len(e.ids) for e in examples]
    rows = min(best_fit_decreasing(lengths, max_len), in_order(lengths, max_len), key=len)
    return [_row([examples[i] for i in row]) for row in rows]


def best_fit_decreasing(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices of each row: longest first (ties in order), each into the fullest row it fits, else a new row."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if used[r] + lengths[i] <= max_len]
        if fits:
            best = max(fits, key=lambda r: used[r])  # the first of the fullest
            rows[best].append(i)
            used[best] += lengths[i]
        else:
            rows.append([i])
            used.append(lengths[i])
    return rows


def in_order(lengths: list[int], max_len: int) -> list[list[int]]:
    """Indices of each row: a row closes when the next example would overflow max_len."""
    rows: list[list[int]] = []
    used = 0
    for i, n in enumerate(lengths):
        if not rows or used + n > max_len:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def _row(examples: list[Example]) -> Row:
    lengths = [len(e.ids) for e in examples]
    tokens = torch.tensor([i for e in examples for i in e.ids]).unsqueeze(0)  # [1, n]
    labels = torch.tensor([i for e in examples for i in e.labels]).unsqueeze(0)  # [1, n]
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)  # [1, n]
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)  # [k + 1]
    return Row(tokens, labels, positions, cu_seqlens, max(lengths))


@dataclass
class RankBatch:
    """One rank's share of a global batch: its rows, each with the row's index in the global
    batch (None for an idle row: a rank with fewer rows runs an all-ignored copy of a row, so
    every rank issues the same collectives), and the global batch's counts."""

    rows: list[tuple[int | None, Row]]
    num_targets: int
    """Target tokens of the whole global batch: the loss is normalized by it on every rank."""
    num_tokens: int
    """Tokens of the whole global batch."""


def shard_batch(batch: list[Example], max_len: int, rank: int = 0, world: int = 1) -> RankBatch:
    """Pack the global batch (every rank the same way, no collective) and take rows[rank::world]."""
    rows = pack(batch, max_len)
    mine: list[tuple[int | None, Row]] = [(i, rows[i]) for i in range(rank, len(rows), world)]
    idle = Row(rows[0].tokens, torch.full_like(rows[0].labels, IGNORE), rows[0].positions, rows[0].cu_seqlens,
               rows[0].max_seqlen)
    mine += [(None, idle)] * (math.ceil(len(rows) / world) - len(mine))
    return RankBatch(mine, sum(r.num_targets for r in rows), sum(r.tokens.numel() for r in rows))


def epoch_batches(examples: list[Example], batch_size: int, epoch: int, seed: int) -> list[list[Example]]:
    """The epoch's examples in a seeded random order, cut into global batches (the last may be short)."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    shuffled = [examples[i] for i in order]
    return [shuffled[i:i + batch_size] for i in range(0, len(shuffled), batch_size)]


def stats(conversations: list[Conversation], tokenizer, max_len: int, batch_size: int, seed: int) -> str:
    """What the trainer will make of the data, as lines of text: sizes, token lengths (nearest-rank
    percentiles), truncation, and rows per global batch after packing against the lower bound."""
    whole = [encode_conversation(tokenizer, c, sys.maxsize) for c in conversations]
    examples = [truncate(e, max_len) for e in whole]
    lengths = sorted(len(e.ids) for e in whole)
    percentile = lambda p: lengths[math.ceil(p / 100 * len(lengths)) - 1]  # noqa: E731
    lost = [c.line for c, e in zip(conversations, examples) if not has_target(e)]
    truncated = sum(n > max_len for n in lengths)
    turns = sum(len(c.turns) for c in conversations)
    batches = epoch_batches(examples, batch_size, 1, seed)
    rows = [len(pack(batch, max_len)) for batch in batches]
    bounds = [math.ceil(sum(len(e.ids) for e in batch) / max_len) for batch in batches]
    shown = ", ".join(map(str, lost[:10])) + (", ..." if len(lost) > 10 else "")
    return "\n".join([
        f"conversations: {len(conversations)} ({sum(len(c.turns) > 2 for c in conversations)} multi-turn, "
        f"{sum(c.system is not None for c in conversations)} with a system turn)",
        f"turns: {turns} user and assistant turns, {turns // 2} exchanges",
        f"tokens: min {lengths[0]}, mean {statistics.fmean(lengths):.1f}, p50 {percentile(50)}, p90 {percentile(90)}, "
        f"p99 {percentile(99)}, max {lengths[-1]}",
        f"truncated at --max-len {max_len}: {truncated} ({100 * truncated / len(lengths):.1f}%)",
        f"lose every target: {len(lost)}" + (f" (lines {shown})" if lost else ""),
        f"rows per batch of {batch_size}: mean {statistics.fmean(rows):.2f} after packing, lower bound "
        f"{statistics.fmean(bounds):.2f} ({len(batches)} batch{'es' * (len(batches) > 1)}, seed {seed})",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lima_core.data", description="Look at training data.")
    commands = parser.add_subparsers(dest="command", required=True)
    stats_parser = commands.add_parser("stats", help="sizes, token lengths, truncation and packing of a JSONL file")
    stats_parser.add_argument("file", help="conversations, one JSON object a line")
    stats_parser.add_argument("--tokenizer", default=str(BUNDLED_TOKENIZER), help="tokenizer.model or tokenizer.json "
                              "(default: the bundled one)")
    stats_parser.add_argument("--max-len", type=int, default=2048, help="as the trainer's --max-len")
    stats_parser.add_argument("--batch-size", type=int, default=64, help="conversations a global batch")
    stats_parser.add_argument("--seed", type=int, default=1234, help="the trainer's --seed: the order of epoch 1")
    args = parser.parse_args(argv)
    if args.max_len < 2 or args.batch_size < 1:
        parser.error("--max-len must be at least 2 and --batch-size at least 1")
    try:
        report = stats(read_conversations(args.file), Tokenizer(args.tokenizer), args.max_len, args.batch_size,
                       args.seed)
    except (DataError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.file}\n{report}")


if __name__ == "__main__":
    main()
