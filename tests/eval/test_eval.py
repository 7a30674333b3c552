"""The evaluation (lima_core.eval), without a network: a scripted judge on a real localhost HTTP
server (tests/eval/scripted_judge.py), reached through the openai client like any endpoint; the
statistics against closed forms and cases worked by hand."""

import json
import math
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers import ASSETS, free_port, run_entry, serving
from scripted_judge import ScriptedJudge

from lima_core.eval import stats
from lima_core.eval.__main__ import main
from lima_core.eval.generate import prompt_id, read_prompts
from lima_core.eval.judge import PAIRWISE_HASH, parse_grade, parse_verdict, unswapped
from lima_core.eval.store import add_judgment, connect

FAST_RETRIES = ["--retries", "2", "--retry-delay", "0.001"]


@pytest.fixture
def judge():
    with ScriptedJudge() as server:
        yield server


def judge_args(server: ScriptedJudge, *extra) -> list[str]:
    return ["--judge-url", server.url, "--judge-model", "scripted", *FAST_RETRIES, *extra]


def ok(outcome):
    assert outcome.status == 0, outcome.err
    return outcome


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dev_prompts():
    return read_prompts(ASSETS / "dev.jsonl")


def responses(system: str, texts: list[str]) -> list[dict]:
    """A response file's lines: `texts[i]` answers dev prompt i."""
    return [{"id": p.id, "sample": 0, "system": system, "prompt": p.turns, "system_prompt": p.system,
             "reference": p.reference, "response": t} for p, t in zip(dev_prompts(), texts)]


# The scripted scenario on the 8 bundled dev prompts (see scripted_judge.py for the markers):
# item outcome for A, both orders:          AB     BA
SCENARIO_A = ["A0 [good]",                  # A      A   -> win
              "A1 [good]",                  # A      A   -> win
              "A2 [good][good]",            # A      A   -> win (2 markers beat 1)
              "A3 [tie]",                   # tie    tie -> tie
              "A4 [first]",                 # A      B   -> inconsistent: tie
              "A5 [garbage]",               # unparsed (3 attempts each) -> unparsed, not a tie
              "A6 [good] [flaky]",          # HTTP 500 once per order, then A A -> win
              "A7"]                         # B      B   -> loss (a garbage reply first, per order)
SCENARIO_B = ["B0", "B1", "B2 [good]", "B3 [tie] <script>alert('x')</script>", "B4", "B5", "B6",
              "B7 [good] [unparsed-once]"]


# ---- prompts and generation ------------------------------------------------------------------


def test_prompts_in_every_format_get_the_same_id(tmp_path):
    lines = [{"conversations": ["How do I boil an egg?"], "source": "lima test"},
             {"messages": [{"role": "user", "content": "How do I boil an egg?"}]},
             {"conversations": [{"from": "human", "value": "How do I boil an egg?"},
                                {"from": "gpt", "value": "Put it in boiling water."}]},
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
             {"conversations": ["Hi", "Hello!", "What is 2 + 2?"]}]
    prompts = read_prompts(write_jsonl(tmp_path / "p.jsonl", lines))
    assert [p.line for p in prompts] == [1, 4, 5]  # lines 2 and 3 repeat line 1's prompt: asked once
    assert prompts[0].turns == ["How do I boil an egg?"] and prompts[0].id == prompt_id(None, ["How do I boil an egg?"])
    assert prompts[1].system == "Be brief." and prompts[1].turns == ["Hi"]
    assert prompts[2].turns == ["Hi", "Hello!", "What is 2 + 2?"] and prompts[2].reference is None
    dev = dev_prompts()
    assert len(dev) == 8 and all(p.reference and len(p.turns) % 2 == 1 for p in dev)


