"""A run folder belongs to one run: a lock, no silent start over an earlier run's outputs, and a
fingerprint of what a saved position depends on, checked on resume.

Checked before the trainer writes anything (`claim`, a collective: rank 0 decides, every rank
learns the verdict). A second run on the same folder finds the lock held and stops; a fresh run
into a folder that holds an earlier run's states or exports stops unless `--overwrite` (which
deletes lima-core's outputs there, nothing else) or `--resume`. Each train state records the
fingerprint (`fingerprint`); resuming from one saved with other data, tokenizer, model, batch
size, length, epochs or seed stops with every difference named, unless `--force-resume`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from lima_core.checkpoint.state import complete_states, unreadable

LOCK = ".lock"
OUTPUTS = ("state", "epoch-*", "generations-epoch-*.json", "metrics.jsonl", "summary.json", "loss.png",
           "tensorboard", "config.json")
"""What lima-core writes in a run folder (--overwrite deletes these, and only these)."""


class RunFolderError(ValueError):
    """The run folder is taken, or holds another run; the message says which and what to do."""


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (a folder: of its config.json, which names the model)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def earlier_outputs(out: Path) -> list[str]:
    """The names in `out` that an earlier run wrote: its states (complete ones), exports, metrics."""
    if not out.is_dir():
        return []
    found = [p.name for pattern in OUTPUTS if pattern not in ("state", "config.json") for p in out.glob(pattern)]
    if complete_states(out / "state"):
        found.append("state")
    return sorted(found)


def claim(out: Path, resume: str, overwrite: bool, rank: int = 0, group=None) -> FileLock | None:
    """Take the run folder for this run (collective; rank 0 holds the lock and returns it).
    Raises RunFolderError on every rank when it is taken or holds another run's outputs."""
    lock, problem = None, ""
    if rank == 0:
        try:
            lock = _lock(out)
            _check_outputs(out, resume, overwrite)
        except RunFolderError as e:
            problem = str(e)
            if lock is not None:
                lock.release()
            lock = None
    if group is not None:  # everyone stops, or no one
        verdict = [problem]
        torch.distributed.broadcast_object_list(verdict, src=0, group=group)
        problem = verdict[0]
    if problem:
        raise RunFolderError(problem)
    return lock


def _lock(out: Path) -> FileLock:
    path = out / LOCK
    if not path.exists():
        if out.exists() and not out.is_dir():
            raise RunFolderError(f"--out-dir/--name: {out} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)  # the only write before the lock is held
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunFolderError(f"{out} is in use by another run (it holds {path}); give this run another --name "
                             "or wait for that one to end") from None
    return lock


def _check_outputs(out: Path, resume: str, overwrite: bool):
    found = earlier_outputs(out)
    if not found or resume:
        return
    if not overwrite:
        raise RunFolderError(f"{out} holds an earlier run ({', '.join(found)}): continue it with --resume auto, "
                             "start it afresh with --overwrite true (deleting those), or choose another --name")
    for pattern in OUTPUTS:
        for path in out.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"lima-core: --overwrite: deleted the earlier run's {', '.join(found)} in {out}", file=sys.stderr)


def fingerprint(data: str, dev_data: str, tokenizer_path: Path, model: str, batch_size: int, max_len: int,
                epochs: int, seed: int) -> dict:
    """What a saved position in a run means something only with: the data (file digests), the
    tokenizer, the model, and the settings the batches and the schedule are derived from."""
    return {"data": file_digest(data), "dev_data": file_digest(dev_data) if dev_data else "",
            "tokenizer": file_digest(tokenizer_path),
            "model": model if not Path(model).is_dir() else file_digest(model),
            "batch_size": batch_size, "max_len": max_len, "epochs": epochs, "seed": seed}


def check_fingerprint(state: Path, now: dict, force: bool):
    """Refuse to resume from `state` when it was saved for another run (every difference named)."""
    saved = json.loads((state / "state.json").read_text()).get("fingerprint", {})
    differences = [f"{key} {saved.get(key)!r} then, {value!r} now" for key, value in now.items()
                   if saved.get(key) != value]
    if not differences:
        return
    message = f"--resume {state}: the state was saved for another run: {'; '.join(differences)}"
    if not force:
        raise RunFolderError(message + " (--force-resume true continues anyway, at the saved step)")
    print(f"lima-core: warning: {message}; continuing because of --force-resume", file=sys.stderr)


def choose_state(out: Path, resume: str, force: bool, now: dict, say=print) -> Path | None:
    """The state --resume names, checked against this run's fingerprint `now`; None: start fresh.
    auto: the newest complete state that can be read (past an unreadable one, with a warning)."""
    if not resume:
        return None
    candidates = complete_states(out / "state") if resume == "auto" else [Path(resume)]
    for path in candidates:
        problem = unreadable(path)
        if problem is None:
            check_fingerprint(path, now, force)
            return path
        if resume != "auto":
            raise RunFolderError(f"--resume {path}: not a readable train state ({problem})")
        say(f"warning: {path} cannot be read ({problem}); trying the state before it")
    say(f"--resume auto: no complete train state in {out / 'state'}; starting fresh")
    return None
