"""Live multi-turn ratings, LIMA section 6's way: a person talks with a served checkpoint (any
OpenAI-compatible endpoint, e.g. lima_core.serve) and labels every reply Fail, Pass or Excellent.

The page follows the annotation page's rules (lima_core.eval.web): sign in with a name, a
private link, forms POSTed with the session's CSRF token, every text HTML-escaped under a
strict Content-Security-Policy. The next message can be sent only once the last reply is
labelled, so every reply gets its label. Conversations and labels are kept in the same
database (`conversations` and `turns`, see store.py); the report shows the labels per
checkpoint and per turn index.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Callable

from fastapi import HTTPException

from lima_core.eval import store, web

MAX_MESSAGE = 8000
CHAT_CSS = web.CSS + (".turn { border-top: 1px solid #ddd; padding: 6px 0; } .label { font-weight: bold; }\n"
                      "textarea { width: 100%; height: 5em; }\n")


class Chat(web.PageState):
    """Conversations of signed-in people with one checkpoint; `reply` answers a list of
    OpenAI-style messages with the model's next message."""

    def __init__(self, db: str | Path, checkpoint: str, reply: Callable[[list[dict]], str]):
        super().__init__(db)
        self.checkpoint, self.reply = checkpoint, reply
        self.connect().close()  # the tables made at start, not at the first request

    def sign_in(self, name: str) -> str:
        """A new person's private token; ValueError for a name taken."""
        with self.lock:
            conn = self.connect()
            with conn:
                return store.add_annotator(conn, name, "person")

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
    hidden = web.hidden_csrf(person)
    definitions = "".join(f"<li>{html.escape(text)}</li>" for text in web.LABELS.values())
    parts = [f"<h1>Talk with {html.escape(chat.checkpoint)}</h1><p>Signed in as <b>{html.escape(person['name'])}"
             f"</b>. Label every reply:</p><ul>{definitions}</ul>"]
    turns = chat.turns(chat.conversation(person["name"]))
    for t in turns:
        if t["label"] is None:
            buttons = "".join(f"<button name='label' value='{label}' data-key='{key}'>{label.title()} ({key})</button>"
                              for key, label in zip("123", web.LABELS))
            label = (f"<form method='post' action='/c/{token}/label' class='choices'>{hidden}"
                     f"<input type='hidden' name='turn' value='{t['turn']}'>{buttons}</form>")
        else:
            label = f"<p class='label' id='label-{t['turn']}'>{html.escape(t['label'])}</p>"
        reply = web.pre(t["reply"], f" class='reply' id='reply-{t['turn']}'")
        parts.append(f"<div class='turn'><b>you</b>{web.pre(t['user'])}<b>model</b>{reply}{label}</div>")
    if not turns or turns[-1]["label"] is not None:
        parts.append(f"<form method='post' action='/c/{token}/say'>{hidden}<textarea name='text' required "
                     f"maxlength='{MAX_MESSAGE}'></textarea><button id='send'>Send</button></form>")
    parts.append(f"<form method='post' action='/c/{token}/new'>{hidden}<button id='new'>New conversation</button>"
                 "</form>")
    return "".join(parts)


def create_chat_app(chat: Chat):
    """The FastAPI app of the live conversation page; its state is `chat`'s database."""
    app = web.new_app("lima-core live ratings")
    signed_in, checked_form = web.session_checks(chat.annotator, max_body=4 * MAX_MESSAGE)
    title = f"Talk with {chat.checkpoint}"
    web.add_sign_in(app, chat.sign_in, "/c", title, CHAT_CSS)
    action = web.form_actions(app, checked_form, "/c")

    @app.get("/c/{token}")
    def conversation(token: str):
        return web.page(title, conversation_html(chat, signed_in(token), token), css=CHAT_CSS)

    @action("/say")
    def say(person, fields: dict[str, str]) -> None:
        text = fields.get("text", "").strip()
        if not text or len(text) > MAX_MESSAGE:
            raise HTTPException(400, f"a message of 1 to {MAX_MESSAGE} characters")
        try:
            chat.say(person["name"], text)
        except ValueError:
            raise  # the last reply has no label yet: a 409 (form_actions)
        except Exception as e:  # the endpoint failed: nothing was stored
            raise HTTPException(502, f"the model's endpoint failed: {e}") from None

    @action("/label")
    def label(person, fields: dict[str, str]) -> None:
        label, turn = web.choice_and_number(fields, "label", web.LABELS, "turn")
        chat.label(person["name"], turn, label)

    @action("/new")
    def new(person, fields: dict[str, str]) -> None:
        chat.new_conversation(person["name"])

    return app
