"""Nothing silent (issue 11): every bad data or tokenizer file stops the trainer before it writes
anything, with one line `error: FILE:LINE: what is wrong` and exit status 2; `python -m
lima_core.data stats` stops the same way. Every format users have reads to the same turns, and
random bytes or JSON-ish lines raise DataError and nothing else.

The tables are the specification: a case is its name, the bytes of one file, and the fragment the
message must hold right after that file's path (`:3: not UTF-8 text`, or `: ...` for an error
about the whole file). Decisions they pin down: a BOM may open the file (not a later line); lines
of different formats may share a file, one line keeps to one format; a system turn may only come
first; ShareGPT's "from" takes "user" and "assistant" besides "human" and "gpt"; a key given
twice is an error (json.loads would keep the last); OpenAI's per-turn "weight" other than 1 is an
error (every assistant turn is trained on).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ASSETS, run_entry
from hypothesis import given, settings
from hypothesis import strategies as st

from lima_core.data import describe
from lima_core.data.formats import Conversation, DataError, parse_conversations, read_conversations
from lima_core.train import loop as train

GOOD = b'{"conversations": ["Hello?", "Hi!"]}'


def lines(*rows: bytes) -> bytes:
    return b"\n".join(rows) + b"\n"


def line(record) -> bytes:
    return json.dumps(record).encode()


def messages(*roles_and_contents) -> bytes:
    return line({"messages": [{"role": r, "content": c} for r, c in roles_and_contents]})


def sharegpt(*froms_and_values) -> bytes:
    return line({"conversations": [{"from": f, "value": v} for f, v in froms_and_values]})


def word_level_tokenizer_json() -> bytes:
    """A tokenizer.json whose every space-separated word is one token: a..z, unknown words <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2} | {chr(ord("a") + i): 3 + i for i in range(26)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str().encode()


@dataclass(frozen=True)
class Case:
    name: str
    content: bytes | None
    """The bytes of `file`; None: the file is not written."""
    fragment: str
    """What the message holds right after the path of `named` (default: `file`)."""
    file: str = "train.jsonl"
    """train.jsonl, dev.jsonl, or a file under tok/ (then --tokenizer names tokenizer)."""
    tokenizer: str = ""
    """--tokenizer, under the case's folder; empty: the bundled one, or `file` when it is under tok/."""
    named: str = ""
    args: tuple[str, ...] = ()
    stats: bool = True
    """Whether `python -m lima_core.data stats` must stop on it too (it reports lost targets instead)."""


LONG_PROMPT = {"conversations": ["word " * 40, "Yes."]}  # past --max-len 16 before the assistant speaks

BAD = [
    # Reading the bytes.
    Case("empty file", b"", ": no conversations: the file is empty"),
    Case("blank lines only", b"\n  \r\n\t\n", ": no conversations: the file is blank"),
    Case("a BOM and nothing else", b"\xef\xbb\xbf\n", ": no conversations: the file is blank"),
    Case("not UTF-8", lines(GOOD, GOOD, b'{"conversations": ["caf\xe9", "Hi!"]}'),
         ":3: not UTF-8 text (byte 0xe9 at byte 24 of the line)"),
    Case("UTF-16 file", '{"conversations": ["a", "b"]}\n'.encode("utf-16"), ":1: not UTF-8 text (byte 0xff"),
    Case("lone surrogate escaped", lines(GOOD, b'{"conversations": ["a", "b\\ud800c"]}'),
         ":2: turn 2 holds a lone surrogate (\\ud800) at character 2: such text cannot be encoded"),
    Case("lone low surrogate in a system turn",
         lines(messages(("system", "\udfff"), ("user", "a"), ("assistant", "b"))),
         ":1: turn 1 holds a lone surrogate (\\udfff) at character 1"),
    Case("surrogate pair bytes (CESU-8)", lines(GOOD, '{"conversations": ["a", "b\ud83d\ude00"]}'.encode(
        "utf-8", "surrogatepass")), ":2: not UTF-8 text (byte 0xed"),
    Case("BOM on a later line", lines(GOOD, b"\xef\xbb\xbf" + GOOD),
         ":2: a byte-order mark (U+FEFF) opens the line; only the file's first line may have one"),
    Case("U+2028 alone on a line", lines(GOOD, "\u2028".encode()), ":2: not valid JSON: Expecting value (column 1)"),
    Case("CR line endings (classic Mac)", b"\r".join([GOOD, GOOD]) + b"\r", ":1: not valid JSON: Extra data"),
    # JSON.
    Case("truncated JSON", lines(GOOD, GOOD, b'{"conversations": ["a", "b"'), ":3: not valid JSON: Expecting"),
    Case("raw tab inside a string", lines(b'{"conversations": ["a\tb", "c"]}'),
         ":1: not valid JSON: Invalid control character at (column 22)"),
    Case("deep nesting", lines(GOOD, b'{"conversations": ["a", "b"], "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
         ":2: JSON nested too deeply to read"),
    Case("huge integer", lines(GOOD, b'{"conversations": ["a", "b"], "id": ' + b"7" * 5000 + b"}"),
         ":2: a number of more than 4300 digits"),
    Case("duplicate key", lines(b'{"conversations": ["a", "b"], "conversations": ["c", "d"]}'),
         ":1: key 'conversations' appears twice in one object"),
    Case("a JSON array line", lines(GOOD, b'["Hello?", "Hi!"]'),
         ":2: expected a JSON object, got an array (JSON Lines: one conversation object a line)"),
    Case("a JSON array file", b"[\n" + GOOD + b",\n" + GOOD + b"\n]\n", ":1: not valid JSON: Expecting value"),
    Case("a string line", lines(GOOD, b'"Hello?"'), ":2: expected a JSON object, got a string"),
    Case("null line", lines(b"null"), ":1: expected a JSON object, got null"),
    # Fields.
    Case("no conversations", lines(GOOD, b'{"source": "x"}'), ":2: missing field 'conversations' (or 'messages')"),
    Case("both conversations and messages", lines(b'{"conversations": ["a", "b"], "messages": []}'),
         ":1: has both 'conversations' and 'messages'; give one"),
    Case("conversations a string", lines(b'{"conversations": "a b"}'),
         ":1: 'conversations' must be a non-empty list of turns, not the string 'a b'"),
    Case("no turns", lines(b'{"messages": []}'),
         ":1: 'messages' must be a non-empty list of turns, not an empty array"),
    Case("one turn", lines(GOOD, b'{"conversations": ["only the user"]}'),
         ":2: a conversation needs at least two turns"),
    Case("ends with the user", lines(b'{"conversations": ["a", "b", "c"]}'),
         ":1: the conversation ends with a user turn; it must end with the assistant's"),
    Case("assistant first", lines(messages(("assistant", "a"), ("user", "b"))),
         ":1: turn 1 has role 'assistant', expected 'user': turns must alternate"),
    Case("two user turns", lines(GOOD, messages(("user", "a"), ("user", "b"), ("assistant", "c"))),
         ":2: turn 2 has role 'user', expected 'assistant'"),
    Case("ShareGPT out of order", lines(sharegpt(("system", "s"), ("gpt", "a"), ("human", "b"))),
         ":1: turn 2 has role 'assistant', expected 'user'"),
    Case("system turn not first", lines(messages(("user", "a"), ("assistant", "b"), ("system", "s"), ("user", "c"),
                                                 ("assistant", "d"))),
         ":1: turn 3 is a system turn; only the first turn may be one"),
    Case("two system turns", lines(messages(("system", "s"), ("system", "t"), ("user", "a"), ("assistant", "b"))),
         ":1: turn 2 is a system turn"),
    Case("system and user only", lines(messages(("system", "s"), ("user", "a"))),
         ":1: a conversation needs at least two turns after any system turn"),
    Case("unknown role", lines(messages(("user", "a"), ("assistant", "b"), ("tool", "c"))),
         ":1: turn 3 has unknown role 'tool'; expected one of system, user, assistant"),
    Case("unknown ShareGPT sender", lines(sharegpt(("human", "a"), ("bing", "b"))),
         ":1: turn 2 has unknown from 'bing'; expected one of system, human, gpt, user, assistant"),
    Case("role not a string", lines(b'{"messages": [{"role": ["user"], "content": "a"}]}'),
         ":1: turn 1 has unknown role ['user']"),
    Case("empty content", lines(GOOD, messages(("user", "a"), ("assistant", ""))),
         ":2: turn 2 must have non-empty text, not the string ''"),
    Case("blank content", lines(b'{"conversations": ["a", " \\n\\u2028 "]}'), ":1: turn 2 must have non-empty text"),
    Case("null content (a tool call)", lines(b'{"messages": [{"role": "user", "content": "a"}, '
                                             b'{"role": "assistant", "content": null, "tool_calls": []}]}'),
         ":1: turn 2 must have non-empty text, not null"),
    Case("content parts", lines(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}, '
                                b'{"role": "assistant", "content": "b"}]}'),
         ":1: turn 1 must have non-empty text, not an array"),
    Case("a number turn", lines(b'{"conversations": ["a", 7]}'), ":1: turn 2 is a number where turn 1 is a string"),
    Case("mixed formats in one line", lines(b'{"conversations": ["a", {"role": "assistant", "content": "b"}]}'),
         ":1: turn 2 is an object with keys 'role', 'content' where turn 1 is a string; a line keeps to one format"),
    Case("ShareGPT turns in messages", lines(b'{"messages": [{"from": "human", "value": "a"}]}'),
         ":1: turn 1 is an object with keys 'from', 'value'; a turn of 'messages' is a {role, content} object"),
    Case("a turn of neither format", lines(b'{"conversations": [{"text": "a"}, {"text": "b"}]}'),
         ":1: turn 1 is an object with keys 'text'; a turn of 'conversations' is a string or a {role, content}"),
    Case("OpenAI weight 0", lines(b'{"messages": [{"role": "user", "content": "a"}, '
                                  b'{"role": "assistant", "content": "b", "weight": 0}]}'),
         ":1: turn 2 has weight 0; per-turn weights are not supported"),
    # Targets lost to --max-len (the trainer only: stats reports them).
    Case("every target past --max-len", lines(line(LONG_PROMPT), line(LONG_PROMPT)),
         ": every conversation (2) starts its assistant turns past --max-len 16: nothing to train on or "
         "measure (raise --max-len or shorten the prompts, from line 1)",
         args=("--max-len", "16"), stats=False),
    Case("dev set without a target", lines(line(LONG_PROMPT)),
         ": every conversation (1) starts its assistant turns past --max-len 16", file="dev.jsonl",
         args=("--max-len", "16"), stats=False),
    Case("bad dev line", lines(GOOD, b"{oops"), ":2: not valid JSON", file="dev.jsonl"),
    # Tokenizer files.
    Case("missing tokenizer.model", None, ": no such tokenizer file", file="tok/tokenizer.model"),
    Case("folder without a tokenizer", None, ": no tokenizer.json or tokenizer.model in this folder",
         file="tok/README", tokenizer="tok", named="tok"),
    Case("corrupt tokenizer.model", b"\x0a\x05hello\xff\xff\x00garbage",
         ": not a sentencepiece model (it does not parse)", file="tok/tokenizer.model"),
    Case("empty tokenizer.model", b"", ": not a sentencepiece model", file="tok/tokenizer.model"),
    Case("tokenizer.json not JSON", b'{"version": "1.0", "model": ', ": not valid JSON (line 1 column 29",
         file="tok/tokenizer.json"),
    Case("tokenizer.json not UTF-8", b'{"version": "\xff"}', ": not valid JSON", file="tok/tokenizer.json"),
    Case("tokenizer.json an array", b"[1, 2]", ": expected a JSON object at the top level", file="tok/tokenizer.json"),
    Case("tokenizer.json not a tokenizer", b'{"version": "1.0"}',
         ": not a tokenizer.json the tokenizers library can load: ", file="tok/tokenizer.json"),
    Case("tokenizer.json without BOS or EOS", json.dumps({**json.loads(word_level_tokenizer_json()), "model": {
        "type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"}}).encode(),
         ": cannot tell its BOS and EOS tokens", file="tok/tokenizer.json"),
    Case("tokenizer_config.json not JSON", b"bos_token = '<s>'", ": not valid JSON (line 1 column 1",
         file="tok/tokenizer_config.json", tokenizer="tok/tokenizer.json"),
    Case("tokenizer_config.json names a missing BOS", b'{"bos_token": "<bos>", "eos_token": "</s>"}',
         ": its bos_token '<bos>' is not a token of tokenizer.json", file="tok/tokenizer_config.json",
         tokenizer="tok/tokenizer.json"),
]


@dataclass
class Files:
    data: Path
    dev: Path | None
    tokenizer: Path | None
    named: Path


def write_case(case: Case, folder: Path) -> Files:
    """The case's file, good ones around it: training data, and a tokenizer.json beside a config."""
    path = folder / case.file
    path.parent.mkdir(parents=True, exist_ok=True)
    if case.content is not None:
        path.write_bytes(case.content)
    if case.file == "tok/tokenizer_config.json":
        (folder / "tok" / "tokenizer.json").write_bytes(word_level_tokenizer_json())
    data = path if case.file == "train.jsonl" else folder / "train.jsonl"
    if case.file != "train.jsonl":
        data.write_bytes(lines(GOOD, GOOD))
    tokenizer = case.tokenizer or (case.file if case.file.startswith("tok/") else "")
    return Files(data, path if case.file == "dev.jsonl" else None, folder / tokenizer if tokenizer else None,
                 folder / (case.named or case.file))


def trainer_argv(files: Files, case: Case, out_dir: Path) -> list[str]:
    argv = ["--data", str(files.data), "--dev-data", str(files.dev or ""), "--out-dir", str(out_dir), "--name", "t",
            "--epochs", "1", "--batch-size", "4", *case.args]
    return argv + (["--tokenizer", str(files.tokenizer)] if files.tokenizer else [])


def assert_one_error_line(err: str, expected: str):
    assert err == err.strip("\n") + "\n" and err.count("\n") == 1, err
    assert err.startswith(f"error: {expected}"), err


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_the_trainer_stops_on_bad_input_before_writing(case, tmp_path):
    files = write_case(case, tmp_path)
    runs = tmp_path / "runs"
    result = run_entry(train.main, trainer_argv(files, case, runs), watch=runs)
    assert result.status == 2, result
    assert_one_error_line(result.err, f"{files.named}{case.fragment}")
    assert result.out == "" and result.written == [] and not runs.exists()


STATS_CASES = [c for c in BAD if c.stats]


@pytest.mark.parametrize("case", STATS_CASES, ids=[c.name for c in STATS_CASES])
def test_stats_stops_on_bad_input(case, tmp_path):
    files = write_case(case, tmp_path / "case")
    argv = ["stats", str(files.dev or files.data)] + (["--tokenizer", str(files.tokenizer)] if files.tokenizer else [])
    result = run_entry(describe.main, argv, watch=tmp_path)
    assert result.status == 2, result
    assert_one_error_line(result.err, f"{files.named}{case.fragment}")
    assert result.out == "" and result.written == []


def test_every_case_of_the_issue_is_in_the_table():
    names = {c.name for c in BAD}
    assert {"not UTF-8", "deep nesting", "huge integer", "lone surrogate escaped", "missing tokenizer.model",
            "corrupt tokenizer.model", "tokenizer.json not JSON", "tokenizer.json not a tokenizer",
            "tokenizer_config.json not JSON", "every target past --max-len", "dev set without a target",
            "empty file", "BOM on a later line", "a JSON array line", "assistant first", "empty content",
            "system turn not first", "unknown role", "mixed formats in one line"} <= names
    assert len(names) == len(BAD)


# ---- every format reads to the same turns --------------------------------------------------

SYSTEM = "Be brief.\u2028Very."
TURNS = ["Hi\u2028there?", "Hello.\u2029", "And\u0085you?", "Fine."]  # separators str.splitlines() splits at


def utf8(record) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


def roles(system: str | None, names: tuple[str, str, str], keys: tuple[str, str]) -> list[dict]:
    first = [{keys[0]: names[0], keys[1]: system}] if system is not None else []
    return first + [{keys[0]: names[1 + i % 2], keys[1]: t} for i, t in enumerate(TURNS)]


ROLE_CONTENT, FROM_VALUE = ("role", "content"), ("from", "value")
OPENAI, SHAREGPT = ("system", "user", "assistant"), ("system", "human", "gpt")

# (name, file bytes, the system turn it holds)
VALID = [
    ("LIMA", utf8({"conversations": TURNS, "source": "stackexchange"}), None),
    ("LIMA, escaped", json.dumps({"conversations": TURNS}).encode(), None),
    ("role-content turns", utf8({"conversations": roles(None, OPENAI, ROLE_CONTENT)}), None),
    ("role-content turns and a system turn", utf8({"conversations": roles(SYSTEM, OPENAI, ROLE_CONTENT)}), SYSTEM),
    ("OpenAI messages", utf8({"messages": roles(None, OPENAI, ROLE_CONTENT)}), None),
    ("OpenAI messages and a system turn", utf8({"messages": roles(SYSTEM, OPENAI, ROLE_CONTENT), "id": 3}), SYSTEM),
    ("OpenAI messages, weight 1 and names", utf8({"messages": [
        {**m, "weight": 1, "name": "x"} for m in roles(SYSTEM, OPENAI, ROLE_CONTENT)]}), SYSTEM),
    ("ShareGPT", utf8({"id": "x1", "conversations": roles(None, SHAREGPT, FROM_VALUE)}), None),
    ("ShareGPT and a system turn", utf8({"conversations": roles(SYSTEM, SHAREGPT, FROM_VALUE)}), SYSTEM),
    ("ShareGPT with user and assistant", utf8({"conversations": roles(None, ("system", "user", "assistant"),
                                                                        FROM_VALUE)}), None),
    ("CRLF, a BOM, blank lines", b"\xef\xbb\xbf\r\n \t\r\n" + utf8({"conversations": TURNS}) + b" \r\n\r\n", None),
    ("no final newline", utf8({"messages": roles(SYSTEM, OPENAI, ROLE_CONTENT)}), SYSTEM),
]


@pytest.mark.parametrize("name, content, system", VALID, ids=[v[0] for v in VALID])
def test_every_format_reads_to_the_same_turns(name, content, system, tmp_path):
    if "escaped" not in name:
        assert "\u2028".encode() in content  # the raw separator is in the file, inside a string
    path = tmp_path / "d.jsonl"
    path.write_bytes(content if content.endswith(b"\n") or "final" in name else content + b"\n")
    (conversation,) = read_conversations(path)
    assert (conversation.turns, conversation.system) == (TURNS, system)
    assert conversation.line == (3 if "blank lines" in name else 1) and conversation.file == str(path)


def test_formats_may_mix_across_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(content.removeprefix(b"\xef\xbb\xbf").strip() for _, content, _ in VALID))
    conversations = read_conversations(path)
    assert [(c.turns, c.system, c.line) for c in conversations] == [
        (TURNS, system, i + 1) for i, (_, _, system) in enumerate(VALID)]


