"""The annotation page (lima_core.eval.annotate) driven in a real headless Chromium through
Playwright, on a real localhost socket; the stored rows read back with sqlite3; and the
agreement statistics across people against cases worked by hand."""

import csv
import json
import re
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from itertools import permutations
from pathlib import Path

import pytest
from helpers import run_entry, serving
from test_eval import SCENARIO_A, SCENARIO_B, responses, write_jsonl

from lima_core.eval import stats
from lima_core.eval.__main__ import main
from lima_core.eval.annotate import Annotation, create_app, load_pairs

CHROMIUM = Path("/usr/bin/chromium")
# Prompt 3's baseline response carries a script that, were it to run, would set window.pwned.
SCRIPT = "<script>window.pwned = 1</script>"
TEXTS_B = [*SCENARIO_B[:3], f"B3 [tie] {SCRIPT}", *SCENARIO_B[4:]]
# The verdict (in terms of system_a, system_b) of a choice, for each order shown: written out, not
# computed by the code under test.
VERDICT = {("left", "AB"): "A", ("right", "AB"): "B", ("left", "BA"): "B", ("right", "BA"): "A",
           ("neither", "AB"): "tie", ("neither", "BA"): "tie"}


@pytest.fixture
def pair_files(tmp_path):
    return (write_jsonl(tmp_path / "a.jsonl", responses("tiny", SCENARIO_A)),
            write_jsonl(tmp_path / "b.jsonl", responses("reference", TEXTS_B)))


@pytest.fixture
def page_server(tmp_path, pair_files):
    """The annotation page on 8 dev prompts, 4 of them shared, served by uvicorn in a thread."""
    db = tmp_path / "people.sqlite"
    shared, spread = load_pairs(str(pair_files[0]), str(pair_files[1]), overlap=4, seed=0)
    with serving(create_app(Annotation(db, shared, spread, seed=1))) as url:
        yield {"url": url, "db": db, "shared": shared, "spread": spread}


