"""The pieces the evaluation's web pages share, so that the annotation page (annotate), the live
chat page (live_chat) and the report's page (report_html) import them from here and not from
each other.

The two served pages follow one set of rules, written once below: plain server-rendered HTML,
every text HTML-escaped, a Content-Security-Policy that lets only the page's own script and style
run (by nonce), sign-in by name to a private link, and every change a urlencoded POST carrying
the person's CSRF token; a malformed request gets a 4xx and changes nothing.
"""

from __future__ import annotations

import hmac
import html
import secrets
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse

from lima_core.eval import store

# LIMA section 6's three labels of a live reply, as the paper defines them (store.py's `turns.label`).
LABELS = {"fail": "Fail: the response did not meet the requirements of the prompt.",
          "pass": "Pass: the response met the requirements of the prompt.",
          "excellent": "Excellent: the model provided an excellent response to the prompt."}
MAX_NAME = 64
MAX_BODY = 4096

CSS = """
body { font-family: sans-serif; max-width: 1200px; margin: 1.5em auto; color: #222; }
pre { white-space: pre-wrap; word-wrap: break-word; background: #f8f8f8; padding: 10px; margin: 4px 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
.choices { display: flex; gap: 12px; justify-content: center; margin: 1.2em 0; }
.choices button { font-size: 1.05em; padding: 10px 18px; }
.progress { color: #555; } .error { color: #c0392b; }
"""

# A button with data-key="1" is pressed by the key 1.
KEYS_SCRIPT = """
document.addEventListener("keydown", function (event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  var button = document.querySelector('button[data-key="' + event.key + '"]');
  if (button) { event.preventDefault(); button.click(); }
});
"""


class PageState:
    """What a served page keeps, all of it in a judgments database (store.py) so that a restart
    loses nothing; a lock makes each change atomic across the server's worker threads."""

    def __init__(self, db: str | Path):
        self.db = str(db)
        self.lock = threading.RLock()

    def connect(self) -> sqlite3.Connection:
        return store.connect(self.db)

    def annotator(self, token: str):
        """The signed-in person of a private token (their annotators row), or None."""
        return store.annotator_of(self.connect(), token)


# ---- HTML ----------------------------------------------------------------------------------------

def pre(text: str, attributes: str = "", keep_leading_newline: bool = True) -> str:
    """`text` escaped in a <pre>. HTML drops the first newline after <pre>, so the tag is
    followed by one of its own and a text that starts with a newline keeps it."""
    lead = "\n" if keep_leading_newline else ""
    return f"<pre{attributes}>{lead}{html.escape(text)}</pre>"


def prompt_html(prompt: dict, keep_leading_newline: bool = True) -> str:
    """A prompt ({"system": str | None, "turns": [...]}) as its system text and alternating
    user / assistant turns."""
    texts = ([] if prompt.get("system") is None else [("system", prompt["system"])]) + [
        (("user", "assistant")[i % 2], turn) for i, turn in enumerate(prompt["turns"])]
    return "".join(f"<b>{role}</b>{pre(text, keep_leading_newline=keep_leading_newline)}" for role, text in texts)


def document(title: str, body: str, nonce: str, css: str = CSS) -> str:
    """A whole served page: `css` and the keys script, both allowed by `nonce`."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style nonce='{nonce}'>{css}</style></head><body>{body}"
            f"<script nonce='{nonce}'>{KEYS_SCRIPT}</script></body></html>")


def sign_in_html(title: str, error: str = "") -> str:
    message = f"<p class='error'>{html.escape(error)}</p>" if error else ""
    return (f"<h1>{html.escape(title)}</h1><p>Sign in with your name. You will be sent to a private link: keep it "
            f"to come back later.</p>{message}<form method='post' action='/signin'><label>Name "
            f"<input name='name' maxlength='{MAX_NAME}' required autofocus></label> <button>Start</button></form>")


def hidden_csrf(person) -> str:
    """The form field every POST of a signed-in person carries."""
    return f"<input type='hidden' name='csrf' value='{html.escape(person['csrf'])}'>"


# ---- HTTP ----------------------------------------------------------------------------------------

def page(title: str, body: str, status: int = 200, css: str = CSS) -> HTMLResponse:
    """An HTML page whose own script and style alone may run (by nonce): a <script> that slipped
    into a response's text could not, even were it not escaped."""
    nonce = secrets.token_urlsafe(16)
    response = HTMLResponse(document(title, body, nonce, css), status_code=status)
    response.headers["Content-Security-Policy"] = (f"default-src 'none'; script-src 'nonce-{nonce}'; "
                                                   f"style-src 'nonce-{nonce}'; form-action 'self'; "
                                                   "frame-ancestors 'none'; base-uri 'none'")
    response.headers["Referrer-Policy"] = "no-referrer"  # the private link stays private
    response.headers["Cache-Control"] = "no-store"
    return response


def see_other(url: str) -> RedirectResponse:
    """After a POST, the page to GET next (303, so a reload does not POST again)."""
    return RedirectResponse(url, status_code=303)


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


def choice_and_number(fields: dict[str, str], choice: str, choices, number: str) -> tuple[str, int]:
    """A form's `choice` field, one of `choices`, and its `number` field, digits; 400 otherwise."""
    if fields.get(choice) not in choices or not fields.get(number, "").isdigit():
        raise HTTPException(400, f"{choice} must be one of {', '.join(choices)} and {number} a number")
    return fields[choice], int(fields[number])


async def http_error(request: Request, error: HTTPException):
    return PlainTextResponse(f"{error.status_code}: {error.detail}\n", status_code=error.status_code)


def new_app(title: str) -> FastAPI:
    """A page's FastAPI app: no generated docs, errors as one plain line."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.exception_handler(HTTPException)(http_error)
    return app


def add_sign_in(app: FastAPI, sign_in: Callable[[str], str], link: str, title: str, css: str = CSS) -> None:
    """GET / (the sign-in form) and POST /signin, which sends a new person to `link`/TOKEN;
    `sign_in` makes a name's private token (ValueError for a name taken: 409)."""
    @app.get("/")
    def home():
        return page("Sign in", sign_in_html(title), css=css)

    @app.post("/signin")
    async def sign_in_form(request: Request):
        name = (await form(request)).get("name", "").strip()
        if not name or len(name) > MAX_NAME or not name.isprintable():
            return page("Sign in", sign_in_html(title, f"A name of 1 to {MAX_NAME} printable characters, please."),
                        400, css)
        try:
            token = sign_in(name)
        except ValueError as e:
            return page("Sign in", sign_in_html(title, str(e)), 409, css)
        return see_other(f"{link}/{token}")


def form_actions(app: FastAPI, checked_form, link: str):
    """The decorator of a page's changes: `@action("/undo")` makes act(person, fields) the POST
    route `link`/TOKEN/undo, run after the session checks (checked_form), a ValueError it raises
    answered 409 (a stale page, an answer given twice), and the person sent back to `link`/TOKEN."""
    def action(suffix: str):
        def register(act: Callable[[Any, dict[str, str]], None]):
            @app.post(f"{link}/{{token}}{suffix}")
            async def route(token: str, request: Request):
                person, fields = await checked_form(request, token)
                try:
                    act(person, fields)
                except ValueError as e:
                    raise HTTPException(409, str(e)) from None
                return see_other(f"{link}/{token}")

            return act

        return register

    return action
