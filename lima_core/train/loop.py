"""Fine-tune a LLaMA the LIMA way.

    python -m lima_core.train [--config FILE.toml] [--key value ...]
    torchrun --nproc_per_node N -m lima_core.train ...

Everything is validated before anything is written: bad data or configuration prints an error
naming the file and line (or the flag) and exits with status 2, leaving no run folder. A
non-finite loss or gradient stops the run before the update, with exit status 1.

Read from the top: `main` (the command) -> `fine_tune` (one run: its input, its folder, its exit
status) -> `train` (`start`, the epochs, `finish`) -> `train_epochs` -> `step` -> `forward_backward`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from lima_core.checkpoint.atomic import remove_stale_temps, write_json
from lima_core.checkpoint.hf import load_sharded
from lima_core.checkpoint.run_folder import choose_state, claim
from lima_core.checkpoint.state import Progress, load_state, save_state
from lima_core.cli import load_config
from lima_core.config import Config, ConfigError
from lima_core.data.encode import Example
from lima_core.data.formats import DataError
from lima_core.data.packing import epoch_batches, shard_batch
from lima_core.model import dispatch
from lima_core.model.initialization import init_sharded
from lima_core.model.llama import Llama
from lima_core.parallel.distributed import Distributed, destroy_distributed, init_distributed
from lima_core.parallel.fsdp import FSDP
from lima_core.parallel.parallelize import parallelize
from lima_core.train.end_of_epoch import end_of_epoch, finish, write_byte_counts
from lima_core.train.metrics import MetricsLogger
from lima_core.train.optim import adamw, lr_at, set_lr
from lima_core.train.prepare import Run, check_environment, prepare


class Diverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


BAD_INPUT = (ConfigError, DataError, FileNotFoundError, ValueError)
"""Errors of what the user gave (exit status 2); RunFolderError and the loaders' errors are ValueErrors."""


def main(argv=None):
    """Parse and check the configuration, start the ranks, fine-tune, end the ranks. Exit status:
    2 bad input, 1 diverged or a write failed, 130 interrupted (Ctrl-C)."""
    try:
        cfg = load_config(argv)
        check_environment(cfg)
        dist = init_distributed(cfg.train.device, cfg.parallel.node_size, cfg.parallel.count_bytes)
    except ValueError as e:  # a ConfigError, or a node size that does not divide the ranks
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        status = fine_tune(cfg, dist)
    except KeyboardInterrupt:
        print("lima-core: interrupted; --resume auto continues from the last saved train state", file=sys.stderr)
        status = 130
    finally:
        destroy_distributed(dist)
    if status:
        sys.exit(status)


def fine_tune(cfg: Config, dist: Distributed) -> int:
    """prepare -> take the run folder -> train; returns the exit status. Nothing is written
    before the input is validated and the folder is this run's."""
    t = cfg.train
    try:
        run = prepare(cfg, dist)
        state = choose_state(run.out, t.resume, t.force_resume, run.fingerprint, say=run.say)
        lock = claim(run.out, t.resume, t.overwrite, dist.rank, dist.group)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run.say(f"{t.model} ({run.model.cfg.num_params() / 1e6:.1f}M parameters) on {dist.device} x {dist.world}, "
                f"{len(run.train)} training conversations, batch {run.batch_size}, {t.epochs} epochs -> {run.out}")
        if not run.dev:
            run.say("no dev set (--dev-data): no dev loss or generations; the last epoch of the selection window "
                    "is the default choice")
        train(run, state)
    except (Diverged, OSError) as e:  # OSError: a write failed (disk full...): its message names the path
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:  # the folder is free again however the run ended
        if lock is not None:
            lock.release()
    return 0


def train(run: Run, state: Path | None):
    """Start (or resume), run the epochs, and finish: the summary, and the choice printed."""
    t = run.cfg.train
    sharded, optimizer, progress = start(run, state)
    with MetricsLogger(run.out, enabled=run.dist.rank == 0, history=progress.history, tensorboard=t.tensorboard,
                       name=t.name, total_steps=run.total_steps) as log:
        train_epochs(run, sharded, optimizer, progress, log)
    write_byte_counts(run)
    finish(run, progress)


