"""People judging pairs of responses, LIMA section 4's way: a small web page served from the
judgments database.

An annotator signs in with a name and is sent to a private link (/a/TOKEN). The page shows one
prompt and two responses side by side, in an order drawn at random per annotator and item and
recorded in `assignments`, the systems' names hidden; three choices (left better / neither
significantly better / right better) by button or by the keys 1, 2, 3; undo of the last answer.
Every answer is a row of the same `judgments` table the model judge writes (rater = the
annotator's name, rater_kind "person", the verdict un-swapped), so the report reads people and
judge alike.

Which items an annotator gets: the first `overlap` items (in a shuffle fixed by the seed) go to
every annotator, so that people can be compared on them; each of the rest goes to one
annotator only, to whoever asks for a new item first once their shared items are done.

Safety (the rules of every served page, in web.py): the page is plain server-rendered HTML.
Everything from the responses is HTML-escaped (and a Content-Security-Policy allows only the
page's own script, by nonce), so no script in a response can run. Every page but sign-in needs
the private token; every change is a POST that carries the annotator's CSRF token; a malformed
request gets a 4xx and changes nothing. An annotator only ever sees their own answers.
"""

from __future__ import annotations

import csv
import html
import io
import json
import random
from pathlib import Path

from fastapi import HTTPException

from lima_core.eval import store, web
from lima_core.eval.judge import pair_up, responses_of

INSTRUCTIONS = ("Read the prompt and both responses. Which response is better? Choose 'neither' when neither "
                "is significantly better than the other.")
INSTRUCTIONS_HASH = store.sha256_json(INSTRUCTIONS)
# The choice as shown -> the verdict in the order shown ("A" the left response is better).
CHOICES = {"left": "A", "neither": "tie", "right": "B"}


def load_pairs(path_a: str, path_b: str, overlap: int, seed: int = 0) -> tuple[list, list]:
    """The pairs to annotate, split into (shared, spread): a shuffle of every (prompt, sample)
    both files answer, fixed by `seed`, the first `overlap` of it shared by every annotator."""
    pairs = pair_up(responses_of(path_a), responses_of(path_b), (path_a, path_b))
    random.Random(seed).shuffle(pairs)
    return pairs[:overlap], pairs[overlap:]


def _verdict_unswapped(shown_verdict: str, order_shown: str) -> str:
    """The verdict in terms of system_a / system_b (store.py's convention) from the one in the
    order shown."""
    if shown_verdict == "tie" or order_shown == "AB":
        return shown_verdict
    return {"A": "B", "B": "A"}[shown_verdict]


class Annotation(web.PageState):
    """The page's state, all of it in the database: who is signed in, who was given what, and
    the answers. The lock makes each change (claiming an item, answering, undoing) atomic."""

    def __init__(self, db: str | Path, shared: list, spread: list, seed: int | None = None):
        super().__init__(db)
        self.shared, self.spread = shared, spread
        self.rng = random.Random(seed)  # the order each item is shown in, per annotator
        conn = self.connect()
        self.keys = {}  # (prompt_id, sample, system_a, system_b) -> (a, b, hash_a, hash_b)
        for a, b in shared + spread:
            self.keys[a.prompt_id, a.sample, a.system, b.system] = (a, b, store.add_response(conn, a),
                                                                    store.add_response(conn, b))
        conn.close()

    # ---- annotators --------------------------------------------------------------------------

    def sign_in(self, name: str) -> str:
        """A new annotator's private token, the shared items theirs; ValueError for a name taken."""
        with self.lock:
            conn = self.connect()
            with conn:
                token = store.add_annotator(conn, name)
                for a, b in self.shared:
                    self._assign(conn, name, a, b)
            return token

    def _assign(self, conn, name: str, a, b) -> None:
        position = conn.execute("SELECT COUNT(*) FROM assignments WHERE annotator = ?", (name,)).fetchone()[0]
        _, _, hash_a, hash_b = self.keys[a.prompt_id, a.sample, a.system, b.system]
        conn.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (name, position, a.prompt_id, a.sample, a.system, b.system, hash_a, hash_b,
                      self.rng.choice(("AB", "BA"))))

    # ---- items -------------------------------------------------------------------------------

    def _answered(self, conn, name: str) -> set:
        rows = conn.execute("SELECT prompt_id, sample, system_a, system_b FROM judgments "
                            "WHERE rater = ? AND rater_kind = 'person'", (name,)).fetchall()
        return {tuple(r) for r in rows}

    def current(self, name: str):
        """The annotator's first unanswered assignment, claiming a spread item nobody has yet
        when their own are done; None when there is nothing left."""
        with self.lock:
            conn = self.connect()
            answered = self._answered(conn, name)
            for row in conn.execute("SELECT * FROM assignments WHERE annotator = ? ORDER BY position", (name,)):
                if (row["prompt_id"], row["sample"], row["system_a"], row["system_b"]) not in answered:
                    return row
            claimed = {tuple(r) for r in conn.execute("SELECT prompt_id, sample, system_a, system_b FROM assignments")}
            for a, b in self.spread:
                if (a.prompt_id, a.sample, a.system, b.system) not in claimed:
                    with conn:
                        self._assign(conn, name, a, b)
                    return conn.execute("SELECT * FROM assignments WHERE annotator = ? ORDER BY position DESC "
                                        "LIMIT 1", (name,)).fetchone()
            return None

    def progress(self, name: str) -> tuple[int, int]:
        """(answered, answered + still to do): the annotator's own items and the spread items
        nobody has claimed yet."""
        conn = self.connect()
        answered = len(self._answered(conn, name))
        own = conn.execute("SELECT COUNT(*) FROM assignments WHERE annotator = ?", (name,)).fetchone()[0]
        claimed = conn.execute("SELECT COUNT(*) FROM (SELECT DISTINCT prompt_id, sample, system_a, system_b "
                               "FROM assignments WHERE position >= ?)", (len(self.shared),)).fetchone()[0]
        return answered, own + len(self.spread) - claimed

    def answer(self, name: str, position: int, choice: str) -> None:
        """Store the answer to the assignment at `position`, which must be the current one (a
        double submission or a stale page changes nothing: ValueError)."""
        with self.lock:
            current = self.current(name)
            if current is None or current["position"] != position:
                raise ValueError("that item is not the one waiting for an answer (answered already, or a stale page)")
            conn = self.connect()
            verdict = _verdict_unswapped(CHOICES[choice], current["order_shown"])
            store.add_judgment(conn, {
                **{k: current[k] for k in ("prompt_id", "sample", "system_a", "system_b", "response_a", "response_b",
                                           "order_shown")},
                "rater": name, "rater_kind": "person", "template_hash": INSTRUCTIONS_HASH, "raw_reply": choice,
                "verdict": verdict, "attempts": 1})

    def undo(self, name: str) -> bool:
        """Delete the annotator's last answer; False when there is none."""
        with self.lock:
            conn = self.connect()
            with conn:
                return conn.execute("DELETE FROM judgments WHERE id = (SELECT MAX(id) FROM judgments "
                                    "WHERE rater = ? AND rater_kind = 'person')", (name,)).rowcount == 1

    def item_texts(self, row) -> tuple[dict, str, str]:
        """(prompt, left response, right response) of an assignment, in the order shown."""
        a, b, _, _ = self.keys[row["prompt_id"], row["sample"], row["system_a"], row["system_b"]]
        left, right = (a, b) if row["order_shown"] == "AB" else (b, a)
        return a.prompt, left.response, right.response