# ---- fuzzing: nothing but DataError ---------------------------------------------------------

SPECIAL = st.sampled_from(["\u2028", "\u2029", "\u0085", "\ud800", "\udfff", "\ufeff", "\n", "\r", "\x00", "\t",
                           '"', "\\", "é", "🙂", " "])
TEXT = st.text(st.characters(exclude_categories=()) | SPECIAL, max_size=8)
KEY = st.sampled_from(["conversations", "messages", "role", "content", "from", "value", "weight", "source"]) | TEXT
NAME = st.sampled_from(["system", "user", "assistant", "human", "gpt", "tool", "bing", ""]) | TEXT
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | TEXT
JSON_VALUE = st.recursive(SCALAR, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEY, inner, max_size=4),
                          max_leaves=10)
TURN = (TEXT | JSON_VALUE | st.fixed_dictionaries({"role": NAME, "content": TEXT | JSON_VALUE})
        | st.fixed_dictionaries({"from": NAME, "value": TEXT}, optional={"weight": SCALAR}))
RECORD = st.dictionaries(st.sampled_from(["conversations", "messages", "source", "id"]),
                         st.lists(TURN, max_size=6) | JSON_VALUE, max_size=3)
ODD_LINES = st.sampled_from(["[" * 3000 + "]" * 3000, '{"id": ' + "9" * 5000 + "}", "\ufeff{}", "{oops", "", " "])