def test_generate_from_a_checkpoint_resumes_where_it_stopped(tmp_path, checkpoint):
    out = tmp_path / "a.jsonl"
    args = ["generate", "--prompts", str(ASSETS / "dev.jsonl"), "--out", str(out), "--checkpoint", str(checkpoint),
            "--samples", "2", "--max-tokens", "8"]
    ok(run_entry(main, [*args, "--limit", "3"], tmp_path))
    first = out.read_text().splitlines()
    assert len(first) == 6  # 3 prompts x 2 samples
    ok(run_entry(main, args, tmp_path))
    lines = out.read_text().splitlines()
    assert lines[:6] == first and len(lines) == 16  # only the missing 10 were generated
    records = [json.loads(line) for line in lines]
    dev = {p.id: p for p in dev_prompts()}
    assert {(r["id"], r["sample"]) for r in records} == {(i, s) for i in dev for s in (0, 1)}
    for r in records:
        assert r["system"] == f"{checkpoint.parent.name}/epoch-3"  # an epoch export is named with its run
        assert r["prompt"] == dev[r["id"]].turns and r["reference"] == dev[r["id"]].reference
        assert isinstance(r["response"], str) and 0 <= r["tokens"] <= 8
        assert r["finish"] == ("length" if r["tokens"] == 8 else "stop")
        assert r["settings"] == {"max_new_tokens": 8, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2,
                                 "seed": 0}  # LIMA's sampling by default
    # A crash in the middle of a line: the next run cuts the partial line off and writes it again.
    out.write_text("\n".join(lines[:15]) + "\n" + lines[15][:20])
    outcome = ok(run_entry(main, args, tmp_path))
    assert "1 responses written" in outcome.out and "partly written" in outcome.err
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()[:15]] == [r["id"] for r in records[:15]]
    assert len(out.read_text().splitlines()) == 16
    again = ok(run_entry(main, args, tmp_path))
    assert "0 responses written" in again.out
    other = run_entry(main, [*args, "--temperature", "0"], tmp_path)  # other settings: not mixed into one file
    assert other.status == 2 and "use another --out" in other.err


def test_generate_from_an_endpoint(tmp_path, judge):
    out = tmp_path / "e.jsonl"
    ok(run_entry(main, ["generate", "--prompts", str(ASSETS / "dev.jsonl"), "--out", str(out), "--endpoint",
                        judge.url, "--model", "echo-1", *FAST_RETRIES], tmp_path))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8 and judge.calls["generate"] == 8
    assert all(r["system"] == "echo-1" and r["response"] == f"echo: {r['prompt'][-1]}" for r in records)
    assert all(r["tokens"] == len(r["response"].split()) for r in records)  # the endpoint's usage count


# ---- judging ---------------------------------------------------------------------------


