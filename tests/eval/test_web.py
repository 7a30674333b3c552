"""The page pieces the served pages and the report share (lima_core.eval.web), on their own: the
<pre> newline rule, and a minimal page built from the shared sign-in, session checks and form
actions, served by uvicorn and reached with urllib (the annotation and live pages are tested
whole in test_annotate.py)."""

import sqlite3
import urllib.request

from helpers import serving
from test_annotate import post

from lima_core.eval import store, web


def test_pre_keeps_a_texts_own_leading_newline():
    # HTML drops the first newline after <pre>: a served page writes one of its own before the text.
    assert web.pre("\nx < y") == "<pre>\n\nx &lt; y</pre>"
    assert web.pre("a", " id='left'") == "<pre id='left'>\na</pre>"
    assert web.pre("\na", keep_leading_newline=False) == "<pre>\na</pre>"  # the report's page


def test_prompt_html_names_every_turn():
    prompt = {"system": "Be <brief>.", "turns": ["Hi", "Hello!", "2 + 2?"]}
    assert web.prompt_html(prompt) == ("<b>system</b><pre>\nBe &lt;brief&gt;.</pre><b>user</b><pre>\nHi</pre>"
                                       "<b>assistant</b><pre>\nHello!</pre><b>user</b><pre>\n2 + 2?</pre>")
    assert web.prompt_html({"system": None, "turns": ["Hi"]}, keep_leading_newline=False) == "<b>user</b><pre>Hi</pre>"


def test_a_page_built_from_the_shared_pieces(tmp_path):
    """Sign-in, the session checks and one form action: a name taken is a 409, a missing or wrong
    CSRF token a 403, an unknown link a 404, a bad field a 400, the action's ValueError a 409, and
    none of them reaches or changes anything; a good form is done once and sent back (303)."""
    state = web.PageState(tmp_path / "w.sqlite")
    done = []

    def sign_in(name: str) -> str:
        with state.connect() as conn:
            return store.add_annotator(conn, name, "person")

    app = web.new_app("test page")
    _, checked_form = web.session_checks(state.annotator)
    web.add_sign_in(app, sign_in, "/t", "Test page")
    action = web.form_actions(app, checked_form, "/t")

    @action("/pick")
    def pick(person, fields):
        choice, number = web.choice_and_number(fields, "choice", ("x", "y"), "n")
        if number > 3:
            raise ValueError("too far")
        done.append((person["name"], choice, number))

    with serving(app) as url:
        with urllib.request.urlopen(f"{url}/") as response:
            assert "nonce-" in response.headers["Content-Security-Policy"] and "Test page" in response.read().decode()
        assert post(f"{url}/signin", {"name": "ann"}) == 303
        assert post(f"{url}/signin", {"name": "ann"}) == 409
        with sqlite3.connect(state.db) as conn:
            token, csrf = conn.execute("SELECT token, csrf FROM annotators WHERE name = 'ann'").fetchone()
        pick_url = f"{url}/t/{token}/pick"
        assert post(pick_url, {"choice": "x", "n": "1"}) == 403
        assert post(pick_url, {"choice": "x", "n": "1", "csrf": "wrong"}) == 403
        assert post(f"{url}/t/{'z' * 32}/pick", {"choice": "x", "n": "1", "csrf": csrf}) == 404
        assert post(pick_url, {"choice": "z", "n": "1", "csrf": csrf}) == 400
        assert post(pick_url, {"choice": "x", "n": "one", "csrf": csrf}) == 400
        assert post(pick_url, {"choice": "x", "n": "7", "csrf": csrf}) == 409
        assert done == []
        assert post(pick_url, {"choice": "y", "n": "2", "csrf": csrf}) == 303
    assert done == [("ann", "y", 2)]