CLEAN_TEXT = st.text(st.characters(exclude_categories=("Cs",)) | SPECIAL.filter(lambda c: c not in "\ud800\udfff"),
                     min_size=1, max_size=12).filter(str.strip)


@st.composite
def conversation_lines(draw) -> tuple[bytes, str | None, list[str]]:
    """A valid conversation written in a random format: (its line, system turn, turns)."""
    turns = [t for _ in range(draw(st.integers(1, 3))) for t in (draw(CLEAN_TEXT), draw(CLEAN_TEXT))]
    form = draw(st.sampled_from(["LIMA", "role-content", "messages", "ShareGPT"]))
    system = None if form == "LIMA" else draw(st.none() | CLEAN_TEXT)
    names, keys = (SHAREGPT, FROM_VALUE) if form == "ShareGPT" else (OPENAI, ROLE_CONTENT)
    items = turns if form == "LIMA" else ([{keys[0]: names[0], keys[1]: system}] if system is not None else []) + [
        {keys[0]: names[1 + i % 2], keys[1]: t} for i, t in enumerate(turns)]
    record = {"messages" if form == "messages" else "conversations": items}
    return json.dumps(record, ensure_ascii=draw(st.booleans())).encode(), system, turns


@st.composite
def jsonish_files(draw) -> bytes:
    """A few lines, each a record, a JSON value or an odd line, maybe cut short or with a stray byte."""
    rows = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["record"] * 6 + ["valid"] * 3 + ["odd"]))
        if kind == "valid":
            row = draw(conversation_lines())[0]
        else:
            text = draw(ODD_LINES) if kind == "odd" else json.dumps(draw(RECORD | JSON_VALUE),
                                                                    ensure_ascii=draw(st.booleans()))
            row = text.encode("utf-8", "surrogatepass")
        if draw(st.integers(0, 4)) == 0:
            cut = draw(st.integers(0, len(row)))
            row = row[:cut] + draw(st.binary(max_size=2)) + row[cut:]
        rows.append(row)
    return draw(st.sampled_from([b"\n", b"\r\n"])).join(rows)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzz.jsonl"


