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

Safety: the page is plain server-rendered HTML. Everything from the responses is HTML-escaped
(and a Content-Security-Policy allows only the page's own script, by nonce), so no script in a
response can run. Every page but sign-in needs the private token; every change is a POST that
carries the annotator's CSRF token; a malformed request gets a 4xx and changes nothing. An
annotator only ever sees their own answers.
"""

from __future__ import annotations

import csv
import hmac
import html
import io
import json
import random
import secrets
import threading
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse

from lima_core.eval import store
from lima_core.eval.judge import pair_up, responses_of

INSTRUCTIONS = ("Read the prompt and both responses. Which response is better? Choose 'neither' when neither "
                "is significantly better than the other.")
INSTRUCTIONS_HASH = store.sha256_json(INSTRUCTIONS)
# The choice as shown -> the verdict in the order shown ("A" the left response is better).
CHOICES = {"left": "A", "neither": "tie", "right": "B"}
MAX_NAME = 64
MAX_BODY = 4096


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


class Annotation:
    """The page's state, all of it in the database: who is signed in, who was given what, and
    the answers. A lock makes each change (claiming an item, answering, undoing) atomic across
    the server's worker threads."""

    def __init__(self, db: str | Path, shared: list, spread: list, seed: int | None = None):
        self.db = str(db)
        self.shared, self.spread = shared, spread
        self.rng = random.Random(seed)  # the order each item is shown in, per annotator
        self.lock = threading.RLock()
        conn = self.connect()
        self.keys = {}  # (prompt_id, sample, system_a, system_b) -> (a, b, hash_a, hash_b)
        for a, b in shared + spread:
            self.keys[a.prompt_id, a.sample, a.system, b.system] = (a, b, store.add_response(conn, a),
                                                                    store.add_response(conn, b))
        conn.close()

    def connect(self):
        return store.connect(self.db)

    # ---- annotators --------------------------------------------------------------------------

    def sign_in(self, name: str) -> str:
        """A new annotator's private token; ValueError for a name taken (by a person or a model)."""
        with self.lock:
            conn = self.connect()
            taken = conn.execute("SELECT 1 FROM annotators WHERE name = ? UNION "
                                 "SELECT 1 FROM judgments WHERE rater = ?", (name, name)).fetchone()
            if taken:
                raise ValueError(f"the name {name!r} is taken; a signed-in annotator resumes by their private link")
            token = secrets.token_urlsafe(24)
            with conn:
                conn.execute("INSERT INTO annotators (name, token, csrf, created_at) VALUES (?, ?, ?, ?)",
                             (name, token, secrets.token_urlsafe(24), store.now()))
                for a, b in self.shared:
                    self._assign(conn, name, a, b)
            return token

    def annotator(self, token: str):
        """The annotator row of a token, or None (compared by the database: tokens are random
        and 32 characters long, so a timing side channel leaks nothing usable)."""
        return self.connect().execute("SELECT * FROM annotators WHERE token = ?", (token,)).fetchone()

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

CSS = """
body { font-family: sans-serif; max-width: 1200px; margin: 1.5em auto; color: #222; }
pre { white-space: pre-wrap; word-wrap: break-word; background: #f8f8f8; padding: 10px; margin: 4px 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.choices { display: flex; gap: 12px; justify-content: center; margin: 1.2em 0; }
.choices button { font-size: 1.05em; padding: 10px 18px; }
.progress { color: #555; } .error { color: #c0392b; }
"""

KEYS_SCRIPT = """
document.addEventListener("keydown", function (event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  var button = document.querySelector('button[data-key="' + event.key + '"]');
  if (button) { event.preventDefault(); button.click(); }
});
"""


def _page(title: str, body: str, nonce: str, css: str = CSS) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style nonce='{nonce}'>{css}</style></head><body>{body}"
            f"<script nonce='{nonce}'>{KEYS_SCRIPT}</script></body></html>")


# Every <pre> below opens with a newline: HTML drops the first newline after <pre>, and a text
# that itself starts with one keeps it.
def _prompt_html(prompt: dict) -> str:
    parts = [] if prompt.get("system") is None else [f"<b>system</b><pre>\n{html.escape(prompt['system'])}</pre>"]
    for i, turn in enumerate(prompt["turns"]):
        parts.append(f"<b>{('user', 'assistant')[i % 2]}</b><pre>\n{html.escape(turn)}</pre>")
    return "".join(parts)


def sign_in_html(error: str = "", title: str = "Pairwise annotation") -> str:
    message = f"<p class='error'>{html.escape(error)}</p>" if error else ""
    return (f"<h1>{html.escape(title)}</h1><p>Sign in with your name. You will be sent to a private link: keep it "
            f"to come back later.</p>{message}<form method='post' action='/signin'><label>Name "
            f"<input name='name' maxlength='{MAX_NAME}' required autofocus></label> <button>Start</button></form>")


