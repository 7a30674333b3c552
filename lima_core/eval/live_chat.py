"""Live multi-turn ratings, LIMA section 6's way: a person talks with a served checkpoint (any
OpenAI-compatible endpoint, e.g. lima_core.serve) and labels every reply Fail, Pass or Excellent.

The page is the annotation page's kind (lima_core.eval.annotate): sign in with a name, a
private link, forms POSTed with the session's CSRF token, every text HTML-escaped under a
strict Content-Security-Policy. The next message can be sent only once the last reply is
labelled, so every reply gets its label. Conversations and labels are kept in the same
database (`conversations` and `turns`, see store.py); the report shows the labels per
checkpoint and per turn index.
"""

from __future__ import annotations

import html
import secrets
import threading
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse

from lima_core.eval import store
from lima_core.eval.annotate import CSS, MAX_NAME, form, http_error, page, session_checks, sign_in_html

# LIMA section 6's three labels, as the paper defines them.
LABELS = {"fail": "Fail: the response did not meet the requirements of the prompt.",
          "pass": "Pass: the response met the requirements of the prompt.",
          "excellent": "Excellent: the model provided an excellent response to the prompt."}
MAX_MESSAGE = 8000
CHAT_CSS = CSS + ".turn { border-top: 1px solid #ddd; padding: 6px 0; } .label { font-weight: bold; }\n" \
                 "textarea { width: 100%; height: 5em; }\n"


class Chat:
    """Conversations of signed-in people with one checkpoint; `reply` answers a list of
    OpenAI-style messages with the model's next message."""

    def __init__(self, db: str | Path, checkpoint: str, reply: Callable[[list[dict]], str]):
        self.db, self.checkpoint, self.reply = str(db), checkpoint, reply
        self.lock = threading.RLock()
        store.connect(self.db).close()

    def connect(self):
        return store.connect(self.db)

    def sign_in(self, name: str) -> str:
        with self.lock:
            conn = self.connect()
            if conn.execute("SELECT 1 FROM annotators WHERE name = ? UNION SELECT 1 FROM judgments WHERE rater = ?",
                            (name, name)).fetchone():
                raise ValueError(f"the name {name!r} is taken; a signed-in person resumes by their private link")
            token = secrets.token_urlsafe(24)
            with conn:
                conn.execute("INSERT INTO annotators (name, token, csrf, created_at) VALUES (?, ?, ?, ?)",
                             (name, token, secrets.token_urlsafe(24), store.now()))
            return token

    def annotator(self, token: str):
        return self.connect().execute("SELECT * FROM annotators WHERE token = ?", (token,)).fetchone()

    def conversation(self, name: str) -> int | None:
        """The person's latest conversation with this checkpoint."""
        row = self.connect().execute("SELECT MAX(id) FROM conversations WHERE annotator = ? AND checkpoint = ?",
                                     (name, self.checkpoint)).fetchone()
        return row[0]

    def turns(self, conversation: int | None) -> list:
        if conversation is None:
            return []
        return self.connect().execute("SELECT * FROM turns WHERE conversation = ? ORDER BY turn",
                                      (conversation,)).fetchall()

    def new_conversation(self, name: str) -> int:
        with self.lock:
            conn = self.connect()
            with conn:
                return conn.execute("INSERT INTO conversations (annotator, checkpoint, created_at) VALUES (?, ?, ?)",
                                    (name, self.checkpoint, store.now())).lastrowid

    def say(self, name: str, text: str) -> None:
        """Send the person's message and store the model's reply as the next turn; ValueError
        while the last reply has no label."""
        with self.lock:
            conversation = self.conversation(name)
            if conversation is None:
                conversation = self.new_conversation(name)
            turns = self.turns(conversation)
            if turns and turns[-1]["label"] is None:
                raise ValueError("label the last reply before sending the next message")
            messages = []
            for t in turns:
                messages += [{"role": "user", "content": t["user"]}, {"role": "assistant", "content": t["reply"]}]
            reply = self.reply(messages + [{"role": "user", "content": text}])
            conn = self.connect()
            with conn:
                conn.execute("INSERT INTO turns (conversation, turn, user, reply, label, created_at) "
                             "VALUES (?, ?, ?, ?, NULL, ?)", (conversation, len(turns), text, reply, store.now()))

    def label(self, name: str, turn: int, label: str) -> None:
        """Label a reply of the person's current conversation that has none yet (ValueError
        otherwise: a label is given once)."""
        with self.lock:
            conversation = self.conversation(name)
            conn = self.connect()
            with conn:
                changed = conn.execute("UPDATE turns SET label = ? WHERE conversation = ? AND turn = ? "
                                       "AND label IS NULL", (label, conversation, turn)).rowcount
            if changed != 1:
                raise ValueError("no such unlabelled reply in your conversation")