def read_or_data_error(path: Path, content: bytes) -> list[Conversation] | None:
    path.write_bytes(content)
    try:
        conversations = read_conversations(path)
        assert conversations and all(c.turns and len(c.turns) % 2 == 0 for c in conversations)
        return conversations
    except DataError as e:
        assert str(e).startswith(f"{path}:") and "\n" not in str(e), e
        return None


def test_random_bytes_raise_only_data_error(fuzz_file):
    ran = 0

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.binary(max_size=300) | st.lists(st.sampled_from([GOOD, b"\n", b"\r", b"\xff", b"{", b"\xef\xbb\xbf"]),
                                              max_size=8).map(b"".join))
    def check(content):
        nonlocal ran
        ran += 1
        read_or_data_error(fuzz_file, content)

    check()
    print(f"\n{ran} random byte strings read: DataError or conversations, nothing else")
    assert ran >= 300


def test_jsonish_lines_raise_only_data_error(fuzz_file):
    ran, read = 0, 0

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(jsonish_files())
    def check(content):
        nonlocal ran, read
        ran += 1
        read += read_or_data_error(fuzz_file, content) is not None

    check()
    print(f"\n{ran} JSON-ish files read ({read} of them valid): DataError or conversations, nothing else")
    assert ran >= 300


def test_valid_conversations_read_back_whatever_the_format():
    ran = 0

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(st.lists(conversation_lines(), min_size=1, max_size=4), st.sampled_from([b"\n", b"\r\n"]))
    def check(rows, newline):
        nonlocal ran
        ran += 1
        conversations = parse_conversations(newline.join(row for row, _, _ in rows), "f.jsonl")
        assert [(c.system, c.turns) for c in conversations] == [(system, turns) for _, system, turns in rows]

    check()
    print(f"\n{ran} files of valid conversations in random formats read back exactly")
    assert ran >= 300


