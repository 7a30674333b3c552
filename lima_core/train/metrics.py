"""What a run logs: one JSON object a step in metrics.jsonl (and TensorBoard scalars when
asked) and a progress bar with a line per epoch, written by rank 0 only, and the loss curve at
the end.

`MetricsLogger` is a context manager, so the file is closed on every exit, a diverged run's
included. On the other ranks it is a no-op, which keeps `if rank == 0:` out of the loop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from lima_core.checkpoint.atomic import save_figure


class MetricsLogger:
    """`with MetricsLogger(run_dir, enabled=rank == 0, history=...) as log: log.step(record)`.

    `history` (the records of a resumed run) is written first, so metrics.jsonl always holds
    every step of the run once. With `total_steps`, a progress bar named `name` on stderr shows
    each step's loss, learning rate and throughput, and each epoch's end prints a line."""

    def __init__(self, run_dir: Path, *, enabled: bool, history: list[dict] = (), tensorboard: bool = False,
                 name: str = "", total_steps: int | None = None):
        self.run_dir, self.enabled, self.history, self.tensorboard = Path(run_dir), enabled, list(history), tensorboard
        self.name, self.total_steps = name, total_steps
        self._file = self._writer = self._bar = self._last = None

    def __enter__(self) -> "MetricsLogger":
        if self.enabled:
            self._file = open(self.run_dir / "metrics.jsonl", "w")
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            for record in self.history:
                self._write(record, flush=False)
            self._file.flush()
            if self.total_steps is not None:
                self._bar = tqdm(total=self.total_steps, initial=len(self.history), desc=self.name, unit="step",
                                 dynamic_ncols=True, file=sys.stderr)
        return self

    def step(self, record: dict) -> None:
        if self.enabled:
            self._write(record, flush=True)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                  tok_s=f"{record['tokens_per_s']:.0f}")
            self._bar.update()

    def _write(self, record: dict, flush: bool) -> None:
        self._last = record
        self._file.write(json.dumps(record) + "\n")
        if flush:
            self._file.flush()
        if self._writer is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self._writer.add_scalar(f"train/{key}", record[key], record["step"])

    def epoch(self, record: dict) -> None:
        if self._writer is not None and record.get("dev_loss") is not None:
            self._writer.add_scalar("dev/loss", record["dev_loss"], record["epoch"])
        if self._bar is not None:  # tqdm.write: stdout, above the bar
            self._bar.write(f"epoch {record['epoch']}: train loss {self._last['loss']:.4f}, "
                            f"dev loss {record['dev_loss']}")

    def __exit__(self, *exc) -> bool:
        if self._bar is not None:  # its line ended, also on a stop
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
        return False


def plot_losses(history: list[dict], epochs: list[dict], path: Path) -> None:
    """Train loss per step and dev loss per epoch, as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global backend to choose

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
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
    save_figure(fig, path)
