"""The report as one self-contained HTML page: the figure inlined as a data: URL, the tables
(report_text's rows), and every prompt with both responses and each verdict. Nothing is fetched
and every text from the database is HTML-escaped, so the page is safe to open and to mail.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from typing import TYPE_CHECKING

from lima_core.eval.report_text import agreement_rows, alpha_line, bias_rows, likert_rows, live_label_lines, table_rows
from lima_core.eval.stats import OUTCOME_OF
from lima_core.eval.web import pre, prompt_html

if TYPE_CHECKING:
    from lima_core.eval.report import Item

CSS = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f2f2f2; } pre { white-space: pre-wrap; background: #f8f8f8; padding: 8px; margin: 4px 0; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.item { border-top: 2px solid #ddd; margin-top: 1.5em; }
.win { color: #3a8f3a; } .loss { color: #c0392b; } .unparsed { color: #a05a00; font-weight: bold; }
"""

# The report's <pre>s open without the newline the served pages add (web.pre): a text's own
# leading newline is dropped here, as in every report written so far.
RAW = {"keep_leading_newline": False}


def html_table(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _verdicts_html(item: Item) -> str:
    """One rater's verdict of each order shown, with its reply, then the item's outcome."""
    parts = []
    for row in item.rows:
        shown = "A's response first" if row["order_shown"] == "AB" else "B's response first"
        css = OUTCOME_OF.get(row["verdict"], "unparsed")
        parts.append(f"<li>{html.escape(item.rater)} ({html.escape(row['rater_kind'])}), {shown}: "
                     f"<span class='{css}'>{html.escape(row['verdict'])}</span> <details><summary>reply "
                     f"({row['attempts']} attempt(s))</summary>{pre(row['raw_reply'], **RAW)}</details></li>")
    parts.append(f"<li><b>{html.escape(item.rater)}: {html.escape(item.outcome)}</b> for A</li>")
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
            parts.append(
                f"<div class='item'><p>prompt {html.escape(prompt_id)}, sample {sample}</p>"
                f"{prompt_html(first.prompt, **RAW)}"
                f"<div class='pair'><div><b>A: {html.escape(a)}</b>{pre(first.response_a, **RAW)}</div>"
                f"<div><b>B: {html.escape(b)}</b>{pre(first.response_b, **RAW)}</div></div>"
                f"<ul>{''.join(_verdicts_html(item) for item in items)}</ul></div>")
    return "".join(parts)


def render_page(numbers: dict, comparisons: dict[tuple, list[Item]], png: bytes, db: str) -> str:
    """The page of write_report's `numbers`, its `comparisons` (every item) and the figure."""
    image = base64.b64encode(png).decode()
    results, likert, agreement, alpha = (numbers[k] for k in ("comparisons", "likert", "agreement", "people_alpha"))
    live = numbers["live"]
    live_html = (f"<pre>{html.escape(chr(10).join(live_label_lines(live, numbers['live_differences'])))}</pre>"
                 if live else "<p>No labelled conversations.</p>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>lima-core evaluation</title><style>{CSS}</style></head><body>
<h1>Evaluation: {html.escape(db)}</h1>
<p>Win / tie / loss of system A against system B. An item is one prompt (and sample) judged by one rater in both
orders; orders that disagree count as a tie; an item with an unparsed reply is counted apart, never as a tie.
Intervals: 95% percentile bootstrap over prompts.</p>
<img alt="win / tie / loss" src="data:image/png;base64,{image}">
{html_table(table_rows(results))}
<h2>Judge behaviour</h2>
<p>Position consistency: the share of items judged in both orders (both parsed) whose two verdicts agree.
Position bias: how often the response shown first wins. Length bias: how often the longer response wins.</p>
{html_table(bias_rows(results))}
<h2>Helpfulness (Likert, 1-6)</h2>
{html_table(likert_rows(likert)) if likert else "<p>No grades in this database.</p>"}
<h2>Agreement between raters</h2>
<p>On items both raters judged: 1 when they agree, 0.5 when exactly one says tie, 0 otherwise (LIMA's
tie-discounted accuracy), and Cohen's kappa with linear weights over loss &lt; tie &lt; win.</p>
{html_table(agreement_rows(agreement)) if agreement else "<p>No two raters share an item.</p>"}
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