# ---- export ------------------------------------------------------------------------------------

EXPORT_COLUMNS = ("rater", "prompt_id", "sample", "system_a", "system_b", "order_shown", "choice", "verdict",
                  "created_at")


def people_judgments(conn) -> list[dict]:
    """Every person's judgment: the choice as shown (raw_reply) and the verdict un-swapped."""
    rows = conn.execute("SELECT * FROM judgments WHERE rater_kind = 'person' ORDER BY rater, id").fetchall()
    return [{**{k: r[k] for k in EXPORT_COLUMNS if k != "choice"}, "choice": r["raw_reply"]} for r in rows]


def export(db: str | Path, out: str | Path) -> int:
    """Write the people's judgments to `out`, JSONL or CSV by its suffix; returns the count."""
    out = Path(out)
    if out.suffix not in (".jsonl", ".csv"):
        raise store.StoreError(f"{out}: the export is written as .jsonl or .csv")
    rows = people_judgments(store.connect(db, create=False))
    if out.suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=EXPORT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return len(rows)


# ---- the page ------------------------------------------------------------------------------------

def item_html(annotation: Annotation, person, row, token: str) -> str:
    done, total = annotation.progress(person["name"])
    undo = (f"<form method='post' action='/a/{token}/undo'>{web.hidden_csrf(person)}"
            f"<button id='undo'>Undo the last answer</button></form>") if done else ""
    header = (f"<h1>Pairwise annotation</h1><p>Signed in as <b>{html.escape(person['name'])}</b>. "
              f"<span class='progress' id='progress'>{done} of {total} answered</span></p>")
    if row is None:
        return header + f"<p id='finished'>All done: thank you.</p>{undo}"
    prompt, left, right = annotation.item_texts(row)
    left_html, right_html = web.pre(left, " id='left'"), web.pre(right, " id='right'")
    buttons = "".join(f"<button name='choice' value='{choice}' data-key='{key}'>{label} ({key})</button>"
                      for key, choice, label in (("1", "left", "Left is better"),
                                                 ("2", "neither", "Neither is significantly better"),
                                                 ("3", "right", "Right is better")))
    return (header + f"<p>{html.escape(INSTRUCTIONS)}</p><h2>Prompt</h2>{web.prompt_html(prompt)}"
            f"<div class='pair'><div><h2>Left</h2>{left_html}</div><div><h2>Right</h2>{right_html}</div></div>"
            f"<form method='post' action='/a/{token}/answer' class='choices'>{web.hidden_csrf(person)}"
            f"<input type='hidden' name='position' value='{row['position']}'>{buttons}</form>{undo}")


def create_app(annotation: Annotation):
    """The FastAPI app of the page; every bit of state lives in `annotation` (its database)."""
    app = web.new_app("lima-core annotation")
    signed_in, checked_form = web.session_checks(annotation.annotator)
    web.add_sign_in(app, annotation.sign_in, "/a", "Pairwise annotation")
    action = web.form_actions(app, checked_form, "/a")

    @app.get("/a/{token}")
    def item(token: str):
        person = signed_in(token)
        return web.page("Annotation", item_html(annotation, person, annotation.current(person["name"]), token))

    @action("/answer")
    def answer(person, fields: dict[str, str]) -> None:
        choice, position = web.choice_and_number(fields, "choice", CHOICES, "position")
        annotation.answer(person["name"], position, choice)

    @action("/undo")
    def undo(person, fields: dict[str, str]) -> None:
        if not annotation.undo(person["name"]):
            raise HTTPException(409, "nothing to undo")

    return app