# ---- a run on such data --------------------------------------------------------------------


def test_a_run_warns_of_lost_targets_and_prompts_with_the_system_turn(tmp_path):
    # Line 2 loses every target at --max-len 24; the dev prompt carries a system turn, which the
    # epoch's generations record beside the prompt.
    train_file, dev_file = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train_file.write_bytes(lines(messages(("system", "Be brief."), ("user", "Hi?"), ("assistant", "Hello.")),
                                 line({"conversations": ["word " * 30, "Yes."]}), GOOD, GOOD))
    dev_file.write_bytes(lines(sharegpt(("system", "Be brief."), ("human", "Hi?"), ("gpt", "Hello."))))
    runs = tmp_path / "runs"
    argv = ["--data", str(train_file), "--dev-data", str(dev_file), "--out-dir", str(runs), "--name", "t",
            "--epochs", "1", "--batch-size", "4", "--max-len", "24", "--max-new-tokens", "4", "--plot", "false"]
    result = run_entry(train.main, argv, watch=runs)
    assert result.status == 0, result
    assert (f"warning: {train_file}: 1 of 4 conversations have no assistant token within --max-len 24 and are "
            "trained on nothing (lines 2)\n") in result.err
    (generation,) = json.loads((runs / "t" / "generations-epoch-1.json").read_text())
    assert (generation["system"], generation["prompt"], generation["reference"]) == ("Be brief.", ["Hi?"], "Hello.")


