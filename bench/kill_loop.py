"""Crash safety under `kill -9`: a run killed at random moments, resumed each time, must leave
only loadable states and exports, no temporaries after its last resume, and end with the
weights of an uninterrupted run.

    python bench/kill_loop.py [--kills 20] [--seed 0] [--out /tmp/kill-loop]

Each round starts `python -m lima_core.train ... --resume auto` and sends SIGKILL: in even
rounds after a random time, in odd rounds the moment a temporary (`.tmp-*`) appears after a
random time, i.e. in the middle of an export or a state write (both happen every epoch or step
here). Each kill notes whether a write was under way. Then the run is resumed to its end, and
everything on disk is checked.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lima_core.checkpoint.atomic import TEMP_PREFIX  # noqa: E402 (needs the sys.path insert above)
from lima_core.checkpoint.hf import load_pretrained  # noqa: E402 (needs the sys.path insert above)
from lima_core.checkpoint.state import complete_states, unreadable  # noqa: E402 (needs the sys.path insert above)

EPOCHS = 80  # long enough (~3 minutes on 2 cores) for every kill to land before the end


def train_cmd(out: Path, name: str, data: Path) -> list[str]:
    return [sys.executable, "-m", "lima_core.train", "--data", str(data), "--dev-data", "", "--out-dir", str(out),
            "--name", name, "--epochs", str(EPOCHS), "--batch-size", "4", "--max-len", "256", "--lr", "1e-3",
            "--save-every", "1", "--export-epochs", "all", "--plot", "false", "--resume", "auto"]


def temporaries(run: Path) -> list[Path]:
    return [p for p in run.rglob(f"{TEMP_PREFIX}*")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/kill-loop"))
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    data = a.out / "train.jsonl"
    data.write_text("".join(line + "\n"
                            for line in (ROOT / "lima_core/assets/train.jsonl").read_text().splitlines()[:12]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = a.out / "runs" / "killed"
    for name in ("killed", "whole"):
        subprocess.run(["rm", "-rf", str(a.out / "runs" / name)], check=True)

    during_write, kills = 0, 0
    while kills < a.kills:
        proc = subprocess.Popen(train_cmd(a.out / "runs", "killed", data), cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(2.0, 7.0))  # the interpreter and torch take ~2 s to start
        if kills % 2:  # aim at a write: poll for a temporary for up to 5 s
            deadline = time.monotonic() + 5
            while not temporaries(run) and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.002)
        if proc.poll() is not None:
            if proc.returncode != 0:
                sys.exit(f"round {kills}: the run failed:\n{proc.stderr.read().decode()[-3000:]}")
            break  # finished before the kill: the run is complete
        writing = bool(temporaries(run))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        during_write += writing
        print(f"kill {kills:2d}: {'during a write' if writing else 'between writes'}; "
              f"{len(complete_states(run / 'state'))} complete states, {len(list(run.glob('epoch-*')))} exports")
    final = subprocess.run(train_cmd(a.out / "runs", "killed", data), cwd=ROOT, env=env, capture_output=True, text=True)
    if final.returncode != 0:
        sys.exit(f"the final resume failed:\n{final.stderr[-3000:]}")
    whole = subprocess.run(train_cmd(a.out / "runs", "whole", data), cwd=ROOT, env=env, capture_output=True, text=True)
    if whole.returncode != 0:
        sys.exit(f"the uninterrupted run failed:\n{whole.stderr[-3000:]}")

    states = complete_states(run / "state")
    bad_states = [(s, why) for s in states if (why := unreadable(s))]
    exports = sorted(run.glob("epoch-*"))
    bad_exports = []
    for export in exports:
        try:
            model = load_pretrained(export)
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                bad_exports.append((export, "non-finite weights"))
        except Exception as e:  # any failure to load is what this counts
            bad_exports.append((export, f"{type(e).__name__}: {e}"))
    left = temporaries(run)
    last = f"epoch-{EPOCHS}/model.safetensors"
    a_, b_ = load_file(run / last), load_file(a.out / "runs" / "whole" / last)
    identical = a_.keys() == b_.keys() and all(torch.equal(a_[k], b_[k]) for k in a_)
    print(f"{kills} kills ({during_write} during a write, {kills - during_write} between writes)")
    print(f"states found: {len(states)}, unreadable: {len(bad_states)} {bad_states}")
    print(f"exports found: {len(exports)}, not loadable: {len(bad_exports)} {bad_exports}")
    print(f"temporaries left after the final resume: {len(left)} {left}")
    print(f"final export equal to an uninterrupted run's, bit for bit: {identical}")
    sys.exit(0 if not (bad_states or bad_exports or left) and identical else 1)


if __name__ == "__main__":
    main()
