"""The report's numbers (report.py's) as text: the rows of its tables, which the command prints
and the HTML page shows, and the lines `python -m lima_core.eval report` prints.

Every function takes the plain numbers (report.json's dicts), so the text can be remade from a
saved report.json without the database.
"""

from __future__ import annotations

from lima_core.eval.web import LABELS


def percent(share, interval=None) -> str:
    """A share as "57.1%", with its interval as " [40.0, 71.4]"; "-" for none."""
    if share is None or share != share:  # None or NaN
        return "-"
    text = f"{100 * share:.1f}%"
    return text + (f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else "")


def format_table(rows: list[list[str]]) -> str:
    """Rows of cells as text columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


# ---- table rows (header first) ------------------------------------------------------------------

def table_rows(results: list[dict]) -> list[list[str]]:
    """Win / tie / loss of each comparison."""
    header = ["system A", "vs system B", "rater", "items", "win [95% CI]", "tie [95% CI]", "loss [95% CI]",
              "unparsed", "consistency"]
    rows = [header]
    for r in results:
        consistency = r.get("position_consistency")
        rows.append([r["system_a"], r["system_b"], r["rater"], str(r["items"]),
                     *(percent(r[o]["share"], r[o]["interval"]) for o in ("win", "tie", "loss")),
                     str(r["counts"]["unparsed"]),
                     f"{consistency['agree']}/{consistency['of']} ({percent(consistency['share'])})" if consistency
                     else "-"])
    return rows


def bias_rows(results: list[dict]) -> list[list[str]]:
    """Position and length bias of each comparison."""
    rows = [["system A", "vs system B", "rater", "first shown wins / decided", "ties", "longer wins / decided",
             "mean chars A", "mean chars B"]]
    for r in results:
        p, n = r["position_bias"], r["length_bias"]
        rows.append([r["system_a"], r["system_b"], r["rater"],
                     f"{p['first_wins']}/{p['first_wins'] + p['second_wins']} ({percent(p['first_wins_of_decided'])})",
                     str(p["ties"]), f"{n['longer_wins']}/{n['judgments']} ({percent(n['longer_wins_share'])})",
                     f"{n['mean_chars_a']:.0f}" if n["mean_chars_a"] is not None else "-",
                     f"{n['mean_chars_b']:.0f}" if n["mean_chars_b"] is not None else "-"])
    return rows


def likert_rows(likert: list[dict]) -> list[list[str]]:
    """The mean grade of each (system, rater)."""
    return [["system", "rater", "graded", "unparsed", "mean grade (1-6) [95% CI]"]] + [
        [r["system"], r["rater"], str(r["graded"]), str(r["unparsed"]),
         "-" if r["mean"] is None else f"{r['mean']:.2f}" + (f" [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]"
                                                           if r["interval"] else "")] for r in likert]


def agreement_rows(agreement: list[dict]) -> list[list[str]]:
    """The agreement of every two raters."""
    return [["raters", "kinds", "shared items", "tie-discounted accuracy [95% CI]", "weighted kappa"]] + [
        [" / ".join(r["raters"]), " / ".join(r["kinds"]), str(r["items"]),
         percent(r["tie_discounted_accuracy"], r["interval"]),
         "-" if r["weighted_kappa"] is None else f"{r['weighted_kappa']:.3f}"] for r in agreement]


# ---- lines ---------------------------------------------------------------------------------------

def likert_line(r: dict) -> str:
    interval = f" [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]" if r["interval"] else ""
    mean = "-" if r["mean"] is None else f"{r['mean']:.2f}{interval}"
    return f"likert {r['system']} ({r['rater']}): mean {mean} over {r['graded']} ({r['unparsed']} unparsed)"


def agreement_line(r: dict) -> str:
    kappa = "-" if r["weighted_kappa"] is None else f"{r['weighted_kappa']:.3f}"
    interval = f" [{r['interval'][0]:.3f}, {r['interval'][1]:.3f}]" if r["interval"] else ""
    return (f"agreement {' / '.join(r['raters'])} ({' / '.join(r['kinds'])}): tie-discounted accuracy "
            f"{r['tie_discounted_accuracy']:.3f}{interval} on {r['items']} items, weighted kappa {kappa}")


def alpha_line(alpha: dict | None) -> str:
    if alpha is None:
        return "Krippendorff's alpha across people: - (fewer than two people)"
    value = "-" if alpha["alpha"] is None else f"{alpha['alpha']:.3f}"
    return (f"Krippendorff's alpha (interval, loss < tie < win) across {len(alpha['raters'])} people "
            f"({', '.join(alpha['raters'])}): {value} on {alpha['items']} items judged by two or more")


def live_label_lines(live: list[dict], differences: list[dict] = ()) -> list[str]:
    """Each checkpoint's live label shares (and per turn), then every two checkpoints' differences."""
    lines = []
    for r in live:
        shares = ", ".join(f"{label} {r['counts'][label]} ({percent(r[label]['share'], r[label]['interval'])})"
                           for label in LABELS)
        lines.append(f"live {r['checkpoint']}: {r['labelled']} replies in {r['conversations']} conversations: {shares}")
        for t in r["by_turn"]:
            lines.append(f"  turn {t['turn'] + 1}: fail {t['fail']}, pass {t['pass']}, excellent {t['excellent']}")
    for d in differences:
        diffs = ", ".join(f"{label} {100 * d[label]['difference']:+.1f}"
                          + (f" [{100 * d[label]['interval'][0]:+.1f}, {100 * d[label]['interval'][1]:+.1f}]"
                             if d[label]["interval"] else "") for label in LABELS)
        lines.append(f"live {d['checkpoints'][0]} minus {d['checkpoints'][1]} (share points): {diffs}")
    return lines


def summary_lines(numbers: dict) -> list[str]:
    """What `eval report` prints of write_report's numbers: the win / tie / loss table, the
    Likert means, the agreement, the people's alpha and the live labels."""
    lines = [format_table(table_rows(numbers["comparisons"]))] if numbers["comparisons"] else []
    lines += [likert_line(r) for r in numbers["likert"]]
    lines += [agreement_line(r) for r in numbers["agreement"]]
    if numbers["people_alpha"] is not None:
        lines.append(alpha_line(numbers["people_alpha"]))
    return lines + live_label_lines(numbers["live"], numbers["live_differences"])