# ---- stats -------------------------------------------------------------------------------


def test_stats_prints_what_the_trainer_will_see(tmp_path):
    # One token a word (a..z), so every length below is counted by hand: BOS, each utterance's
    # words and its EOT. --max-len 11, one batch of all five.
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(word_level_tokenizer_json())
    path = tmp_path / "d.jsonl"
    path.write_bytes(lines(
        line({"conversations": ["a b", "c"]}),  # 1 + 3 + 2 = 6
        messages(("system", "s t"), ("user", "a"), ("assistant", "b c d")),  # 1 + 3 + 2 + 4 = 10
        line({"conversations": ["a", "b", "c d", "e f g"]}),  # 1 + 2 + 2 + 3 + 4 = 12: truncated, keeps b
        b"",
        line({"conversations": ["a b c d e f g h i j k", "x"]}),  # 1 + 12 + 2 = 15: x is token 14, past 11
        sharegpt(("human", "a"), ("gpt", "b")),  # 1 + 2 + 2 = 5
    ))
    result = run_entry(describe.main, ["stats", str(path), "--tokenizer", str(tmp_path / "tok"), "--max-len", "11",
                                   "--batch-size", "8"], watch=tmp_path)
    assert result.status == 0 and result.err == "", result
    # Lengths 5, 6, 10, 12, 15: mean 48 / 5; nearest rank p50 the 3rd, p90 and p99 the 5th.
    # Truncated at 11: 6, 10, 11, 11, 5 = 43 tokens, at least ceil(43 / 11) = 4 rows; best fit:
    # [11], [11], [10], [6, 5].
    assert result.out.splitlines() == [
        str(path),
        "conversations: 5 (1 multi-turn, 1 with a system turn)",
        "turns: 12 user and assistant turns, 6 exchanges",
        "tokens: min 5, mean 9.6, p50 10, p90 15, p99 15, max 15",
        "truncated at --max-len 11: 2 (40.0%)",
        "lose every target: 1 (lines 5)",
        "rows per batch of 8: mean 4.00 after packing, lower bound 4.00 (1 batch, seed 1234)",
    ]