def item_html(annotation: Annotation, person, row, token: str) -> str:
    done, total = annotation.progress(person["name"])
    csrf = html.escape(person["csrf"])
    undo = (f"<form method='post' action='/a/{token}/undo'><input type='hidden' name='csrf' value='{csrf}'>"
            f"<button id='undo'>Undo the last answer</button></form>") if done else ""
    header = (f"<h1>Pairwise annotation</h1><p>Signed in as <b>{html.escape(person['name'])}</b>. "
              f"<span class='progress' id='progress'>{done} of {total} answered</span></p>")
    if row is None:
        return header + f"<p id='finished'>All done: thank you.</p>{undo}"
    prompt, left, right = annotation.item_texts(row)
    buttons = "".join(f"<button name='choice' value='{choice}' data-key='{key}'>{label} ({key})</button>"
                      for key, choice, label in (("1", "left", "Left is better"),
                                                 ("2", "neither", "Neither is significantly better"),
                                                 ("3", "right", "Right is better")))
    return (header + f"<p>{html.escape(INSTRUCTIONS)}</p><h2>Prompt</h2>{_prompt_html(prompt)}"
            f"<div class='pair'><div><h2>Left</h2><pre id='left'>\n{html.escape(left)}</pre></div>"
            f"<div><h2>Right</h2><pre id='right'>\n{html.escape(right)}</pre></div></div>"
            f"<form method='post' action='/a/{token}/answer' class='choices'>"
            f"<input type='hidden' name='csrf' value='{csrf}'>"
            f"<input type='hidden' name='position' value='{row['position']}'>{buttons}</form>{undo}")


def page(title: str, body: str, status: int = 200, css: str = CSS) -> HTMLResponse:
    """An HTML page whose own script and style alone may run (by nonce): a <script> that slipped
    into a response's text could not, even were it not escaped."""
    nonce = secrets.token_urlsafe(16)
    response = HTMLResponse(_page(title, body, nonce, css), status_code=status)
    response.headers["Content-Security-Policy"] = (f"default-src 'none'; script-src 'nonce-{nonce}'; "
                                                   f"style-src 'nonce-{nonce}'; form-action 'self'; "
                                                   "frame-ancestors 'none'; base-uri 'none'")
    response.headers["Referrer-Policy"] = "no-referrer"  # the private link stays private
    response.headers["Cache-Control"] = "no-store"
    return response


async def form(request: Request, max_body: int = MAX_BODY) -> dict[str, str]:
    """A urlencoded form's single-valued fields; 400/413/415 for anything else."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HTTPException(415, "a form (application/x-www-form-urlencoded) was expected")
    body = await request.body()
    if len(body) > max_body:
        raise HTTPException(413, "the form is too long")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body))
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "a malformed form") from None
    if any(len(v) != 1 for v in fields.values()):
        raise HTTPException(400, "each field once")
    return {k: v[0] for k, v in fields.items()}


def session_checks(annotator_of, max_body: int = MAX_BODY):
    """(signed_in, checked_form): the annotator of a private token (else 404), and a POSTed form
    whose csrf field matches that annotator's (else 403)."""
    def signed_in(token: str):
        person = annotator_of(token)
        if person is None:
            raise HTTPException(404, "no such annotator link")
        return person

    async def checked_form(request: Request, token: str):
        person = signed_in(token)
        fields = await form(request, max_body)
        if not hmac.compare_digest(fields.get("csrf", "").encode(), person["csrf"].encode()):
            raise HTTPException(403, "the form's session token is missing or wrong")
        return person, fields

    return signed_in, checked_form


async def http_error(request: Request, error: HTTPException):
    return PlainTextResponse(f"{error.status_code}: {error.detail}\n", status_code=error.status_code)


def create_app(annotation: Annotation):
    """The FastAPI app of the page; every bit of state lives in `annotation` (its database)."""
    app = FastAPI(title="lima-core annotation", docs_url=None, redoc_url=None, openapi_url=None)

    signed_in, checked_form = session_checks(annotation.annotator)
    app.exception_handler(HTTPException)(http_error)

    @app.get("/")
    def home():
        return page("Sign in", sign_in_html())

    @app.post("/signin")
    async def sign_in(request: Request):
        name = (await form(request)).get("name", "").strip()
        if not name or len(name) > MAX_NAME or not name.isprintable():
            return page("Sign in", sign_in_html(f"A name of 1 to {MAX_NAME} printable characters, please."), 400)
        try:
            token = annotation.sign_in(name)
        except ValueError as e:
            return page("Sign in", sign_in_html(str(e)), 409)
        return RedirectResponse(f"/a/{token}", status_code=303)

    @app.get("/a/{token}")
    def item(token: str):
        person = signed_in(token)
        return page("Annotation", item_html(annotation, person, annotation.current(person["name"]), token))

    @app.post("/a/{token}/answer")
    async def answer(token: str, request: Request):
        person, fields = await checked_form(request, token)
        if fields.get("choice") not in CHOICES or not fields.get("position", "").isdigit():
            raise HTTPException(400, f"choice must be one of {', '.join(CHOICES)} and position a number")
        try:
            annotation.answer(person["name"], int(fields["position"]), fields["choice"])
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        return RedirectResponse(f"/a/{token}", status_code=303)

    @app.post("/a/{token}/undo")
    async def undo(token: str, request: Request):
        person, _ = await checked_form(request, token)
        if not annotation.undo(person["name"]):
            raise HTTPException(409, "nothing to undo")
        return RedirectResponse(f"/a/{token}", status_code=303)

    return app
