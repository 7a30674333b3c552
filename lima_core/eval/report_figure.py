"""LIMA's Figure 1 from the report's numbers: win / tie / loss of each comparison as stacked bars,
with the 95% bootstrap intervals the report computes. Matplotlib's object API only (no pyplot),
so drawing it chooses no global backend.
"""

from __future__ import annotations

COLORS = {"win": "#3a8f3a", "tie": "#b8b8b8", "loss": "#c0392b"}


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