def test_stats_on_the_bundled_sample_agrees_with_the_encoder(tmp_path):
    from lima_core.data.encode import encode_conversation
    from lima_core.data.tokenizer import BUNDLED_TOKENIZER, Tokenizer

    sample = ASSETS / "train.jsonl"
    result = run_entry(describe.main, ["stats", str(sample), "--max-len", "200", "--batch-size", "16"], watch=tmp_path)
    assert result.status == 0, result
    tok = Tokenizer(BUNDLED_TOKENIZER)
    lengths = [len(encode_conversation(tok, c, 10**9).ids) for c in read_conversations(sample)]
    report = dict(row.split(": ", 1) for row in result.out.splitlines()[1:])
    assert report["conversations"].startswith(f"{len(lengths)} (")
    assert report["tokens"].startswith(f"min {min(lengths)}, mean {sum(lengths) / len(lengths):.1f}")
    assert report["tokens"].endswith(f"max {max(lengths)}")
    assert report["truncated at --max-len 200"].startswith(f"{sum(n > 200 for n in lengths)} (")
    assert report["rows per batch of 16"].endswith(f"({-(-len(lengths) // 16)} batches, seed 1234)")


def test_stats_rejects_bad_flags(tmp_path):
    for flags in (["--max-len", "1"], ["--batch-size", "0"]):
        result = run_entry(describe.main, ["stats", str(tmp_path / "d.jsonl"), *flags], watch=tmp_path)
        assert result.status == 2 and "--max-len must be at least 2" in result.err
