"""Sharded train state: save, find the newest complete one, resume (on any number of ranks).

    runs/<name>/state/step-<k>/
        rank-<r>.safetensors   per unit: "<unit>.param", "<unit>.exp_avg", "<unit>.exp_avg_sq",
                               rank r's fp32 slice of the unit's padded flat vector
        state.json             world size, unit sizes, optimizer step, and the trainer's Progress
                               (step, finished epochs, history, tokens) and RNG states, by rank 0

Every rank writes its file into one temporary folder (checkpoint.sharded.collective_dir), and
once every rank is done rank 0 renames the folder into place, so a folder named step-<k> is
always complete and a crash at any point leaves the previous state loadable. Loading reads, for
each unit, only the slices of the old ranks' files that overlap this rank's new range: the flat
vectors are the same logical vectors whatever the world size, only their padding differs. No
pickle: safetensors and JSON only.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lima_core.checkpoint.sharded import SAFETENSORS_METADATA, collective_dir
from lima_core.parallel.fsdp import FSDP

MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class Progress:
    """Where a run is: saved and restored whole with the train state."""

    step: int = 0
    """Optimizer steps taken (the data position: any number of ranks continues at the same batch)."""
    epochs: list[dict] = field(default_factory=list)
    """One record per finished epoch (dev loss, export, generations)."""
    history: list[dict] = field(default_factory=list)
    """One record per step (the metrics)."""
    tokens: int = 0
    """Tokens trained on so far."""

    def add_step(self, epoch: int, loss: float, lr: float, targets: int, grad_norm: float, tokens_per_s: float) -> dict:
        """Record the step just taken (numbered from 0) and count it; returns its metrics."""
        entry = {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, "tokens": self.tokens,
                 "targets": targets, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
        self.history.append(entry)
        self.step += 1
        return entry


def save_state(directory: str | Path, sharded: FSDP, optimizer, progress: Progress, keep: int = 2,
               fingerprint: dict | None = None) -> Path:
    """Write the state of `progress.step` under directory/step-<step> with the RNG states and the
    run's fingerprint (lima_core.checkpoint.run_folder; collective); returns the folder."""
    directory = Path(directory)
    final = directory / f"step-{progress.step}"
    with collective_dir(final, sharded.rank, sharded.group) as tmp:
        save_file(_rank_tensors(sharded, optimizer), tmp / f"rank-{sharded.rank}.safetensors",
                  metadata=SAFETENSORS_METADATA)
        if sharded.rank == 0:
            meta = {"step": progress.step, "world": sharded.world, "optimizer_step": _optimizer_step(optimizer),
                    "units": {u.name: u.numel for u in sharded.units}, "progress": asdict(progress),
                    "rng": rng_state(), "fingerprint": fingerprint or {}}
            (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    if sharded.rank == 0:  # only once the new state is in place: a crash before leaves the old ones
        for old in complete_states(directory)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _rank_tensors(sharded: FSDP, optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for unit in sharded.units:
        tensors[f"{unit.name}.param"] = unit.shard.detach().cpu().clone()
        for moment in MOMENTS:
            parts = [optimizer.state[p.param][moment] if p.param in optimizer.state else torch.zeros_like(p.param)
                     for p in unit.pieces]
            tensors[f"{unit.name}.{moment}"] = torch.cat([t.detach().reshape(-1) for t in parts]).cpu()
    return tensors


def _optimizer_step(optimizer) -> float:
    steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
    return steps[0] if steps else 0.0


def complete_states(directory: str | Path) -> list[Path]:
    """The complete state folders under directory (named step-<k>, with a state.json), newest
    first; anything else there (a user's `step-2-backup`) is not a state."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    states = [p for p in directory.glob("step-*") if _STATE_NAME.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(states, key=_step_of, reverse=True)


def unreadable(path: Path) -> str | None:
    """Why the state at `path` cannot be loaded (state.json or a rank file missing, not JSON,
    a header that does not parse, a tensor missing), or None when it can."""
    try:
        meta = json.loads((path / "state.json").read_text())
        for key in ("step", "world", "units", "progress", "rng"):
            if key not in meta:
                return f"state.json has no {key!r}"
        for q in range(meta["world"]):
            with safe_open(str(path / f"rank-{q}.safetensors"), framework="pt", device="cpu") as f:
                keys = set(f.keys())
            missing = [f"{u}.{kind}" for u in meta["units"] for kind in ("param", *MOMENTS)
                       if f"{u}.{kind}" not in keys]
            if missing:
                return f"rank-{q}.safetensors lacks {missing[0]}"
    except (OSError, ValueError, TypeError, SafetensorError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def latest_state(directory: str | Path) -> Path | None:
    """The newest complete state under directory, or None."""
    states = complete_states(directory)
    return states[0] if states else None


_STATE_NAME = re.compile(r"step-(\d+)")


def _step_of(path: Path) -> int:
    return int(_STATE_NAME.fullmatch(path.name).group(1))


@torch.no_grad()
def load_state(path: str | Path, sharded: FSDP, optimizer) -> Progress:
    """Fill shards and optimizer moments from a saved state, resharding as needed, and restore
    the RNG states; returns the saved Progress. Every rank reads only the slices that overlap
    its own ranges."""
    path = Path(path)
    meta_file = path / "state.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"--resume {path}: no state.json (not a complete train state)")
    meta = json.loads(meta_file.read_text())
    ours = {u.name: u.numel for u in sharded.units}
    if meta["units"] != ours:
        raise ValueError(f"--resume {path}: saved units {meta['units']} do not match this model's {ours}")
    old_world = meta["world"]
    moment_dtype = getattr(optimizer, "moment_dtype", torch.float32)  # bf16 with the native op's option
    files = [safe_open(str(path / f"rank-{q}.safetensors"), framework="pt", device="cpu") for q in range(old_world)]
    for unit in sharded.units:
        values = {kind: _read_range(files, f"{unit.name}.{kind}", *unit.local_range)
                  for kind in ("param", *MOMENTS)}
        unit.shard.copy_(values["param"])
        unit.refresh_copy()
        for piece in unit.pieces:
            a, b = piece.offset, piece.offset + piece.param.numel()
            optimizer.state[piece.param] = {
                "step": torch.tensor(float(meta["optimizer_step"]), dtype=torch.float32),
                **{m: values[m][a:b].to(piece.param.device, moment_dtype).clone() for m in MOMENTS}}
    set_rng_state(meta["rng"])
    return Progress(**meta["progress"])


def _read_range(files, key: str, lo: int, hi: int) -> torch.Tensor:
    """Elements [lo, hi) of the logical flat vector stored as equal slices across `files` (zeros
    where the old padding or the vector's end lies)."""
    out = torch.zeros(hi - lo, dtype=torch.float32)
    start = 0
    for f in files:
        part = f.get_slice(key)
        n = part.get_shape()[0]
        a, b = max(lo, start), min(hi, start + n)
        if b > a:
            out[a - lo:b - lo] = part[a - start:b - start]
        start += n
    return out


def rng_state() -> dict:
    """The torch RNG states (CPU and, when present, CUDA) as base64 strings."""
    state = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict):
    def decode(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["cpu"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])
