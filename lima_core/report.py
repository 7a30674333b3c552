"""What a run leaves for people: the chosen epoch and why, the loss curve, JSON written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, value) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def choose_epoch(epochs: list[dict], window: tuple[int, int]) -> tuple[dict, str]:
    """The default rule: lowest dev loss among the epochs of the window.

    LIMA chose among epochs 5-10 by reading dev generations, since perplexity did not track
    quality; the generations of every epoch in the window are saved beside the summary so a
    person (or a pairwise judge) can overrule this choice."""
    first, last = window
    candidates = [e for e in epochs if first <= e["epoch"] <= last]
    if all(e["dev_loss"] is None for e in candidates):
        chosen = candidates[-1]
        return chosen, f"no dev set: the last epoch of the window {first}-{last}"
    chosen = min((e for e in candidates if e["dev_loss"] is not None), key=lambda e: e["dev_loss"])
    return chosen, (f"lowest dev loss ({chosen['dev_loss']:.4f}) among epochs {first}-{last}; "
                    "read the saved dev generations to overrule, as LIMA did")


def plot_losses(history: list[dict], epochs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss (per step)")
    steps_per_epoch = len(history) / max(len(epochs), 1)
    dev = [(e["epoch"] * steps_per_epoch - 1, e["dev_loss"]) for e in epochs if e["dev_loss"] is not None]
    if dev:
        ax.plot(*zip(*dev), "o-", label="dev loss (end of epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
