"""What the judgments say: win / tie / loss of each system under test against each baseline, per
rater, with 95% intervals from a bootstrap over prompts; the judge's position consistency,
position bias and length bias; Likert means; agreement between raters.

An item is one (system_a, system_b, rater, prompt, sample). Its outcome, from system_a's side:
the verdict of every order the rater judged when they agree ("A" a win, "B" a loss, "tie"),
a tie when they disagree (the judge's preference followed the position, not the response), and
"unparsed" when any order's reply was unparsed: unparsed items are counted and shown apart,
never as ties, and the win / tie / loss shares are over the parsed items.

write_report writes into --out: win_tie_loss.png (LIMA Figure 1's stacked bars, drawn by
report_figure), report.html (one self-contained page, report_html) and report.json (every
number); report_text turns the numbers into the tables and lines the command prints.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from lima_core.checkpoint.atomic import save_figure, write_bytes, write_json
from lima_core.eval import stats, store
from lima_core.eval.report_figure import win_tie_loss_figure
from lima_core.eval.report_html import render_page
from lima_core.eval.web import LABELS


@dataclass
class Item:
    """One rater's judgments of one pair of responses (one row per order judged)."""

    system_a: str
    system_b: str
    rater: str
    prompt_id: str
    sample: int
    prompt: dict
    response_a: str
    response_b: str
    rows: list = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return item_outcome([r["verdict"] for r in self.rows])

    @property
    def consistent(self) -> bool | None:
        """Whether the orders agree; None unless two orders were judged and both parsed."""
        verdicts = [r["verdict"] for r in self.rows]
        if len(verdicts) < 2 or "unparsed" in verdicts:
            return None
        return len(set(verdicts)) == 1


def item_outcome(verdicts: list[str]) -> str:
    """win / tie / loss of system_a, or unparsed (see the module doc)."""
    if not verdicts or "unparsed" in verdicts:
        return "unparsed"
    return stats.OUTCOME_OF[verdicts[0]] if len(set(verdicts)) == 1 else "tie"


def load_items(conn) -> dict[tuple[str, str, str], list[Item]]:
    """Items by comparison (system_a, system_b, rater), from the newest row of each order."""
    items: dict[tuple, Item] = {}
    for row in store.latest_judgments(conn):
        key = (row["system_a"], row["system_b"], row["rater"], row["prompt_id"], row["sample"])
        if key not in items:
            items[key] = Item(*key, json.loads(row["prompt"]), row["response_a_text"], row["response_b_text"])
        items[key].rows.append(row)
    by_comparison = defaultdict(list)
    for key, item in items.items():
        by_comparison[key[:3]].append(item)
    return dict(by_comparison)


def _per_prompt(items: list, columns) -> np.ndarray:
    """[prompts, len(columns)]: per prompt, the sum of each column function over its items."""
    rows = defaultdict(lambda: np.zeros(len(columns)))
    for item in items:
        rows[item.prompt_id] += [f(item) for f in columns]
    return np.array(list(rows.values())) if rows else np.zeros((0, len(columns)))


def _interval(interval):
    return None if interval is None else [round(interval[0], 6), round(interval[1], 6)]


def comparison_stats(items: list[Item], replicates: int, seed: int) -> dict:
    """The numbers of one comparison (see the module doc)."""
    outcomes = ("win", "tie", "loss")
    counts = {o: sum(i.outcome == o for i in items) for o in (*outcomes, "unparsed")}
    per_prompt = _per_prompt(items, [lambda i, o=o: i.outcome == o for o in outcomes])
    shares = stats.fractions_with_intervals(per_prompt, replicates, seed) if len(items) > counts["unparsed"] \
        else [(None, None)] * 3  # every item unparsed: no share to give
    result = {"items": len(items), "prompts": len({i.prompt_id for i in items}), "counts": counts,
              **{o: {"share": share, "interval": _interval(ci)} for o, (share, ci) in zip(outcomes, shares)}}
    checked = [i for i in items if i.consistent is not None]
    if checked:
        both = _per_prompt(checked, [lambda i: i.consistent, lambda i: 1])
        sums = stats.bootstrap_sums(both, replicates, seed)
        result["position_consistency"] = {"agree": int(both[:, 0].sum()), "of": len(checked),
                                          "share": float(both[:, 0].sum() / len(checked)),
                                          "interval": _interval(stats.ratio_interval(sums[:, 0], sums[:, 1]))}
    result["position_bias"] = position_bias([r for i in items for r in i.rows])
    result["length_bias"] = length_bias(items)
    return result


def first_shown_won(row) -> bool | None:
    """Whether the response shown first won the judgment; None for a tie or unparsed."""
    if row["verdict"] not in ("A", "B"):
        return None
    return (row["verdict"] == "A") == (row["order_shown"] == "AB")