@pytest.mark.parametrize("reply, verdict", [
    ("Verdict: A", "A"), ("Both are fine.\nB is clearer.\nVerdict: B\n", "B"), ("  Verdict: Neither  \n\n", "Neither"),
    ("Verdict: A\nThanks!", None), ("Verdict: A\nVerdict: B", None), ("Verdict: A\n\nVerdict: A", None),
    ("verdict: a", None), ("**Verdict: A**", None), ("Response A is better.", None), ("", None),
    ("Verdict: C", None), ("Verdict: A.", None), ("Verdict: A or B", None),
])
def test_verdicts_are_parsed_strictly(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_grades_and_unswapping():
    assert parse_grade("Fine.\nGrade: 5") == 5
    assert [parse_grade(r) for r in ("Grade: 7", "Grade: 0", "Grade: 5/6", "Grade: 3\nok", "5")] == [None] * 5
    assert [unswapped(v, "AB") for v in ("A", "B", "Neither", None)] == ["A", "B", "tie", "unparsed"]
    assert [unswapped(v, "BA") for v in ("A", "B", "Neither", None)] == ["B", "A", "tie", "unparsed"]


def test_judge_report_and_rerun_on_the_dev_prompts(tmp_path, judge):
    a = write_jsonl(tmp_path / "a.jsonl", responses("tiny", SCENARIO_A))
    b = write_jsonl(tmp_path / "b.jsonl", responses("reference", SCENARIO_B))
    db = tmp_path / "j.sqlite"
    ok(run_entry(main, ["judge", str(a), str(b), "--db", str(db), *judge_args(judge)], tmp_path))
    # 16 judgments; extra requests: prompt 5 two retries per order, prompts 6 and 7 one per order.
    assert judge.calls["pairwise"] == 16 + 2 * 2 + 2 + 2
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT prompt_id, order_shown, verdict, attempts, template_hash FROM judgments").fetchall()
    assert len(rows) == 16 and {r[4] for r in rows} == {PAIRWISE_HASH}
    ids = [p.id for p in dev_prompts()]
    verdict = {(r[0], r[1]): r[2] for r in rows}
    attempts = {(r[0], r[1]): r[3] for r in rows}
    expected = [("A", "A"), ("A", "A"), ("A", "A"), ("tie", "tie"), ("A", "B"), ("unparsed", "unparsed"),
                ("A", "A"), ("B", "B")]
    assert [(verdict[i, "AB"], verdict[i, "BA"]) for i in ids] == expected
    assert [attempts[i, "AB"] for i in ids] == [1, 1, 1, 1, 1, 3, 2, 2]

    # A rerun asks nothing: every judgment is in the database.
    calls = judge.calls["total"]
    rerun = ok(run_entry(main, ["judge", str(a), str(b), "--db", str(db), *judge_args(judge)], tmp_path))
    assert judge.calls["total"] == calls and "0 judgments asked" in rerun.out and "16 already" in rerun.out

    # A person's judgments of the same items (order AB only) land in the same table.
    person = ["A", "B", "tie", "A", "B", "A", "A", "B"]
    hashes = dict(conn.execute("SELECT prompt_id, response_a || ' ' || response_b FROM judgments").fetchall())
    store = connect(db)
    for i, v in zip(ids, person):
        response_a, response_b = hashes[i].split()
        add_judgment(store, {"prompt_id": i, "sample": 0, "system_a": "tiny", "system_b": "reference",
                             "response_a": response_a, "response_b": response_b, "order_shown": "AB",
                             "rater": "alice", "rater_kind": "person", "template_hash": "", "raw_reply": v,
                             "verdict": v, "attempts": 1})

    report = ok(run_entry(main, ["report", "--db", str(db), "--out", str(tmp_path / "report")], tmp_path))
    numbers = json.loads((tmp_path / "report" / "report.json").read_text())
    model = next(c for c in numbers["comparisons"] if c["rater"] == "scripted")
    # Parsed items: 7 (prompt 5 is unparsed): wins 0, 1, 2, 6; ties 3, 4; loss 7.
    assert model["counts"] == {"win": 4, "tie": 2, "loss": 1, "unparsed": 1}
    assert model["win"]["share"] == pytest.approx(4 / 7) and model["loss"]["share"] == pytest.approx(1 / 7)
    lo, hi = model["win"]["interval"]
    assert lo < 4 / 7 < hi
    # Position consistency: 7 items with both orders parsed, prompt 4's disagree.
    assert model["position_consistency"]["agree"] == 6 and model["position_consistency"]["of"] == 7
    # First shown wins: prompts 0, 1, 2, 6 once each (AB), prompt 4 twice, prompt 7 once (BA) = 7 of 12.
    assert model["position_bias"] == {"judgments": 14, "first_wins": 7, "second_wins": 5, "ties": 2,
                                      "first_wins_of_decided": pytest.approx(7 / 12)}
    # The longer response wins 11 of 12 decided judgments (all but prompt 4 shown BA).
    assert model["length_bias"]["longer_wins"] == 11 and model["length_bias"]["judgments"] == 12
    # Agreement with alice on the 7 items both parsed: scores 1, 0, .5, .5, .5, 1, 1 -> 4.5 / 7;
    # kappa: marginals model (loss, tie, win) = (1, 2, 4)/7, alice (3, 1, 3)/7; chance agreement
    # sum_ij w_ij r_i c_j = 25.5/49, so kappa = (31.5 - 25.5) / (49 - 25.5) = 6 / 23.5.
    (agreement,) = numbers["agreement"]
    assert agreement["raters"] == ["alice", "scripted"] and agreement["items"] == 7
    assert agreement["tie_discounted_accuracy"] == pytest.approx(4.5 / 7)
    assert agreement["weighted_kappa"] == pytest.approx(6 / 23.5)
    assert "tiny" in report.out and "57.1%" in report.out and "6/7" in report.out

    png = (tmp_path / "report" / "win_tie_loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    page = (tmp_path / "report" / "report.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    sources = re.findall(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)  # nothing fetched
    assert "<link" not in page and "url(" not in page and "@import" not in page
    assert all(f"prompt {i}" in page for i in ids) and "A5 [garbage]" in page


def test_likert_grades(tmp_path, judge):
    texts = ["[grade=6]", "[grade=4]", "[grade=5]", "no grade here", "[grade=5]", "[grade=5]", "[grade=5]",
             "[grade=5]"]
    a = write_jsonl(tmp_path / "a.jsonl", responses("tiny", texts))
    db = tmp_path / "j.sqlite"
    ok(run_entry(main, ["likert", str(a), "--db", str(db), *judge_args(judge)], tmp_path))
    assert judge.calls["likert"] == 7 + 3  # the ungraded one: 1 + 2 retries
    ok(run_entry(main, ["likert", str(a), "--db", str(db), *judge_args(judge)], tmp_path))
    assert judge.calls["likert"] == 10  # cached
    ok(run_entry(main, ["report", "--db", str(db), "--out", str(tmp_path / "r")], tmp_path))
    (likert,) = json.loads((tmp_path / "r" / "report.json").read_text())["likert"]
    assert likert["graded"] == 7 and likert["unparsed"] == 1 and likert["mean"] == pytest.approx(35 / 7)
    assert likert["interval"][0] <= 5 <= likert["interval"][1]


# ---- statistics against closed forms and hand-worked cases -----------------------------


def test_bootstrap_interval_matches_the_normal_approximation():
    """A binomial share over n independent prompts: the percentile bootstrap agrees with
    p +- 1.96 sqrt(p (1 - p) / n) to within 0.0015 (a tenth of the half-width). With two
    identical samples per prompt the prompts, not the samples, are the units: the interval is
    the same, not sqrt(2) narrower."""
    rng = np.random.default_rng(1)
    n = 4000
    outcomes = rng.choice(3, size=n, p=[0.3, 0.2, 0.5])
    per_prompt = np.eye(3)[outcomes]  # [prompts, (win, tie, loss)]
    (win, (lo, hi)), *_ = stats.fractions_with_intervals(per_prompt, replicates=4000, seed=0)
    half = 1.96 * math.sqrt(win * (1 - win) / n)
    assert lo == pytest.approx(win - half, abs=0.0015) and hi == pytest.approx(win + half, abs=0.0015)
    (win2, (lo2, hi2)), *_ = stats.fractions_with_intervals(2 * per_prompt, replicates=4000, seed=0)
    assert win2 == win and lo2 == pytest.approx(lo, abs=1e-12) and hi2 == pytest.approx(hi, abs=1e-12)


def test_agreement_measures_on_a_hand_worked_case():
    first = ["win", "win", "tie", "loss", "loss"]
    second = ["win", "tie", "tie", "loss", "win"]
    # scores 1, .5, 1, 1, 0 -> .7; marginals (loss, tie, win) (.4, .2, .4) and (.2, .4, .4);
    # chance agreement sum_ij (1 - |i - j| / 2) r_i c_j = .16 + .14 + .24 = .54; kappa .16 / .46.
    assert stats.tie_discounted_accuracy(first, second) == pytest.approx(0.7)
    assert stats.weighted_kappa(first, second) == pytest.approx(8 / 23)
    assert stats.weighted_kappa(first, first) == pytest.approx(1.0)
    assert stats.weighted_kappa(["win"] * 3, ["win"] * 3) is None  # chance agreement 1: undefined
    assert stats.weighted_kappa(["win", "loss"], ["loss", "win"]) == pytest.approx(-1.0)


def test_bradley_terry_solves_the_likelihood_equations():
    wins = np.array([[0, 7, 3], [2, 0, 5], [4, 1, 0]], dtype=float)
    p = stats.bradley_terry(wins)
    games = wins + wins.T
    # At the maximum, each player's expected wins equal its actual wins: W_i = sum_j n_ij p_i / (p_i + p_j).
    expected = (games * p[:, None] / (p[:, None] + p[None, :])).sum(axis=1)
    assert expected == pytest.approx(wins.sum(axis=1), rel=1e-9)
    assert np.exp(np.log(p).mean()) == pytest.approx(1.0)
    two = stats.bradley_terry(np.array([[0, 3.5], [1.5, 0]]))  # two players: p1 / p2 = W1 / W2
    assert two[0] / two[1] == pytest.approx(3.5 / 1.5)


def test_spearman_on_hand_worked_cases():
    # dev loss ranks (5, 6, 7) = (1, 2, 3); judge ranks (3, 1, 2): d = (-2, 1, 1), 1 - 6 * 6 / (3 * 8) = -0.5
    assert stats.spearman([1.0, 2.0, 3.0], [3, 1, 2]) == pytest.approx(-0.5)
    assert stats.spearman([1, 2, 2, 4], [1, 3, 2, 4]) == pytest.approx(0.9486832980505138)  # ties at mean rank
    assert stats.spearman([1, 1], [1, 2]) is None


# ---- choosing a checkpoint -----------------------------------------------------------------


def fake_run(folder: Path) -> Path:
    """A finished run: epochs 5-7 in the window with dev generations; dev loss orders them 5, 6,
    7; the scripted judge's order (by [good] markers) is 6, 7, 5."""
    run = folder / "fake-run"
    run.mkdir()
    markers = {5: "", 6: " [good][good]", 7: " [good]"}
    epochs = []
    for epoch in range(1, 9):
        record = {"epoch": epoch, "export": str(run / f"epoch-{epoch}") if 5 <= epoch <= 7 else None,
                  "dev_loss": 2.0 + 0.1 * epoch}
        if epoch in markers:
            record["generations"] = str(run / f"generations-epoch-{epoch}.json")
            Path(record["generations"]).write_text(json.dumps(
                [{"prompt": p.turns, "system": p.system, "reference": p.reference,
                  "answer": f"epoch {epoch} answer{markers[epoch]}"} for p in dev_prompts()]))
        epochs.append(record)
    (run / "summary.json").write_text(json.dumps(
        {"chosen_epoch": 5, "checkpoint": str(run / "epoch-5"), "reason": "lowest dev loss", "window": [5, 7],
         "epochs": epochs, "final_train_loss": 1.0, "steps": 80, "tokens": 1000}))
    return run


def test_choose_ranks_the_window_and_writes_the_summary(tmp_path, judge):
    run = fake_run(tmp_path)
    outcome = ok(run_entry(main, ["choose", str(run), *judge_args(judge), "--bootstrap", "200"], tmp_path))
    assert judge.calls["pairwise"] == 3 * 8 * 2  # three pairs of epochs, 8 prompts, both orders
    summary = json.loads((run / "summary.json").read_text())
    assert summary["chosen_epoch"] == 6 and summary["checkpoint"] == str(run / "epoch-6")
    assert summary["chosen_by_dev_loss"] == {"epoch": 5, "checkpoint": str(run / "epoch-5"),
                                             "reason": "lowest dev loss"}
    chosen = summary["chosen_by_judge"]
    assert [r["epoch"] for r in chosen["ranking"]] == [6, 7, 5] and chosen["epoch"] == 6
    assert chosen["spearman_dev_loss_vs_judge"] == pytest.approx(-0.5)
    assert summary["steps"] == 80 and len(summary["epochs"]) == 8  # the other fields kept
    assert "-0.500" in outcome.out and (run / "judgments.sqlite").is_file()
    ok(run_entry(main, ["choose", str(run), *judge_args(judge), "--bootstrap", "200"], tmp_path))
    assert judge.calls["pairwise"] == 48  # cached
    assert json.loads((run / "summary.json").read_text())["chosen_by_dev_loss"]["epoch"] == 5  # not overwritten


# ---- bad input: one line, exit 2 ----------------------------------------------------------


def bad_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    good = write_jsonl(tmp / "good.jsonl", responses("tiny", ["x"] * 8))
    other = write_jsonl(tmp / "other.jsonl", responses("base", ["y"] * 8))
    (tmp / "broken.jsonl").write_text('{"id": "1", "sample": 0,\n')
    (tmp / "prompts.jsonl").write_text('{"conversations": ["hi"]}\n{"conversations": [}\n')
    (tmp / "empty-run").mkdir()
    judge = ["--judge-url", f"http://127.0.0.1:{free_port()}/v1", "--judge-model", "m", "--retries", "1",
             "--retry-delay", "0.001"]
    generate = ["generate", "--out", str(tmp / "out.jsonl"), "--endpoint", "http://127.0.0.1:1/v1", "--model", "m"]
    return [
        ("missing prompts file", [*generate, "--prompts", str(tmp / "nope.jsonl")], "nope.jsonl: cannot read"),
        ("malformed prompts", [*generate, "--prompts", str(tmp / "prompts.jsonl")], "prompts.jsonl:2: not valid JSON"),
        ("zero samples", [*generate, "--prompts", str(ASSETS / "dev.jsonl"), "--samples", "0"],
         "--samples must be at least 1"),
        ("endpoint without model", ["generate", "--prompts", str(ASSETS / "dev.jsonl"), "--out", str(tmp / "o.jsonl"),
                                    "--endpoint", "http://127.0.0.1:1/v1"], "--endpoint needs --model"),
        ("bad sampling", [*generate, "--prompts", str(ASSETS / "dev.jsonl"), "--top-p", "0"], "sampling.top_p"),
        ("missing checkpoint", ["generate", "--prompts", str(ASSETS / "dev.jsonl"), "--out", str(tmp / "o.jsonl"),
                                "--checkpoint", str(tmp / "no-ckpt")], "no config.json"),
        ("malformed responses", ["judge", str(good), str(tmp / "broken.jsonl"), "--db", str(tmp / "j.sqlite"), *judge],
         "broken.jsonl:1: not a JSON line"),
        ("missing responses", ["judge", str(good), str(tmp / "none.jsonl"), "--db", str(tmp / "j.sqlite"), *judge],
         "none.jsonl: cannot read"),
        ("same system twice", ["judge", str(good), str(good), "--db", str(tmp / "j.sqlite"), *judge],
         "are both system 'tiny'"),
        ("unreachable judge", ["judge", str(good), str(other), "--db", str(tmp / "j.sqlite"), *judge],
         "no reply after 2 attempts"),
        ("unreachable likert judge", ["likert", str(good), "--db", str(tmp / "j.sqlite"), *judge],
         "no reply after 2 attempts"),
        ("report without a database", ["report", "--db", str(tmp / "none.sqlite"), "--out", str(tmp / "r")],
         "none.sqlite: no such database file"),
        ("not a database", ["report", "--db", str(good), "--out", str(tmp / "r")], "not a judgments database"),
        ("choose without a summary", ["choose", str(tmp / "empty-run"), *judge], "summary.json: cannot read"),
    ]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    for name, argv, fragment in bad_cases(tmp_path):
        outcome = run_entry(main, argv, tmp_path / "watched")
        assert outcome.status == 2, (name, outcome.err)
        lines = [line for line in outcome.err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and fragment in lines[0], (name, outcome.err)


# ---- end to end: lima_core.serve answering and judging over HTTP ------------------------------


def test_generate_and_judge_through_lima_core_serve(tmp_path, checkpoint):
    """The tiny checkpoint served by lima_core.serve (uvicorn in a thread, a real socket), its
    answers generated through the endpoint and judged by the same model: a 2M-parameter model
    writes no verdict line, so every judgment is recorded as unparsed, and reported so."""
    from lima_core.checkpoint.hf import load_pretrained
    from lima_core.data.tokenizer import Tokenizer
    from lima_core.inference.serve import api as serve

    app = serve.create_app(load_pretrained(checkpoint), Tokenizer(checkpoint), model_name="tiny-served")
    with serving(app) as base:
        url = f"{base}/v1"
        out = tmp_path / "served.jsonl"
        ok(run_entry(main, ["generate", "--prompts", str(ASSETS / "dev.jsonl"), "--out", str(out), "--endpoint", url,
                            "--model", "tiny-served", "--max-tokens", "6", *FAST_RETRIES], tmp_path))
        served = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(served) == 8 and all(r["system"] == "tiny-served" and 1 <= r["tokens"] <= 6 for r in served)
        local = write_jsonl(tmp_path / "local.jsonl", responses("reference", [p.reference for p in dev_prompts()]))
        db = tmp_path / "j.sqlite"
        ok(run_entry(main, ["judge", str(out), str(local), "--db", str(db), "--judge-url", url, "--judge-model",
                            "tiny-served", "--retries", "0", "--judge-max-tokens", "4"], tmp_path))
        ok(run_entry(main, ["report", "--db", str(db), "--out", str(tmp_path / "r"), "--bootstrap", "200"], tmp_path))
        (comparison,) = json.loads((tmp_path / "r" / "report.json").read_text())["comparisons"]
        assert comparison["counts"]["unparsed"] == 8  # word salad is never read as a tie
        wrong = run_entry(main, ["likert", str(out), "--db", str(db), "--judge-url", url, "--judge-model", "gpt-9",
                                 "--retries", "3"], tmp_path)
        assert wrong.status == 2 and "the request was refused (HTTP 404" in wrong.err  # not retried


def test_retries_back_off_exponentially(judge):
    """A reply that never parses: 1 + 3 requests, waiting base, 2 base, 4 base between them; an
    HTTP 500 the first time: one wait, then the verdict."""
    from lima_core.eval.client import complete, make_client

    waits = []
    client = make_client(judge.url, "", timeout=10)

    def ask(text):
        return complete(client, "m", [{"role": "user", "content": text}], retries=3, base_delay=0.5,
                        parse=parse_verdict, sleep=waits.append)

    garbage = ask("[Answer A]\nx [garbage]\n[End of answer A]\n\n[Answer B]\ny\n[End of answer B]")
    assert (garbage.parsed, garbage.attempts, waits) == (None, 4, [0.5, 1.0, 2.0])
    waits.clear()
    flaky = ask("[Answer A]\nx [flaky]\n[End of answer A]\n\n[Answer B]\ny [good]\n[End of answer B]")
    assert (flaky.parsed, flaky.attempts, waits) == ("B", 2, [0.5])
    assert judge.calls["pairwise"] == 6


def test_the_trainer_chooses_by_a_configured_judge(tmp_path):
    """--judge-url / --judge-model in the run's config: at the end the window's epochs are
    compared by the judge and summary.json says which it chose and why."""
    from lima_core.train import loop as train

    lines = (ASSETS / "train.jsonl").read_text().splitlines()
    data = write_jsonl(tmp_path / "train.jsonl", [json.loads(line) for line in lines[:4]])
    dev_lines = (ASSETS / "dev.jsonl").read_text().splitlines()
    dev = write_jsonl(tmp_path / "dev.jsonl", [json.loads(line) for line in dev_lines[:3]])
    with ScriptedJudge("distinct-words") as server:
        outcome = run_entry(train.main, ["--data", str(data), "--dev-data", str(dev),
                                         "--out-dir", str(tmp_path / "runs"),
                                         "--name", "t", "--epochs", "3", "--batch-size", "2", "--max-len", "256",
                                         "--max-new-tokens", "12", "--plot", "false", "--judge-url", server.url,
                                         "--judge-model", "scripted"], tmp_path)
        assert outcome.status == 0, outcome.err
        assert server.calls["pairwise"] == 2 * 3  # the window (epochs 1-2 of 3): one pair, both orders, 3 prompts
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["chosen_by_judge"]["epoch"] == summary["chosen_epoch"] in (1, 2)
    assert "Bradley-Terry" in summary["reason"] and "chosen_by_dev_loss" in summary
    assert f"chosen checkpoint: {summary['checkpoint']}" in outcome.out


def test_a_judge_url_needs_a_judge_model(tmp_path):
    from lima_core.train import loop as train

    outcome = run_entry(train.main, ["--judge-url", "http://127.0.0.1:1/v1", "--out-dir", str(tmp_path / "r")],
                        tmp_path)
    assert outcome.status == 2 and "--judge-url and --judge-model go together" in outcome.err