def start(run: Run, state: Path | None) -> tuple[FSDP, torch.optim.Optimizer, Progress]:
    """The sharded model (from the checkpoint, or drawn from the seed), its AdamW, and a fresh
    progress or the one restored from `state`. Rank 0 first removes what a crashed process left
    half-written in the run folder, and writes config.json."""
    cfg, o, p = run.cfg, run.cfg.optim, run.cfg.parallel
    stds = run.model.init_stds()  # read before sharding takes the parameters away
    sharded = parallelize(run.model, comm=run.dist.comm, sharding=p.sharding, checkpointing=p.checkpointing,
                          device=run.dist.device, param_dtype=cfg.param_dtype, reduce_dtype=cfg.reduce_dtype)
    if sharded.sharding != p.sharding:
        run.say(f"--sharding {p.sharding} on one node or nodes of one rank is flat sharding (no second level)")
    if run.init_from is not None:
        load_sharded(sharded, run.init_from)
    else:
        init_sharded(sharded, stds, cfg.train.seed)
    run.model.init_buffers()
    optimizer = adamw(sharded.param_groups(o.weight_decay), o.lr, (o.beta1, o.beta2), fused=o.fused_adamw,
                      moment_dtype=cfg.moment_dtype, copies=sharded.param_copies())
    if run.dist.rank == 0:
        remove_stale_temps(run.out)
        write_json(run.out / "config.json", {**cfg.model_dump(), "model": asdict(run.model.cfg),
                                             "world_size": run.dist.world, "batch_size": run.batch_size})
    if state is None:
        return sharded, optimizer, Progress()
    progress = load_state(state, sharded, optimizer)
    run.say(f"resumed from {state} (step {progress.step})")
    return sharded, optimizer, progress


def train_epochs(run: Run, sharded: FSDP, optimizer, progress: Progress, log: MetricsLogger):
    """Each epoch: step after step (saving every save_every), then export, evaluate and save.
    Every rank runs it in lockstep (the model's forward holds collectives)."""
    t = run.cfg.train
    for epoch in range(len(progress.epochs) + 1, t.epochs + 1):  # a state may lie at an epoch's last step
        done = progress.step - (epoch - 1) * run.steps_per_epoch  # steps of this epoch already taken
        for batch in epoch_batches(run.train, run.batch_size, epoch, t.seed)[done:]:
            log.step(step(run, sharded, optimizer, progress, epoch, batch))
            if t.save_every and progress.step % t.save_every == 0:
                save_state(run.out / "state", sharded, optimizer, progress, fingerprint=run.fingerprint)
        progress.epochs.append(end_of_epoch(run, sharded, epoch))
        if not t.save_every:
            save_state(run.out / "state", sharded, optimizer, progress, fingerprint=run.fingerprint)
        log.epoch(progress.epochs[-1])


def step(run: Run, sharded: FSDP, optimizer, progress: Progress, epoch: int, batch: list[Example]) -> dict:
    """Forward and backward of a global batch -> clip -> check -> AdamW; returns the step's metrics."""
    t, o, dist = run.cfg.train, run.cfg.optim, run.dist
    started = time.perf_counter()
    lr = lr_at(progress.step, run.total_steps, o.lr, o.lr_end)
    set_lr(optimizer, lr)
    loss_sum, targets, tokens = forward_backward(run.model, batch, t.max_len, dist.device,
                                                 dispatch.mix_seed(t.seed, progress.step), run.cfg.compute_dtype,
                                                 dist.rank, dist.world, dist.group)
    grad_norm = sharded.clip_grad_norm_(o.grad_clip or float("inf"))
    loss_sum, grad_norm = torch.stack([loss_sum, grad_norm]).tolist()  # the step's one host sync
    loss = loss_sum / max(targets, 1)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise Diverged(f"step {progress.step} (epoch {epoch}): loss is {loss}, gradient norm {grad_norm}; stopped "
                       f"before the update. The last completed export is intact in {run.out}.")
    optimizer.step()
    sharded.zero_grad()
    progress.tokens += tokens
    return progress.add_step(epoch, loss, lr, targets, grad_norm, tokens / (time.perf_counter() - started))


def forward_backward(model: Llama, batch: list[Example], max_len: int, device, dropout_seed: int | None, dtype,
                     rank: int = 0, world: int = 1, group=None):
    """Forward and backward of this rank's rows of a global batch (see data.packing.shard_batch).

    Each row's summed loss is divided by the target count of the whole global batch, so the
    gradient is the mean over every target token whatever the packing and the number of ranks.
    Returns (summed loss of the global batch, all-reduced over `group`, on the device; target
    tokens; all tokens)."""
    mine = shard_batch(batch, max_len, rank, world)
    total = torch.zeros((), device=device)
    for index, row in mine.rows:
        row = row.to(device)
        # Keyed by the row's global index, so masks do not depend on the number of ranks.
        seed = None if dropout_seed is None or index is None else dispatch.mix_seed(dropout_seed, index)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss_sum, _ = model(row.tokens, row.labels, positions=row.positions, cu_seqlens=row.cu_seqlens,
                                max_seqlen=row.max_seqlen, dropout_seed=seed)
        (loss_sum / max(mine.num_targets, 1)).backward()  # a batch without targets adds nothing
        total += loss_sum.detach()
    if world > 1:
        torch.distributed.all_reduce(total, group=group)
    return total, mine.num_targets, mine.num_tokens

