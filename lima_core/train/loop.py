"""Fine-tune a LLaMA the LIMA way.

    python -m lima_core.train [--config FILE.toml] [--key value ...]
    torchrun --nproc_per_node N -m lima_core.train ...

Everything is validated before anything is written: bad data or configuration prints an error
naming the file and line (or the flag) and exits with status 2, leaving no run folder. A
non-finite loss or gradient stops the run before the update, with exit status 1.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from lima_core.checkpoint.atomic import remove_stale_temps, write_json
from lima_core.checkpoint.hf import load_sharded
from lima_core.checkpoint.run_folder import choose_state, claim
from lima_core.checkpoint.state import Progress, load_state, save_state
from lima_core.cli import load_config
from lima_core.config import DTYPES, Config, ConfigError
from lima_core.data.encode import Example
from lima_core.data.formats import DataError
from lima_core.data.packing import epoch_batches, shard_batch
from lima_core.model import dispatch
from lima_core.model.initialization import init_sharded
from lima_core.model.llama import Llama
from lima_core.parallel.distributed import Distributed, destroy_distributed, init_distributed
from lima_core.parallel.parallelize import parallelize
from lima_core.train.end_of_epoch import end_of_epoch, judge_choice, selection_window, summarize
from lima_core.train.metrics import MetricsLogger, plot_losses
from lima_core.train.optim import adamw, lr_at, set_lr
from lima_core.train.prepare import Run, check_environment, prepare


class Diverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


def step_loss(model: Llama, batch: list[Example], max_len: int, device, dropout_seed: int | None, dtype,
              rank: int = 0, world: int = 1, group=None):
    """Forward and backward of this rank's rows of a global batch (see data.shard_batch).

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