def endpoint_reply(url: str, model: str, api_key: str = "", timeout: float = 120.0, max_tokens: int = 256,
                   retries: int = 2) -> Callable[[list[dict]], str]:
    """The reply function of an OpenAI-compatible endpoint."""
    from lima_core.eval.client import complete, make_client

    client = make_client(url, api_key, timeout)

    def reply(messages: list[dict]) -> str:
        return complete(client, model, messages, retries=retries, base_delay=0.5, max_tokens=max_tokens).text

    return reply


def conversation_html(chat: Chat, person, token: str) -> str:
    csrf = html.escape(person["csrf"])
    hidden = f"<input type='hidden' name='csrf' value='{csrf}'>"
    definitions = "".join(f"<li>{html.escape(text)}</li>" for text in LABELS.values())
    parts = [f"<h1>Talk with {html.escape(chat.checkpoint)}</h1><p>Signed in as <b>{html.escape(person['name'])}"
             f"</b>. Label every reply:</p><ul>{definitions}</ul>"]
    turns = chat.turns(chat.conversation(person["name"]))
    for t in turns:
        if t["label"] is None:
            buttons = "".join(f"<button name='label' value='{label}' data-key='{key}'>{label.title()} ({key})</button>"
                              for key, label in zip("123", LABELS))
            label = (f"<form method='post' action='/c/{token}/label' class='choices'>{hidden}"
                     f"<input type='hidden' name='turn' value='{t['turn']}'>{buttons}</form>")
        else:
            label = f"<p class='label' id='label-{t['turn']}'>{html.escape(t['label'])}</p>"
        parts.append(f"<div class='turn'><b>you</b><pre>\n{html.escape(t['user'])}</pre><b>model</b>"
                     f"<pre class='reply' id='reply-{t['turn']}'>\n{html.escape(t['reply'])}</pre>{label}</div>")
    if not turns or turns[-1]["label"] is not None:
        parts.append(f"<form method='post' action='/c/{token}/say'>{hidden}<textarea name='text' required "
                     f"maxlength='{MAX_MESSAGE}'></textarea><button id='send'>Send</button></form>")
    parts.append(f"<form method='post' action='/c/{token}/new'>{hidden}<button id='new'>New conversation</button>"
                 "</form>")
    return "".join(parts)


def create_chat_app(chat: Chat):
    """The FastAPI app of the live conversation page; its state is `chat`'s database."""
    app = FastAPI(title="lima-core live ratings", docs_url=None, redoc_url=None, openapi_url=None)
    signed_in, checked_form = session_checks(chat.annotator, max_body=4 * MAX_MESSAGE)
    app.exception_handler(HTTPException)(http_error)
    title = f"Talk with {chat.checkpoint}"

    @app.get("/")
    def home():
        return page("Sign in", sign_in_html(title=title), css=CHAT_CSS)

    @app.post("/signin")
    async def sign_in(request: Request):
        name = (await form(request)).get("name", "").strip()
        if not name or len(name) > MAX_NAME or not name.isprintable():
            return page("Sign in", sign_in_html(f"A name of 1 to {MAX_NAME} printable characters, please.", title),
                        400, CHAT_CSS)
        try:
            token = chat.sign_in(name)
        except ValueError as e:
            return page("Sign in", sign_in_html(str(e), title), 409, CHAT_CSS)
        return RedirectResponse(f"/c/{token}", status_code=303)

    @app.get("/c/{token}")
    def conversation(token: str):
        return page(title, conversation_html(chat, signed_in(token), token), css=CHAT_CSS)

    @app.post("/c/{token}/say")
    async def say(token: str, request: Request):
        person, fields = await checked_form(request, token)
        text = fields.get("text", "").strip()
        if not text or len(text) > MAX_MESSAGE:
            raise HTTPException(400, f"a message of 1 to {MAX_MESSAGE} characters")
        try:
            chat.say(person["name"], text)
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        except Exception as e:  # the endpoint failed: nothing was stored
            raise HTTPException(502, f"the model's endpoint failed: {e}") from None
        return RedirectResponse(f"/c/{token}", status_code=303)

    @app.post("/c/{token}/label")
    async def label(token: str, request: Request):
        person, fields = await checked_form(request, token)
        if fields.get("label") not in LABELS or not fields.get("turn", "").isdigit():
            raise HTTPException(400, f"label must be one of {', '.join(LABELS)} and turn a number")
        try:
            chat.label(person["name"], int(fields["turn"]), fields["label"])
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        return RedirectResponse(f"/c/{token}", status_code=303)

    @app.post("/c/{token}/new")
    async def new(token: str, request: Request):
        person, _ = await checked_form(request, token)
        chat.new_conversation(person["name"])
        return RedirectResponse(f"/c/{token}", status_code=303)

    return app