def post(url: str, fields: dict, content_type="application/x-www-form-urlencoded") -> int:
    """The status of a POST of `fields` (no redirect followed)."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    request = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(), method="POST",
                                     headers={"Content-Type": content_type})
    try:
        return urllib.request.build_opener(NoRedirect).open(request).status
    except urllib.error.HTTPError as e:
        return e.code


def person_rows(db) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT rater, prompt_id, order_shown, raw_reply, verdict, rater_kind FROM judgments "
                            "ORDER BY id").fetchall()


def sign_in(browser, url: str, name: str):
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(url)
    page.fill("input[name=name]", name)
    page.click("text=Start")
    page.wait_for_url("**/a/*")
    return page


def progress(page) -> tuple[int, int]:
    done, _, total, _ = page.text_content("#progress").split()
    return int(done), int(total)


def shown(page) -> tuple[str, str]:
    return page.text_content("#left"), page.text_content("#right")


def answer(page, how: str, choice: str, seen: list) -> None:
    """Answer the item on the page by button or key, recording what was shown."""
    left, right = shown(page)
    if SCRIPT in left + right:  # the script is shown as text and never ran
        assert page.evaluate("typeof window.pwned") == "undefined"
        seen.append(page.url)
    before = progress(page)[0]
    if how == "click":
        page.click({"left": "text=Left is better", "neither": "text=Neither is", "right": "text=Right is better"}
                   [choice])
    else:
        page.keyboard.press({"left": "1", "neither": "2", "right": "3"}[choice])
    wait_for_answered(page, before + 1)


def wait_for_answered(page, count: int) -> None:
    from playwright.sync_api import expect  # not wait_for_function: the page's CSP forbids eval, rightly

    expect(page.locator("#progress")).to_have_text(re.compile(rf"^{count} of "))


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at "
                                    "/usr/bin/chromium (`make setup` installs it: apt-get install -y chromium)")


@needs_chromium
def test_two_annotators_in_a_real_browser(page_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, db = page_server["url"], page_server["db"]
    shared_ids = {a.prompt_id for a, _ in page_server["shared"]}
    spread_ids = {a.prompt_id for a, _ in page_server["spread"]}
    script_seen = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        alice = sign_in(browser, url, "alice")
        assert progress(alice) == (0, 8)  # 4 shared + 4 nobody has claimed yet
        # The page as docs/annotation.png shows it (that copy was taken by this line; the suite
        # writes into its temporary folder, never into the repository).
        shot = tmp_path / "annotation.png"
        alice.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        first_shown = shown(alice)
        answer(alice, "click", "left", script_seen)
        second_shown = shown(alice)
        assert second_shown != first_shown
        answer(alice, "key", "right", script_seen)
        alice.click("#undo")  # the last answer ("right") is taken back: the same item waits again
        wait_for_answered(alice, 1)
        assert len(person_rows(db)) == 1 and shown(alice) == second_shown
        answer(alice, "key", "neither", script_seen)

        # bob sees nothing of alice's: his own count, his own items.
        bob = sign_in(browser, url, "bob")
        assert progress(bob) == (0, 8) and "alice" not in bob.content()
        for choice in ("left", "neither", "right", "left", "right"):  # 4 shared, then a spread item
            answer(bob, "key", choice, script_seen)

        # alice resumes where she stopped: 2 answered; bob holds 2 spread items (the one he answered
        # and the one his page now shows), so 4 shared + 2 spread are hers at most.
        alice.reload()
        assert progress(alice) == (2, 6)
        while alice.query_selector("#finished") is None:
            answer(alice, "click", "right", script_seen)
        while bob.query_selector("#finished") is None:
            answer(bob, "key", "neither", script_seen)
        assert progress(alice) == (6, 6) and progress(bob) == (6, 6)
        browser.close()

    rows = person_rows(db)
    by_rater = {}
    for rater, prompt_id, order, choice, verdict, kind in rows:
        assert kind == "person" and verdict == VERDICT[choice, order]
        by_rater.setdefault(rater, []).append(prompt_id)
    # the shared items reached both; each spread item exactly one annotator.
    assert shared_ids <= set(by_rater["alice"]) and shared_ids <= set(by_rater["bob"])
    assert sorted([*by_rater["alice"], *by_rater["bob"]]) == sorted([*shared_ids, *shared_ids, *spread_ids])
    assert len(by_rater["alice"]) == 6 and len(by_rater["bob"]) == 6
    # alice's first answer ("left") is system_a's win exactly when system_a's response was on the left.
    with sqlite3.connect(db) as conn:
        first = conn.execute("SELECT verdict FROM judgments WHERE rater = 'alice' ORDER BY id LIMIT 1").fetchone()[0]
    assert first == ("A" if first_shown[0] in SCENARIO_A else "B")
    assert script_seen  # the item with the script was shown (to one or both) and it did not run


def test_requests_without_a_session_change_nothing(page_server):
    url, db = page_server["url"], page_server["db"]
    assert post(f"{url}/signin", {"name": "carol"}) == 303
    with sqlite3.connect(db) as conn:
        token, csrf = conn.execute("SELECT token, csrf FROM annotators WHERE name = 'carol'").fetchone()
        position = conn.execute("SELECT MIN(position) FROM assignments WHERE annotator = 'carol'").fetchone()[0]
    answer_url = f"{url}/a/{token}/answer"
    assert post(answer_url, {"choice": "left", "position": position}) == 403  # no session token
    assert post(answer_url, {"choice": "left", "position": position, "csrf": "x" * len(csrf)}) == 403
    assert post(f"{url}/a/not-a-token/answer", {"choice": "left", "position": position, "csrf": csrf}) == 404
    assert post(answer_url, {"choice": "maybe", "position": position, "csrf": csrf}) == 400
    assert post(answer_url, {"choice": "left", "position": "-1", "csrf": csrf}) == 400
    assert post(answer_url, {"choice": "left", "position": position + 1, "csrf": csrf}) == 409  # not the current item
    assert post(answer_url, {"choice": "left", "position": position, "csrf": csrf}, "application/json") == 415
    assert post(f"{url}/a/{token}/undo", {"csrf": csrf}) == 409  # nothing to undo
    assert post(f"{url}/signin", {"name": "carol"}) == 409  # a name is one person's
    assert post(f"{url}/signin", {"name": ""}) == 400
    assert person_rows(db) == []
    with urllib.request.urlopen(f"{url}/a/{token}") as page:
        assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{url}/a/{'y' * 32}")
    assert missing.value.code == 404
    # The same request with the token is stored.
    assert post(answer_url, {"choice": "left", "position": position, "csrf": csrf}) == 303
    assert [r[0] for r in person_rows(db)] == ["carol"]


def test_overlap_splits_the_pairs(pair_files):
    shared, spread = load_pairs(str(pair_files[0]), str(pair_files[1]), overlap=4, seed=0)
    assert len(shared) == 4 and len(spread) == 4
    assert {a.prompt_id for a, _ in shared} | {a.prompt_id for a, _ in spread} == {r["id"] for r in
                                                                                   responses("x", SCENARIO_A)}
    again, _ = load_pairs(str(pair_files[0]), str(pair_files[1]), overlap=4, seed=0)
    assert [a.prompt_id for a, _ in again] == [a.prompt_id for a, _ in shared]  # fixed by the seed


def test_export_and_people_in_the_report(tmp_path, pair_files):
    """Two people through the Annotation object (no browser) and the report's agreement rows."""
    db = tmp_path / "p.sqlite"
    shared, spread = load_pairs(str(pair_files[0]), str(pair_files[1]), overlap=8, seed=0)
    annotation = Annotation(db, shared, spread, seed=0)
    ids = sorted(a.prompt_id for a, _ in shared)
    for name in ("ann", "ben", "cy"):
        annotation.sign_in(name)
        for _ in range(8):
            row = annotation.current(name)
            # ann always picks system_a; ben too but for ids[0] (a tie); cy system_b on ids[0] and ids[1].
            wants_a = not (name == "cy" and row["prompt_id"] in ids[:2])
            side = "left" if (row["order_shown"] == "AB") == wants_a else "right"
            annotation.answer(name, row["position"], "neither" if name == "ben" and row["prompt_id"] == ids[0]
                              else side)
    assert run_entry(main, ["export", "--db", str(db), "--out", str(tmp_path / "p.jsonl")], tmp_path).status == 0
    assert run_entry(main, ["export", "--db", str(db), "--out", str(tmp_path / "p.csv")], tmp_path).status == 0
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    table = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(lines) == len(table) == 24 and [r["verdict"] for r in table] == [r["verdict"] for r in lines]
    assert {r["rater"] for r in lines} == {"ann", "ben", "cy"}

    report = run_entry(main, ["report", "--db", str(db), "--out", str(tmp_path / "r"), "--bootstrap", "200"],
                       tmp_path)
    assert report.status == 0, report.err
    numbers = json.loads((tmp_path / "r" / "report.json").read_text())
    pairs = {tuple(r["raters"]): r for r in numbers["agreement"]}
    # ann/ben: 7 agreements and one tie: 7.5 / 8; ann/cy: 6 of 8 agree, 2 opposite: 6 / 8.
    assert pairs["ann", "ben"]["tie_discounted_accuracy"] == pytest.approx(7.5 / 8)
    assert pairs["ann", "cy"]["tie_discounted_accuracy"] == pytest.approx(6 / 8)
    units = [["win", "tie", "loss"], ["win", "win", "loss"]] + [["win"] * 3] * 6
    assert numbers["people_alpha"]["items"] == 8
    assert numbers["people_alpha"]["alpha"] == pytest.approx(alpha_by_pairs(units))
    assert "Krippendorff's alpha" in report.out


