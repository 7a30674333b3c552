"""The SQLite file every judgment lands in, a model's or a person's, so that reruns are free and
the report reads everything from one place.

Tables:

    responses  one row per response judged: hash (sha256 of the JSON [system, prompt_id,
               sample, prompt, response]; the key the judgments point at), system, prompt_id,
               sample, prompt (JSON {"system": str | null, "turns": [...]}), response.

    judgments  one row per pairwise judgment of one order: prompt_id, sample, system_a,
               system_b, response_a, response_b (response hashes), order_shown, rater,
               rater_kind, template_hash, raw_reply, verdict, attempts, latency_s, created_at.

      system_a is the system under test (the first file of `eval judge`), system_b the
      baseline. order_shown "AB": system_a's response was shown as "Answer A"; "BA": system_b's
      was. verdict is always in terms of the un-swapped systems: "A" system_a's response is
      better, "B" system_b's is, "tie" the rater said neither is significantly better,
      "unparsed" the reply did not end with a verdict line after every retry (never a tie).
      rater is the judge model's name or a person's; rater_kind "model" or "person".
      template_hash is the sha256 of the prompt template the rater answered (for a person: of
      the instructions shown, or "" when not recorded). attempts counts the requests the row
      took (HTTP errors and unparsed replies retried); only the last attempt's reply is kept,
      and latency_s is that attempt's (NULL for a person).

    likert     one row per graded response (LIMA section 5): prompt_id, sample, system,
               response (hash), rater, rater_kind, template_hash, raw_reply, grade (1-6, NULL
               when unparsed), attempts, latency_s, created_at.

    annotators   one row per person signed in to the annotation page (eval annotate): name (the
                 rater of their judgments), token (their private link), csrf (the token every
                 answer must carry), created_at.

    assignments  the items an annotator was given, in the order they are shown: annotator,
                 position (0, 1, ...), prompt_id, sample, system_a, system_b, response_a,
                 response_b, order_shown ("AB": system_a's response on the left; drawn at random
                 per annotator and item). The answer is the annotator's judgments row of the item.

    conversations  one row per live conversation (eval chat): id, annotator, checkpoint (the
                 served model's name), created_at.

    turns        one row per exchange of a conversation: conversation, turn (0, 1, ...), user
                 (the person's message), reply (the model's), label ("fail", "pass",
                 "excellent"; NULL until the person labels it, LIMA section 6), created_at.

A judgment's cache key is its UNIQUE constraint: (prompt_id, sample, both systems, both
responses' hashes, order, rater, template_hash). A row present is never asked again. When a
system's responses are regenerated their hashes change and new rows are added beside the old
ones; the report reads, for each (systems, prompt, sample, rater, order), the newest row.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# One pair of responses to one prompt in the order shown: the columns a judgment and an
# assignment both name their item by.
PAIR_SHOWN = """\
    prompt_id TEXT NOT NULL,
    sample INTEGER NOT NULL,
    system_a TEXT NOT NULL,
    system_b TEXT NOT NULL,
    response_a TEXT NOT NULL REFERENCES responses(hash),
    response_b TEXT NOT NULL REFERENCES responses(hash),
    order_shown TEXT NOT NULL CHECK (order_shown IN ('AB', 'BA')),"""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS responses (
    hash TEXT PRIMARY KEY,
    system TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    sample INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS judgments (
    id INTEGER PRIMARY KEY,
{PAIR_SHOWN}
    rater TEXT NOT NULL,
    rater_kind TEXT NOT NULL CHECK (rater_kind IN ('model', 'person')),
    template_hash TEXT NOT NULL,
    raw_reply TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('A', 'B', 'tie', 'unparsed')),
    attempts INTEGER NOT NULL,
    latency_s REAL,
    created_at TEXT NOT NULL,
    UNIQUE (prompt_id, sample, system_a, system_b, response_a, response_b, order_shown, rater, template_hash)
);
CREATE TABLE IF NOT EXISTS likert (
    id INTEGER PRIMARY KEY,
    prompt_id TEXT NOT NULL,
    sample INTEGER NOT NULL,
    system TEXT NOT NULL,
    response TEXT NOT NULL REFERENCES responses(hash),
    rater TEXT NOT NULL,
    rater_kind TEXT NOT NULL CHECK (rater_kind IN ('model', 'person')),
    template_hash TEXT NOT NULL,
    raw_reply TEXT NOT NULL,
    grade INTEGER CHECK (grade BETWEEN 1 AND 6),
    attempts INTEGER NOT NULL,
    latency_s REAL,
    created_at TEXT NOT NULL,
    UNIQUE (prompt_id, sample, system, response, rater, template_hash)
);
CREATE TABLE IF NOT EXISTS annotators (
    name TEXT PRIMARY KEY,
    token TEXT NOT NULL UNIQUE,
    csrf TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS assignments (
    annotator TEXT NOT NULL REFERENCES annotators(name),
    position INTEGER NOT NULL,
{PAIR_SHOWN}
    PRIMARY KEY (annotator, position),
    UNIQUE (annotator, prompt_id, sample, system_a, system_b)
);
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    annotator TEXT NOT NULL REFERENCES annotators(name),
    checkpoint TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS turns (
    conversation INTEGER NOT NULL REFERENCES conversations(id),
    turn INTEGER NOT NULL,
    user TEXT NOT NULL,
    reply TEXT NOT NULL,
    label TEXT CHECK (label IN ('fail', 'pass', 'excellent')),
    created_at TEXT NOT NULL,
    PRIMARY KEY (conversation, turn)
);
"""


