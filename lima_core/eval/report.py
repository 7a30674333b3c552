"""What the judgments say: win / tie / loss of each system under test against each baseline, per
rater, with 95% intervals from a bootstrap over prompts; the judge's position consistency,
position bias and length bias; Likert means; agreement between raters.

An item is one (system_a, system_b, rater, prompt, sample). Its outcome, from system_a's side:
the verdict of every order the rater judged when they agree ("A" a win, "B" a loss, "tie"),
a tie when they disagree (the judge's preference followed the position, not the response), and
"unparsed" when any order's reply was unparsed: unparsed items are counted and shown apart,
never as ties, and the win / tie / loss shares are over the parsed items.

Writes into --out: win_tie_loss.png (LIMA Figure 1's stacked bars), report.html (one
self-contained page: the figure inlined, the tables, and every prompt with both responses and
each verdict) and report.json (every number); prints the table.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np

from lima_core.checkpoint.atomic import save_figure, write_bytes, write_json
from lima_core.eval import stats, store

OUTCOME_OF = {"A": "win", "B": "loss", "tie": "tie"}
COLORS = {"win": "#3a8f3a", "tie": "#b8b8b8", "loss": "#c0392b"}


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
    return OUTCOME_OF[verdicts[0]] if len(set(verdicts)) == 1 else "tie"


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
    from lima_core.eval.live_chat import LABELS

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
    from lima_core.eval.live_chat import LABELS

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
    from lima_core.eval.live_chat import LABELS

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


def live_label_lines(live: list[dict], differences: list[dict] = ()) -> list[str]:
    lines = []
    for r in live:
        shares = ", ".join(f"{label} {r['counts'][label]} ({_pct(r[label]['share'], r[label]['interval'])})"
                           for label in ("fail", "pass", "excellent"))
        lines.append(f"live {r['checkpoint']}: {r['labelled']} replies in {r['conversations']} conversations: {shares}")
        for t in r["by_turn"]:
            lines.append(f"  turn {t['turn'] + 1}: fail {t['fail']}, pass {t['pass']}, excellent {t['excellent']}")
    for d in differences:
        diffs = ", ".join(f"{label} {100 * d[label]['difference']:+.1f}"
                          + (f" [{100 * d[label]['interval'][0]:+.1f}, {100 * d[label]['interval'][1]:+.1f}]"
                             if d[label]["interval"] else "") for label in ("fail", "pass", "excellent"))
        lines.append(f"live {d['checkpoints'][0]} minus {d['checkpoints'][1]} (share points): {diffs}")
    return lines


# ---- output ---------------------------------------------------------------------------------

def _pct(share, interval=None) -> str:
    if share is None or share != share:  # None or NaN
        return "-"
    text = f"{100 * share:.1f}%"
    return text + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def table_rows(results: list[dict]) -> list[list[str]]:
    header = ["system A", "vs system B", "rater", "items", "win [95% CI]", "tie [95% CI]", "loss [95% CI]",
              "unparsed", "consistency"]
    rows = [header]
    for r in results:
        consistency = r.get("position_consistency")
        rows.append([r["system_a"], r["system_b"], r["rater"], str(r["items"]),
                     *(_pct(r[o]["share"], r[o]["interval"]) for o in ("win", "tie", "loss")),
                     str(r["counts"]["unparsed"]),
                     f"{consistency['agree']}/{consistency['of']} ({_pct(consistency['share'])})" if consistency
                     else "-"])
    return rows


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def win_tie_loss_figure(results: list[dict]):
    """LIMA Figure 1: a stacked horizontal bar per comparison (win, tie, loss of system A), with
    the 95% intervals of the win share (at the win/tie boundary, upper half of the bar) and of
    the loss share (at the tie/loss boundary, lower half)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend to choose

    fig = Figure(figsize=(8, 1.2 + 0.7 * max(len(results), 1)))
    ax = fig.subplots()
    labels = [f"{r['system_a']} vs {r['system_b']}\n(rater: {r['rater']}, n={r['items'] - r['counts']['unparsed']})"
              for r in results]
    for y, r in enumerate(results):
        left = 0.0
        for outcome in ("win", "tie", "loss"):
            share = r[outcome]["share"] or 0.0
            ax.barh(y, share, left=left, color=COLORS[outcome], edgecolor="white",
                    label=outcome if y == 0 else None)
            if share >= 0.06:
                ax.text(left + share / 2, y, f"{100 * share:.0f}%", ha="center", va="center", fontsize=9)
            left += share
        # The intervals above and below the middle of the bar, clear of the percentages and of each other.
        win, loss = r["win"], r["loss"]
        if win["interval"]:
            ax.errorbar(win["share"], y - 0.22, xerr=[[win["share"] - win["interval"][0]],
                                                      [win["interval"][1] - win["share"]]],
                        fmt="none", ecolor="black", capsize=3, lw=1)
        if loss["interval"]:
            boundary = 1 - loss["share"]
            ax.errorbar(boundary, y + 0.22, xerr=[[loss["interval"][1] - loss["share"]],
                                                  [loss["share"] - loss["interval"][0]]],
                        fmt="none", ecolor="black", capsize=3, lw=1)
    ax.set_yticks(range(len(results)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of parsed items (95% bootstrap intervals over prompts)")
    if results:
        ax.legend(ncols=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    else:
        ax.text(0.5, 0.5, "no pairwise judgments in this database", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f2f2f2; } pre { white-space: pre-wrap; background: #f8f8f8; padding: 8px; margin: 4px 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.item { border-top: 2px solid #ddd; margin-top: 1.5em; }
.win { color: #3a8f3a; } .loss { color: #c0392b; } .unparsed { color: #a05a00; font-weight: bold; }
"""


def _html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _question_html(prompt: dict) -> str:
    parts = [] if prompt.get("system") is None else [f"<b>system</b><pre>{html.escape(prompt['system'])}</pre>"]
    for i, turn in enumerate(prompt["turns"]):
        parts.append(f"<b>{('user', 'assistant')[i % 2]}</b><pre>{html.escape(turn)}</pre>")
    return "".join(parts)


def items_html(comparisons: dict[tuple, list[Item]]) -> str:
    """Every prompt of every pair of systems: the prompt, both responses, every rater's verdicts."""
    by_pair = defaultdict(lambda: defaultdict(list))
    for (a, b, _), items in sorted(comparisons.items()):
        for item in items:
            by_pair[a, b][item.prompt_id, item.sample].append(item)
    parts = []
    for (a, b), groups in by_pair.items():
        parts.append(f"<h3>{html.escape(a)} (A) vs {html.escape(b)} (B)</h3>")
        for (prompt_id, sample), items in sorted(groups.items()):
            first = items[0]
            verdicts = []
            for item in items:
                for row in item.rows:
                    shown = "A's response first" if row["order_shown"] == "AB" else "B's response first"
                    css = OUTCOME_OF.get(row["verdict"], "unparsed")
                    verdicts.append(
                        f"<li>{html.escape(item.rater)} ({html.escape(row['rater_kind'])}), {shown}: "
                        f"<span class='{css}'>{html.escape(row['verdict'])}</span> <details><summary>reply "
                        f"({row['attempts']} attempt(s))</summary><pre>{html.escape(row['raw_reply'])}</pre>"
                        "</details></li>")
                verdicts.append(f"<li><b>{html.escape(item.rater)}: {html.escape(item.outcome)}</b> for A</li>")
            parts.append(
                f"<div class='item'><p>prompt {html.escape(prompt_id)}, sample {sample}</p>"
                f"{_question_html(first.prompt)}"
                f"<div class='pair'><div><b>A: {html.escape(a)}</b><pre>{html.escape(first.response_a)}</pre></div>"
                f"<div><b>B: {html.escape(b)}</b><pre>{html.escape(first.response_b)}</pre></div></div>"
                f"<ul>{''.join(verdicts)}</ul></div>")
    return "".join(parts)


def bias_rows(results: list[dict]) -> list[list[str]]:
    rows = [["system A", "vs system B", "rater", "first shown wins / decided", "ties", "longer wins / decided",
             "mean chars A", "mean chars B"]]
    for r in results:
        p, n = r["position_bias"], r["length_bias"]
        rows.append([r["system_a"], r["system_b"], r["rater"],
                     f"{p['first_wins']}/{p['first_wins'] + p['second_wins']} ({_pct(p['first_wins_of_decided'])})",
                     str(p["ties"]), f"{n['longer_wins']}/{n['judgments']} ({_pct(n['longer_wins_share'])})",
                     f"{n['mean_chars_a']:.0f}" if n["mean_chars_a"] is not None else "-",
                     f"{n['mean_chars_b']:.0f}" if n["mean_chars_b"] is not None else "-"])
    return rows


def alpha_line(alpha: dict | None) -> str:
    if alpha is None:
        return "Krippendorff's alpha across people: - (fewer than two people)"
    value = "-" if alpha["alpha"] is None else f"{alpha['alpha']:.3f}"
    return (f"Krippendorff's alpha (interval, loss < tie < win) across {len(alpha['raters'])} people "
            f"({', '.join(alpha['raters'])}): {value} on {alpha['items']} items judged by two or more")


def report_html(results, likert, agreement, comparisons, png: bytes, db: str, alpha: dict | None = None,
                live: list[dict] = (), live_differences: list[dict] = ()) -> str:
    image = base64.b64encode(png).decode()
    live_html = (f"<pre>{html.escape(chr(10).join(live_label_lines(live, live_differences)))}</pre>" if live
                 else "<p>No labelled conversations.</p>")
    likert_rows = [["system", "rater", "graded", "unparsed", "mean grade (1-6) [95% CI]"]] + [
        [r["system"], r["rater"], str(r["graded"]), str(r["unparsed"]),
         "-" if r["mean"] is None else f"{r['mean']:.2f}" + (f" [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]"
                                                           if r["interval"] else "")] for r in likert]
    agreement_rows = [["raters", "kinds", "shared items", "tie-discounted accuracy [95% CI]", "weighted kappa"]] + [
        [" / ".join(r["raters"]), " / ".join(r["kinds"]), str(r["items"]),
         _pct(r["tie_discounted_accuracy"], r["interval"]),
         "-" if r["weighted_kappa"] is None else f"{r['weighted_kappa']:.3f}"] for r in agreement]
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lima-core evaluation</title><style>{CSS}</style></head><body>
<h1>Evaluation: {html.escape(db)}</h1>
<p>Win / tie / loss of system A against system B. An item is one prompt (and sample) judged by one rater in both
orders; orders that disagree count as a tie; an item with an unparsed reply is counted apart, never as a tie.
Intervals: 95% percentile bootstrap over prompts.</p>
<img alt="win / tie / loss" src="data:image/png;base64,{image}">
{_html_table(table_rows(results))}
<h2>Judge behaviour</h2>
<p>Position consistency: the share of items judged in both orders (both parsed) whose two verdicts agree.
Position bias: how often the response shown first wins. Length bias: how often the longer response wins.</p>
{_html_table(bias_rows(results))}
<h2>Helpfulness (Likert, 1-6)</h2>
{_html_table(likert_rows) if likert else "<p>No grades in this database.</p>"}
<h2>Agreement between raters</h2>
<p>On items both raters judged: 1 when they agree, 0.5 when exactly one says tie, 0 otherwise (LIMA's
tie-discounted accuracy), and Cohen's kappa with linear weights over loss &lt; tie &lt; win.</p>
{_html_table(agreement_rows) if agreement else "<p>No two raters share an item.</p>"}
<p>{html.escape(alpha_line(alpha))}. The majority of people: the outcome more than half of the people who judged an
item gave (items without one left out).</p>
<h2>Live conversations (Fail / Pass / Excellent)</h2>
{live_html}
<h2>Every prompt</h2>
<p>Each verdict names the better system (A, B, tie or unparsed) whichever order the responses were shown in;
the reply itself names the positions the rater saw.</p>
{items_html(comparisons)}
</body></html>
"""


def write_report(db: str | Path, out: str | Path, replicates: int = 2000, seed: int = 0) -> dict:
    """Read the database, write the figure, page and numbers into `out`; returns the numbers."""
    conn = store.connect(db, create=False)
    comparisons = load_items(conn)
    results = [{"system_a": a, "system_b": b, "rater": rater, **comparison_stats(items, replicates, seed)}
               for (a, b, rater), items in sorted(comparisons.items())]
    likert = likert_stats(conn, replicates, seed)
    agreement = agreement_stats(comparisons, replicates, seed)
    alpha = people_alpha(comparisons)
    live = live_label_stats(conn, replicates, seed)
    live_differences = live_label_differences(conn, replicates, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    fig = win_tie_loss_figure(results)
    save_figure(fig, out / "win_tie_loss.png")
    png = (out / "win_tie_loss.png").read_bytes()
    page = report_html(results, likert, agreement, comparisons, png, str(db), alpha, live, live_differences)
    write_bytes(out / "report.html", page.encode())
    numbers = {"comparisons": results, "likert": likert, "agreement": agreement,
               "people_alpha": alpha, "live": live, "live_differences": live_differences,
               "bootstrap": {"replicates": replicates, "seed": seed, "level": 0.95}}
    write_json(out / "report.json", numbers)
    return numbers