def alpha_by_pairs(units: list[list[str]]) -> float:
    """Krippendorff's alpha (interval) from its definition over pairs of values: 1 - (n - 1) *
    sum over units of the within-unit squared differences / (m_u - 1), over the sum of squared
    differences of all pairs of pooled values."""
    value = {"loss": 0, "tie": 1, "win": 2}
    units = [[value[v] for v in u] for u in units if len(u) >= 2]
    pooled = [v for u in units for v in u]
    within = sum(sum((u[i] - u[j]) ** 2 for i, j in permutations(range(len(u)), 2)) / (len(u) - 1) for u in units)
    between = sum((pooled[i] - pooled[j]) ** 2 for i, j in permutations(range(len(pooled)), 2))
    return 1 - (len(pooled) - 1) * within / between


def test_krippendorff_alpha_on_a_hand_worked_case():
    # Units (loss 0, tie 1, win 2): [2, 2], [2, 1], [0, 0, 1], and [1] (one value: not pairable).
    # Coincidences: o22 = 2, o21 = o12 = 1, and from the 3-value unit (weight 1/2) o00 = o01 = o10 = 1;
    # n = (2, 2, 3), 7 values. D_o = 4 / 7; D_e = (2*(2*2*1) + 2*(2*3*4) + 2*(2*3*1)) / (7*6) = 68/42.
    # alpha = 1 - (4/7) / (68/42) = 11/17.
    units = [["win", "win"], ["win", "tie"], ["loss", "loss", "tie"], ["tie"]]
    assert stats.krippendorff_alpha_interval(units) == pytest.approx(11 / 17)
    assert alpha_by_pairs(units) == pytest.approx(11 / 17)
    assert stats.krippendorff_alpha_interval([["win", "win"], ["loss", "loss"]]) == pytest.approx(1.0)
    assert stats.krippendorff_alpha_interval([["win", "win"], ["win", "win"]]) is None  # no variation
    assert stats.majority(["win", "win", "tie"]) == "win" and stats.majority(["win", "tie"]) is None