class StoreError(ValueError):
    """A database file that cannot be opened or is not one of ours; the message is one line."""


@dataclass(frozen=True)
class Response:
    """One system's response to one prompt (one sample of it)."""

    system: str
    prompt_id: str
    sample: int
    prompt: dict  # {"system": str | None, "turns": [...]}: the conversation answered
    response: str

    @property
    def hash(self) -> str:
        return sha256_json([self.system, self.prompt_id, self.sample, self.prompt, self.response])


def sha256_json(value) -> str:
    return hashlib.sha256(json.dumps(value, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def connect(path: str | Path, create: bool = True) -> sqlite3.Connection:
    """The database at `path`, its tables made if missing (or, with create=False, a StoreError
    when there is no such file). Rows come back as sqlite3.Row (by column name)."""
    path = Path(path)
    if not create and not path.is_file():
        raise StoreError(f"{path}: no such database file")
    try:
        conn = sqlite3.connect(path)
        conn.row_factory = sqlite3.Row
        conn.executescript(SCHEMA)
    except sqlite3.DatabaseError as e:
        raise StoreError(f"{path}: not a judgments database: {e}") from None
    return conn


def add_response(conn: sqlite3.Connection, response: Response) -> str:
    """Store a response (once); returns its hash."""
    key = response.hash
    with conn:
        conn.execute("INSERT OR IGNORE INTO responses (hash, system, prompt_id, sample, prompt, response) "
                     "VALUES (?, ?, ?, ?, ?, ?)", (key, response.system, response.prompt_id, response.sample,
                                                   json.dumps(response.prompt, ensure_ascii=False), response.response))
    return key


def add_annotator(conn: sqlite3.Connection, name: str, who: str = "annotator") -> str:
    """A new person's private token, their row written (in the caller's transaction) with the CSRF
    token their forms carry; ValueError for a name taken by a person or a model (the message
    tells the `who` signed in before to resume by their private link)."""
    if conn.execute("SELECT 1 FROM annotators WHERE name = ? UNION SELECT 1 FROM judgments WHERE rater = ?",
                    (name, name)).fetchone():
        raise ValueError(f"the name {name!r} is taken; a signed-in {who} resumes by their private link")
    token = secrets.token_urlsafe(24)
    conn.execute("INSERT INTO annotators (name, token, csrf, created_at) VALUES (?, ?, ?, ?)",
                 (name, token, secrets.token_urlsafe(24), now()))
    return token


def annotator_of(conn: sqlite3.Connection, token: str) -> sqlite3.Row | None:
    """The annotator row of a private token, or None (compared by the database: tokens are random
    and 32 characters long, so a timing side channel leaks nothing usable)."""
    return conn.execute("SELECT * FROM annotators WHERE token = ?", (token,)).fetchone()


def _stored(conn: sqlite3.Connection, table: str, key_columns: tuple, key: dict, column: str = "1"):
    """`column` of the row of `table` whose cache key (its UNIQUE columns) is `key`, or None."""
    where = " AND ".join(f"{k} = ?" for k in key_columns)
    return conn.execute(f"SELECT {column} FROM {table} WHERE {where}", [key[k] for k in key_columns]).fetchone()


def _add(conn: sqlite3.Connection, table: str, columns: list[str], row: dict) -> None:
    """One row of `table` (created_at filled in when absent), committed at once so an
    interrupted run keeps every row made."""
    row = {"created_at": now(), "latency_s": None, **row}
    with conn:
        conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                     [row[c] for c in columns])


JUDGMENT_KEY = ("prompt_id", "sample", "system_a", "system_b", "response_a", "response_b", "order_shown", "rater",
                "template_hash")


def has_judgment(conn: sqlite3.Connection, key: dict) -> bool:
    """Whether a judgment with this cache key (JUDGMENT_KEY's fields) is stored."""
    return _stored(conn, "judgments", JUDGMENT_KEY, key) is not None


def judgment_verdict(conn: sqlite3.Connection, key: dict) -> str | None:
    """The verdict stored under this cache key, or None."""
    row = _stored(conn, "judgments", JUDGMENT_KEY, key, "verdict")
    return None if row is None else row["verdict"]


def add_judgment(conn: sqlite3.Connection, row: dict) -> None:
    """One judgment row (every column but id; created_at filled in when absent), committed at once
    so an interrupted run keeps every judgment made."""
    _add(conn, "judgments", [*JUDGMENT_KEY, "rater_kind", "raw_reply", "verdict", "attempts", "latency_s",
                             "created_at"], row)


LIKERT_KEY = ("prompt_id", "sample", "system", "response", "rater", "template_hash")


def has_grade(conn: sqlite3.Connection, key: dict) -> bool:
    return _stored(conn, "likert", LIKERT_KEY, key) is not None


def add_grade(conn: sqlite3.Connection, row: dict) -> None:
    _add(conn, "likert", [*LIKERT_KEY, "rater_kind", "raw_reply", "grade", "attempts", "latency_s", "created_at"], row)


def latest_judgments(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """The newest judgment of each (systems, prompt, sample, rater, order), with both responses'
    text (response_a_text, response_b_text) and the prompt (JSON)."""
    return conn.execute("""
        SELECT j.*, ra.response AS response_a_text, rb.response AS response_b_text, ra.prompt AS prompt
        FROM judgments j
        JOIN responses ra ON ra.hash = j.response_a
        JOIN responses rb ON rb.hash = j.response_b
        WHERE j.id IN (SELECT MAX(id) FROM judgments
                       GROUP BY system_a, system_b, prompt_id, sample, rater, order_shown)
        ORDER BY j.system_a, j.system_b, j.rater, j.prompt_id, j.sample, j.order_shown""").fetchall()


def latest_grades(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """The newest grade of each (system, prompt, sample, rater)."""
    return conn.execute("""
        SELECT * FROM likert WHERE id IN (SELECT MAX(id) FROM likert GROUP BY system, prompt_id, sample, rater)
        ORDER BY system, rater, prompt_id, sample""").fetchall()