def position_bias(rows: list) -> dict:
    """Over every parsed judgment: how often the response shown first wins, the second wins, or
    neither; first_wins_of_decided is the first's share of the judgments with a winner (0.5 for
    a judge that ignores position)."""
    won = [first_shown_won(r) for r in rows if r["verdict"] != "unparsed"]
    first, second = sum(w is True for w in won), sum(w is False for w in won)
    return {"judgments": len(won), "first_wins": first, "second_wins": second, "ties": len(won) - first - second,
            "first_wins_of_decided": first / (first + second) if first + second else None}


def length_bias(items: list[Item]) -> dict:
    """Mean response lengths (characters) of both systems, and, over every parsed judgment with a
    winner between responses of different lengths, how often the longer one won."""
    decided = []
    for item in items:
        if len(item.response_a) == len(item.response_b):
            continue
        a_longer = len(item.response_a) > len(item.response_b)
        decided += [(r["verdict"] == "A") == a_longer for r in item.rows if r["verdict"] in ("A", "B")]
    return {"mean_chars_a": float(np.mean([len(i.response_a) for i in items])) if items else None,
            "mean_chars_b": float(np.mean([len(i.response_b) for i in items])) if items else None,
            "judgments": len(decided), "longer_wins": sum(decided),
            "longer_wins_share": sum(decided) / len(decided) if decided else None}


def likert_stats(conn, replicates: int, seed: int) -> list[dict]:
    """Mean grade of each (system, rater), with a bootstrap interval over prompts."""
    groups = defaultdict(list)
    for row in store.latest_grades(conn):
        groups[row["system"], row["rater"]].append(row)
    out = []
    for (system, rater), rows in sorted(groups.items()):
        parsed = [r for r in rows if r["grade"] is not None]
        per_prompt = defaultdict(lambda: np.zeros(2))
        for r in parsed:
            per_prompt[r["prompt_id"]] += [r["grade"], 1]
        matrix = np.array(list(per_prompt.values())) if per_prompt else np.zeros((0, 2))
        sums = stats.bootstrap_sums(matrix, replicates, seed)
        out.append({"system": system, "rater": rater, "graded": len(parsed), "unparsed": len(rows) - len(parsed),
                    "mean": float(matrix[:, 0].sum() / matrix[:, 1].sum()) if parsed else None,
                    "interval": _interval(stats.ratio_interval(sums[:, 0], sums[:, 1])) if parsed else None})
    return out


def _outcomes_by_rater(comparisons: dict[tuple, list[Item]]) -> tuple[dict, dict]:
    """rater -> {(system_a, system_b, prompt, sample): parsed outcome}, and rater -> rater_kind."""
    outcomes, kinds = defaultdict(dict), {}
    for (a, b, rater), items in comparisons.items():
        for i in items:
            kinds[rater] = i.rows[0]["rater_kind"]
            if i.outcome != "unparsed":
                outcomes[rater][a, b, i.prompt_id, i.sample] = i.outcome
    return outcomes, kinds


def _agreement(first: dict, second: dict, replicates: int, seed: int) -> dict | None:
    """Tie-discounted accuracy (with a bootstrap interval over prompts) and weighted kappa of two
    {item: outcome} maps over the items both have; None when they share none."""
    shared = sorted(set(first) & set(second))
    if not shared:
        return None
    x, y = [first[k] for k in shared], [second[k] for k in shared]
    per_prompt = defaultdict(lambda: np.zeros(2))
    for key, u, v in zip(shared, x, y):
        per_prompt[key[2]] += [stats.agreement_score(u, v), 1]
    matrix = np.array(list(per_prompt.values()))
    sums = stats.bootstrap_sums(matrix, replicates, seed)
    return {"items": len(shared), "tie_discounted_accuracy": stats.tie_discounted_accuracy(x, y),
            "interval": _interval(stats.ratio_interval(sums[:, 0], sums[:, 1])),
            "weighted_kappa": stats.weighted_kappa(x, y)}


PEOPLE_MAJORITY = "majority of people"


def agreement_stats(comparisons: dict[tuple, list[Item]], replicates: int, seed: int) -> list[dict]:
    """For every two raters (person-person, person-model, model-model), over the items both
    judged and both parsed: LIMA's tie-discounted accuracy with a bootstrap interval over
    prompts, and linearly weighted Cohen's kappa. Then each model rater against the majority of
    people: on items two or more people judged and more than half of them gave one outcome."""
    outcomes, kinds = _outcomes_by_rater(comparisons)
    out = []
    for first, second in combinations(sorted(outcomes), 2):
        row = _agreement(outcomes[first], outcomes[second], replicates, seed)
        if row:
            out.append({"raters": [first, second], "kinds": [kinds[first], kinds[second]], **row})
    people = [r for r in sorted(outcomes) if kinds[r] == "person"]
    majority = {}
    for key in {k for r in people for k in outcomes[r]}:
        verdicts = [outcomes[r][key] for r in people if key in outcomes[r]]
        if len(verdicts) >= 2 and stats.majority(verdicts) is not None:
            majority[key] = stats.majority(verdicts)
    for model in (r for r in sorted(outcomes) if kinds[r] == "model"):
        row = _agreement(outcomes[model], majority, replicates, seed)
        if row:
            out.append({"raters": [model, PEOPLE_MAJORITY], "kinds": ["model", "people"], **row})
    return out