def test_judge_against_the_majority_of_people(tmp_path, pair_files):
    """Two people and a model rater stored directly; the model's agreement with the people's
    majority (items where both people agree)."""
    from lima_core.eval.store import add_judgment, connect

    db = tmp_path / "m.sqlite"
    shared, spread = load_pairs(str(pair_files[0]), str(pair_files[1]), overlap=8, seed=0)
    annotation = Annotation(db, shared, spread, seed=0)
    conn = connect(db)
    people = {"p1": ["A", "A", "B", "tie"], "p2": ["A", "B", "B", "tie"], "judge": ["A", "A", "A", "B"]}
    for rater, verdicts in people.items():
        for (a, b), verdict in zip(shared, verdicts):
            _, _, ha, hb = annotation.keys[a.prompt_id, a.sample, a.system, b.system]
            add_judgment(conn, {"prompt_id": a.prompt_id, "sample": 0, "system_a": a.system, "system_b": b.system,
                                "response_a": ha, "response_b": hb, "order_shown": "AB", "rater": rater,
                                "rater_kind": "model" if rater == "judge" else "person", "template_hash": "",
                                "raw_reply": verdict, "verdict": verdict, "attempts": 1})
    assert run_entry(main, ["report", "--db", str(db), "--out", str(tmp_path / "r"), "--bootstrap", "200"],
                     tmp_path).status == 0
    numbers = json.loads((tmp_path / "r" / "report.json").read_text())
    (row,) = [r for r in numbers["agreement"] if r["raters"][1] == "majority of people"]
    # The people's majority: item 0 win, item 1 none (A vs B), item 2 loss, item 3 tie. The judge:
    # win (agrees: 1), win against a loss (0), loss against a tie (0.5).
    assert row["raters"] == ["judge", "majority of people"] and row["items"] == 3
    assert row["tie_discounted_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)


# ---- live multi-turn ratings --------------------------------------------------------------------


@needs_chromium
def test_a_labelled_conversation_with_the_served_tiny_model(tmp_path, checkpoint):
    """A person talks 3 turns with the tiny checkpoint behind lima_core.serve, labels each reply
    (by click and by key), and the report shows the labels per checkpoint and turn."""
    from playwright.sync_api import expect, sync_playwright

    from lima_core.checkpoint.hf import load_pretrained
    from lima_core.data.tokenizer import Tokenizer
    from lima_core.eval.live_chat import Chat, create_chat_app, endpoint_reply
    from lima_core.inference.serve import api as serve

    db = tmp_path / "live.sqlite"
    model_app = serve.create_app(load_pretrained(checkpoint), Tokenizer(checkpoint), model_name="tiny-served")
    with serving(model_app) as model_url:
        chat = Chat(db, "tiny-served", endpoint_reply(f"{model_url}/v1", "tiny-served", max_tokens=8, retries=0))
        with serving(create_chat_app(chat)) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            page = browser.new_context().new_page()
            page.goto(url)
            page.fill("input[name=name]", "dana")
            page.click("text=Start")
            page.wait_for_url("**/c/*")
            replies = []  # as shown on the page
            for turn, (message, label) in enumerate([("Hi there", "pass"), (f"Say {SCRIPT}", "fail"),
                                                     ("Thanks!", "excellent")]):
                page.fill("textarea[name=text]", message)
                page.click("#send")
                expect(page.locator(f"#reply-{turn}")).to_be_attached()
                replies.append(page.text_content(f"#reply-{turn}"))
                assert page.query_selector("#send") is None  # the next message waits for the label
                if turn == 1:  # the message with a script is shown as text, and never ran
                    assert SCRIPT in page.text_content(".turn:nth-of-type(2) pre")
                    assert page.evaluate("typeof window.pwned") == "undefined"
                    page.keyboard.press("1")
                else:
                    page.click(f"text={label.title()} (")
                expect(page.locator(f"#label-{turn}")).to_have_text(label)
            browser.close()
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT c.annotator, c.checkpoint, t.turn, t.user, t.label, t.reply FROM turns t "
                            "JOIN conversations c ON c.id = t.conversation ORDER BY t.turn").fetchall()
    assert [r[:5] for r in rows] == [("dana", "tiny-served", 0, "Hi there", "pass"),
                                     ("dana", "tiny-served", 1, f"Say {SCRIPT}", "fail"),
                                     ("dana", "tiny-served", 2, "Thanks!", "excellent")]
    # The served model's replies, stored as shown (up to what HTML's parser normalises in any
    # text: CR and CRLF become LF, a NUL is dropped; the random model emits such bytes).
    assert [r[5].replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "") for r in rows] == replies
    report = run_entry(main, ["report", "--db", str(db), "--out", str(tmp_path / "r"), "--bootstrap", "200"], tmp_path)
    assert report.status == 0, report.err
    print(report.out)
    assert "live tiny-served: 3 replies in 1 conversations: fail 1 (33.3%" in report.out
    assert "turn 2: fail 1, pass 0, excellent 0" in report.out


