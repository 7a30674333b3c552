"""Sharded train state: a run killed with SIGKILL and resumed equals an uninterrupted one (bit for
bit on the same number of ranks, within fp32 rounding on another), and a crash in the middle of
a save leaves the previous state loadable."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import ASSETS, ROOT, TORCHRUN, tiny_model
from safetensors.torch import load_file

from lima_core.checkpoint import state as state_module
from lima_core.checkpoint.state import Progress, latest_state, load_state, save_state
from lima_core.parallel.parallelize import parallelize
from lima_core.train.optim import adamw


def train_cmd(tmp_path, n, name, *extra):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        data.write_text("".join(line + "\n" for line in (ASSETS / "train.jsonl").read_text().splitlines()[:12]))
    return [TORCHRUN, "--standalone", "--nproc_per_node", str(n), "-m", "lima_core.train", "--data", str(data),
            "--dev-data", "", "--out-dir", str(tmp_path / "runs"), "--name", name, "--epochs", "3",
            "--batch-size", "4", "--max-len", "160", "--lr", "1e-3", "--save-every", "2", "--plot", "false", *extra]


def run(cmd):
    result = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def kill_after_state(cmd, state_dir: Path, step: int):
    """Start a run in its own process group and SIGKILL the whole group once step-<step> is saved."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (state_dir / f"step-{step}" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("state")
    run(train_cmd(tmp, 2, "whole"))
    return tmp, tmp / "runs" / "whole"


def test_kill_and_resume_is_bit_exact_on_the_same_ranks(uninterrupted):
    tmp, whole = uninterrupted
    kill_after_state(train_cmd(tmp, 2, "killed"), tmp / "runs" / "killed" / "state", 2)
    killed = tmp / "runs" / "killed"
    assert not (killed / "summary.json").exists()
    run(train_cmd(tmp, 2, "killed", "--resume", "auto"))
    assert losses(killed) == losses(whole)  # bit for bit: same ranks, same order of every sum
    a, b = load_file(killed / "epoch-3" / "model.safetensors"), load_file(whole / "epoch-3" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)
    print(f"\nkilled at step 2, resumed: {len(losses(whole))} losses and {len(b)} tensors bit-identical")


def resharded(tmp, whole, n, name):
    """Continue the uninterrupted 2-rank run's step-6 state (of 9 steps) on n ranks."""
    target = tmp / "runs" / name / "state"
    shutil.copytree(whole / "state" / "step-6", target / "step-6")
    run(train_cmd(tmp, n, name, "--resume", "auto"))
    ours, ref = losses(tmp / "runs" / name), losses(whole)
    loss_err = max(abs(a - b) / b for a, b in zip(ours, ref))
    a = load_file(tmp / "runs" / name / "epoch-3" / "model.safetensors")
    b = load_file(whole / "epoch-3" / "model.safetensors")
    weight_err = max(float((a[k] - b[k]).abs().max()) for k in b)
    print(f"\n2 -> {n} ranks from step 6: worst relative loss error {loss_err:.2e}, "
          f"worst weight error {weight_err:.2e}")
    assert len(ours) == len(ref)
    # Another world size sums gradients in another order: fp32 rounding, amplified a little by Adam.
    assert loss_err < 1e-5 and weight_err < 1e-5


def test_resume_on_fewer_ranks(uninterrupted):
    resharded(*uninterrupted, 1, "one")


@pytest.mark.slow
def test_resume_on_more_ranks(uninterrupted):
    resharded(*uninterrupted, 4, "four")


def one_step(model, sharded, opt):
    loss, _ = model(torch.randint(3, 101, (1, 24), generator=torch.Generator().manual_seed(7)),
                    torch.randint(3, 101, (1, 24), generator=torch.Generator().manual_seed(8)))
    loss.backward()
    opt.step()
    sharded.zero_grad()


def test_a_crash_in_the_middle_of_a_save_leaves_the_previous_state(tmp_path, monkeypatch):
    model = tiny_model()
    sharded = parallelize(model, checkpointing="none")
    opt = adamw(sharded.param_groups(0.1), 1e-3, (0.9, 0.95))
    one_step(model, sharded, opt)
    save_state(tmp_path, sharded, opt, Progress(step=1))
    saved = {u.name: u.shard.clone() for u in sharded.units}
    one_step(model, sharded, opt)

    def crash(*args, **kwargs):
        raise OSError("disk full (injected)")
    monkeypatch.setattr(state_module, "save_file", crash)
    with pytest.raises(OSError, match="injected"):
        save_state(tmp_path, sharded, opt, Progress(step=2))
    assert latest_state(tmp_path) == tmp_path / "step-1"

    fresh_model = tiny_model(seed=1)
    fresh = parallelize(fresh_model, checkpointing="none")
    fresh_opt = adamw(fresh.param_groups(0.1), 1e-3, (0.9, 0.95))
    assert load_state(latest_state(tmp_path), fresh, fresh_opt) == Progress(step=1)
    assert all(torch.equal(u.shard, saved[u.name]) for u in fresh.units)
    assert all(float(s["step"]) == 1.0 and s["exp_avg"].abs().sum() > 0 for s in fresh_opt.state.values())