def people_alpha(comparisons: dict[tuple, list[Item]]) -> dict | None:
    """Krippendorff's alpha (interval metric over loss < tie < win) across every person, over
    the items two or more people judged; None without two people."""
    outcomes, kinds = _outcomes_by_rater(comparisons)
    people = [r for r in sorted(outcomes) if kinds[r] == "person"]
    if len(people) < 2:
        return None
    units = defaultdict(list)
    for r in people:
        for key, outcome in outcomes[r].items():
            units[key].append(outcome)
    pairable = [u for u in units.values() if len(u) >= 2]
    return {"raters": people, "items": len(pairable), "alpha": stats.krippendorff_alpha_interval(pairable)}


def _live_labels(conn) -> dict[str, tuple[np.ndarray, list]]:
    """checkpoint -> ([conversations, 3] label counts (fail, pass, excellent), its labelled turns)."""
    rows = conn.execute("SELECT c.checkpoint, c.id AS conversation, t.turn, t.label FROM turns t "
                        "JOIN conversations c ON c.id = t.conversation WHERE t.label IS NOT NULL").fetchall()
    out = {}
    for checkpoint in sorted({r["checkpoint"] for r in rows}):
        mine = [r for r in rows if r["checkpoint"] == checkpoint]
        per_conversation = defaultdict(lambda: np.zeros(len(LABELS)))
        for r in mine:
            per_conversation[r["conversation"]][list(LABELS).index(r["label"])] += 1
        out[checkpoint] = (np.array(list(per_conversation.values())), mine)
    return out


def live_label_differences(conn, replicates: int, seed: int) -> list[dict]:
    """For every two checkpoints: the difference of each label's share (first minus second),
    with a 95% interval from resampling each checkpoint's conversations independently."""
    labels = _live_labels(conn)
    out = []
    for first, second in combinations(sorted(labels), 2):
        x, y = labels[first][0], labels[second][0]
        sums_x, sums_y = stats.bootstrap_sums(x, replicates, seed), stats.bootstrap_sums(y, replicates, seed + 1)
        row = {"checkpoints": [first, second]}
        for k, label in enumerate(LABELS):
            with np.errstate(invalid="ignore", divide="ignore"):
                replicate_diffs = sums_x[:, k] / sums_x.sum(axis=1) - sums_y[:, k] / sums_y.sum(axis=1)
            row[label] = {"difference": float(x[:, k].sum() / x.sum() - y[:, k].sum() / y.sum()),
                          "interval": _interval(stats.percentile_interval(replicate_diffs))}
        out.append(row)
    return out


def live_label_stats(conn, replicates: int, seed: int) -> list[dict]:
    """The Fail / Pass / Excellent shares of each checkpoint's labelled replies (LIMA section 6),
    with bootstrap intervals over conversations (a conversation's turns are resampled together),
    and the counts per turn index."""
    out = []
    for checkpoint, (matrix, mine) in _live_labels(conn).items():
        by_turn = defaultdict(lambda: dict.fromkeys(LABELS, 0))
        for r in mine:
            by_turn[r["turn"]][r["label"]] += 1
        shares = stats.fractions_with_intervals(matrix, replicates, seed)
        out.append({"checkpoint": checkpoint, "conversations": len(matrix), "labelled": len(mine),
                    "counts": {label: sum(r["label"] == label for r in mine) for label in LABELS},
                    **{label: {"share": share, "interval": _interval(ci)}
                       for label, (share, ci) in zip(LABELS, shares)},
                    "by_turn": [{"turn": turn, **counts} for turn, counts in sorted(by_turn.items())]})
    return out


def write_report(db: str | Path, out: str | Path, replicates: int = 2000, seed: int = 0) -> dict:
    """Read the database, write the figure, page and numbers into `out`; returns the numbers."""
    conn = store.connect(db, create=False)
    comparisons = load_items(conn)
    results = [{"system_a": a, "system_b": b, "rater": rater, **comparison_stats(items, replicates, seed)}
               for (a, b, rater), items in sorted(comparisons.items())]
    numbers = {"comparisons": results, "likert": likert_stats(conn, replicates, seed),
               "agreement": agreement_stats(comparisons, replicates, seed), "people_alpha": people_alpha(comparisons),
               "live": live_label_stats(conn, replicates, seed),
               "live_differences": live_label_differences(conn, replicates, seed),
               "bootstrap": {"replicates": replicates, "seed": seed, "level": 0.95}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_figure(win_tie_loss_figure(results), out / "win_tie_loss.png")
    png = (out / "win_tie_loss.png").read_bytes()
    write_bytes(out / "report.html", render_page(numbers, comparisons, png, str(db)).encode())
    write_json(out / "report.json", numbers)
    return numbers
