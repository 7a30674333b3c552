"""Every file lima-core writes lands through here: written under a temporary name beside its
final path, then renamed into place, so a crash never leaves a half-written file or folder.

Temporary names all start with TEMP_PREFIX (`.tmp-`), e.g. `runs/lima/.tmp-epoch-3`, so
`remove_stale_temps` can find and delete what a killed process left behind (a full model copy
per crashed export) when the next run or resume starts in the same folder. The name carries
no process id: the ranks of one collective write (the train state) agree on it, and a run
folder belongs to one run at a time.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

TEMP_PREFIX = ".tmp-"


def temp_path(final: str | Path) -> Path:
    """The temporary name of `final`, in the same folder (a rename never crosses filesystems)."""
    final = Path(final)
    return final.with_name(f"{TEMP_PREFIX}{final.name}")


def commit_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in place of `final` (replacing an older one)."""
    old = temp_path(final.with_name(final.name + ".old"))
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def fresh_temp_dir(final: str | Path) -> Path:
    """The temporary folder of `final`, created empty (what a crashed writer left there goes first)."""
    tmp = temp_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


@contextmanager
def atomic_dir(final: str | Path):
    """`with atomic_dir(path) as tmp:` fill tmp; on success it replaces path, on error it is removed.
    One process; checkpoint.sharded.collective_dir is the same for every rank of a group."""
    final = Path(final)
    tmp = fresh_temp_dir(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, final)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.write_bytes(data)
    tmp.replace(path)


def write_json(path: str | Path, value) -> None:
    write_bytes(path, (json.dumps(value, indent=2) + "\n").encode())


def save_figure(fig, path: str | Path, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG, written atomically."""
    path = Path(path)
    tmp = temp_path(path)
    fig.savefig(tmp, dpi=dpi, format="png")
    tmp.replace(path)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders a crashed writer left under `folder`; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = sorted(p for p in folder.rglob(f"{TEMP_PREFIX}*") if p.name.startswith(TEMP_PREFIX))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    return stale