def test_live_label_shares_and_turns(tmp_path):
    """Two checkpoints' labels stored directly: the shares, intervals over conversations, turns."""
    from lima_core.eval.report import live_label_differences, live_label_stats
    from lima_core.eval.store import connect

    conn = connect(tmp_path / "l.sqlite")
    conversations = {("a", 1): ["excellent", "pass"], ("a", 2): ["fail", "excellent", "excellent"],
                     ("b", 3): ["fail", "fail"], ("b", 4): ["pass"]}
    with conn:
        conn.execute("INSERT INTO annotators VALUES ('p', 't', 'c', '')")
        for (checkpoint_name, cid), labels in conversations.items():
            conn.execute("INSERT INTO conversations VALUES (?, 'p', ?, '')", (cid, checkpoint_name))
            for turn, label in enumerate(labels):
                conn.execute("INSERT INTO turns VALUES (?, ?, 'u', 'r', ?, '')", (cid, turn, label))
        conn.execute("INSERT INTO turns VALUES (4, 1, 'u', 'r', NULL, '')")  # unlabelled: not counted
    a, b = live_label_stats(conn, 500, 0)
    (difference,) = live_label_differences(conn, 500, 0)
    assert difference["checkpoints"] == ["a", "b"]
    assert difference["excellent"]["difference"] == pytest.approx(3 / 5 - 0)
    assert difference["fail"]["difference"] == pytest.approx(1 / 5 - 2 / 3)
    lo, hi = difference["excellent"]["interval"]
    # b never says excellent; a's resampled shares lie in [1/2, 2/3].
    assert 0.5 - 1e-6 <= lo <= 3 / 5 <= hi <= 2 / 3 + 1e-6
    assert a["checkpoint"] == "a" and a["counts"] == {"fail": 1, "pass": 1, "excellent": 3}
    assert a["excellent"]["share"] == pytest.approx(3 / 5) and b["fail"]["share"] == pytest.approx(2 / 3)
    # Resampling two conversations: a's excellent share is 1/2, 3/5 or 2/3.
    lo, hi = a["excellent"]["interval"]
    assert 0.5 - 1e-6 <= lo <= 3 / 5 <= hi <= 2 / 3 + 1e-6  # the report rounds to 6 places
    assert a["by_turn"] == [{"turn": 0, "fail": 1, "pass": 0, "excellent": 1},
                            {"turn": 1, "fail": 0, "pass": 1, "excellent": 1},
                            {"turn": 2, "fail": 0, "pass": 0, "excellent": 1}]