def train(run: Run, sharded, optimizer, progress: Progress, log: MetricsLogger) -> Progress:
    """The loop: batch -> train step -> log -> maybe save; at each epoch's end, export and
    evaluate. Every rank runs it in lockstep (the model's forward holds collectives)."""
    t = run.cfg.train
    per_epoch = math.ceil(len(run.train) / run.batch_size)
    total_steps = per_epoch * t.epochs
    with tqdm(total=total_steps, initial=progress.step, desc=t.name, unit="step", dynamic_ncols=True,
              file=sys.stderr, disable=run.dist.rank != 0) as bar:  # closed (its line ended) also on a stop
        for epoch in range(len(progress.epochs) + 1, t.epochs + 1):  # a state may lie at an epoch's last step
            done = progress.step - (epoch - 1) * per_epoch  # steps of this epoch already taken
            for batch in epoch_batches(run.train, run.batch_size, epoch, t.seed)[done:]:
                metrics = train_step(run, sharded, optimizer, progress, epoch, batch, total_steps)
                log.step(metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                bar.update()
                if t.save_every and progress.step % t.save_every == 0:
                    save_state(run.out / "state", sharded, optimizer, progress, fingerprint=run.fingerprint)
            progress.epochs.append(end_of_epoch(run, sharded, epoch))
            log.epoch(progress.epochs[-1])
            if not t.save_every:
                save_state(run.out / "state", sharded, optimizer, progress, fingerprint=run.fingerprint)
            if run.dist.rank == 0:
                bar.write(f"epoch {epoch}: train loss {progress.history[-1]['loss']:.4f}, "
                          f"dev loss {progress.epochs[-1]['dev_loss']}")
    return progress


def train_step(run: Run, sharded, optimizer, progress: Progress, epoch: int, batch: list[Example],
               total_steps: int) -> dict:
    """Forward and backward of a global batch -> clip -> check -> AdamW; returns the step's metrics."""
    t, o = run.cfg.train, run.cfg.optim
    started = time.perf_counter()
    lr = lr_at(progress.step, total_steps, o.lr, o.lr_end)
    set_lr(optimizer, lr)
    loss_sum, targets, tokens = step_loss(run.model, batch, t.max_len, run.dist.device,
                                          dispatch.mix_seed(t.seed, progress.step), DTYPES[t.dtype],
                                          run.dist.rank, run.dist.world, run.dist.group)
    grad_norm = sharded.clip_grad_norm_(o.grad_clip or float("inf"))
    loss_sum, grad_norm = torch.stack([loss_sum, grad_norm]).tolist()  # the step's one host sync
    loss = loss_sum / max(targets, 1)
    check_finite(run, progress.step, epoch, loss, grad_norm)
    optimizer.step()
    sharded.zero_grad()
    progress.tokens += tokens
    return progress.add_step(epoch, loss, lr, targets, grad_norm, tokens / (time.perf_counter() - started))


def check_finite(run: Run, step: int, epoch: int, loss: float, grad_norm: float):
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise Diverged(f"step {step} (epoch {epoch}): loss is {loss}, gradient norm {grad_norm}; stopped before "
                       f"the update. The last completed export is intact in {run.out}.")


def say(run: Run, message: str):
    if run.dist.rank == 0:
        print(f"lima-core: {message}", file=sys.stderr)


def start(run: Run, sharded, optimizer, state: Path | None) -> Progress:
    """A fresh progress, or the one restored from `state`. Rank 0 first removes what a crashed
    process left half-written in the run folder."""
    if run.dist.rank == 0:
        remove_stale_temps(run.out)
        write_json(run.out / "config.json", {**run.cfg.model_dump(), "model": asdict(run.model.cfg),
                                             "world_size": run.dist.world, "batch_size": run.batch_size})
    if state is None:
        return Progress()
    progress = load_state(state, sharded, optimizer)
    say(run, f"resumed from {state} (step {progress.step})")
    return progress


def fit(run: Run, state: Path | None) -> dict:
    """Shard, build the optimizer, train, and write the summary; returns it."""
    cfg = run.cfg
    stds = run.model.init_stds()  # read before sharding takes the parameters away
    sharded = parallelize(run.model, group=run.dist.group, checkpointing=cfg.parallel.checkpointing,
                          device=run.dist.device, param_dtype=cfg.param_dtype,
                          reduce_dtype=DTYPES[cfg.parallel.reduce_dtype])
    if run.init_from is not None:
        load_sharded(sharded, run.init_from)
    else:
        init_sharded(sharded, stds, cfg.train.seed)
    run.model.init_buffers()
    optimizer = adamw(sharded.param_groups(cfg.optim.weight_decay), cfg.optim.lr, (cfg.optim.beta1, cfg.optim.beta2),
                      fused=cfg.optim.fused_adamw, moment_dtype=DTYPES[cfg.optim.moment_dtype],
                      copies=sharded.param_copies())
    progress = start(run, sharded, optimizer, state)
    with MetricsLogger(run.out, enabled=run.dist.rank == 0, history=progress.history,
                       tensorboard=cfg.train.tensorboard) as log:
        progress = train(run, sharded, optimizer, progress, log)
    summary = summarize(progress, selection_window(cfg.train))
    if run.dist.rank == 0:
        write_json(run.out / "summary.json", summary)
        if cfg.train.plot:
            plot_losses(progress.history, progress.epochs, run.out / "loss.png")
        if cfg.train.judge_url and run.dev:
            problem = judge_choice(run)
            if problem:
                say(run, f"warning: the judge could not choose ({problem}); the dev-loss choice stands")
            summary = json.loads((run.out / "summary.json").read_text())
    return summary


BAD_INPUT = (ConfigError, DataError, FileNotFoundError, ValueError)
"""Errors of what the user gave (exit status 2); RunFolderError and the loaders' errors are ValueErrors."""


def run_job(cfg: Config, dist: Distributed) -> int:
    """prepare -> take the run folder -> fit -> print the choice; returns the exit status.
    Nothing is written before the input is validated and the folder is this run's."""
    t = cfg.train
    try:
        run = prepare(cfg, dist)
        state = choose_state(run.out, t.resume, t.force_resume, run.fingerprint, say=lambda m: say(run, m))
        lock = claim(run.out, t.resume, t.overwrite, dist.rank, dist.group)
    except BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return train_and_report(run, state)
    finally:
        if lock is not None:
            lock.release()


def train_and_report(run: Run, state: Path | None) -> int:
    say(run, f"{run.cfg.train.model} ({run.model.cfg.num_params() / 1e6:.1f}M parameters) on {run.dist.device} x "
             f"{run.dist.world}, {len(run.train)} training conversations, batch {run.batch_size}, "
             f"{run.cfg.train.epochs} epochs -> {run.out}")
    if not run.dev:
        say(run, "no dev set (--dev-data): no dev loss or generations; the last epoch of the selection window "
                 "is the default choice")
    try:
        summary = fit(run, state)
    except (Diverged, OSError) as e:  # OSError: a write failed (disk full...): its message names the path
        print(f"error: {e}", file=sys.stderr)
        return 1
    if run.dist.rank == 0:
        print(f"chosen checkpoint: {summary['checkpoint']} ({summary['reason']})")
        chosen = next(e for e in summary["epochs"] if e["epoch"] == summary["chosen_epoch"])
        if "generations" in chosen:
            first = json.loads(Path(chosen["generations"]).read_text())[0]
            print(f"\nuser> {first['prompt'][-1]}\nlima> {first['answer']}")
    return 0


def main(argv=None):
    try:
        cfg = load_config(argv)
        check_environment(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    dist = init_distributed(cfg.train.device)
    try:
        status = run_job(cfg, dist)
    except KeyboardInterrupt:
        print("lima-core: interrupted; --resume auto continues from the last saved train state", file=sys.stderr)
        status = 130
    finally:
        destroy_distributed(dist)
    if status:
        sys.exit(status)