def test_bad_annotation_input_is_one_line_and_exit_2(tmp_path, pair_files):
    a, b = map(str, pair_files)
    cases = [(["annotate", "--db", str(tmp_path / "x.sqlite"), "--pairs", a, b, "--overlap", "9"],
              "--overlap 9 is more than the 8 pairs"),
             (["annotate", "--db", str(tmp_path / "x.sqlite"), "--pairs", a, a], "are both system 'tiny'"),
             (["export", "--db", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path / "p.csv")],
              "no such database file"),
             (["export", "--db", str(tmp_path / "x.sqlite"), "--out", str(tmp_path / "p.txt")], ".jsonl or .csv")]
    (tmp_path / "x.sqlite").touch()
    for argv, message in cases:
        outcome = run_entry(main, argv, tmp_path)
        assert outcome.status == 2 and message in outcome.err and outcome.err.count("\n") == 1, (argv, outcome.err)


def test_chat_requests_without_a_session_change_nothing(tmp_path):
    """The live page's rules, with a stand-in model that echoes: the token, one label per reply,
    no next message before the label."""
    from lima_core.eval.live_chat import Chat, create_chat_app

    db = tmp_path / "c.sqlite"
    with serving(create_chat_app(Chat(db, "echo", lambda messages: f"echo: {messages[-1]['content']}"))) as url:
        assert post(f"{url}/signin", {"name": "eve"}) == 303
        with sqlite3.connect(db) as conn:
            token, csrf = conn.execute("SELECT token, csrf FROM annotators WHERE name = 'eve'").fetchone()
        say, label = f"{url}/c/{token}/say", f"{url}/c/{token}/label"
        assert post(say, {"text": "hi"}) == 403
        assert post(say, {"text": "", "csrf": csrf}) == 400
        assert post(say, {"text": "hi", "csrf": csrf}) == 303
        assert post(say, {"text": "again", "csrf": csrf}) == 409  # the reply has no label yet
        assert post(label, {"turn": "0", "label": "great", "csrf": csrf}) == 400
        assert post(label, {"turn": "0", "label": "pass"}) == 403
        assert post(label, {"turn": "0", "label": "pass", "csrf": csrf}) == 303
        assert post(label, {"turn": "0", "label": "fail", "csrf": csrf}) == 409  # labelled once
        assert post(f"{url}/c/{'z' * 32}/say", {"text": "hi", "csrf": csrf}) == 404
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT turn, user, reply, label FROM turns").fetchall() == [(0, "hi", "echo: hi", "pass")]
