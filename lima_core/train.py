"""Fine-tune a LLaMA the LIMA way.

    python -m lima_core.train [--config FILE.toml] [--key value ...]

Everything is validated before anything is written: bad data or configuration prints an error
naming the file and line (or the argument) and exits with status 2, leaving no run folder.
"""

from __future__ import annotations

import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lima_core import ops
from lima_core.config import PRESETS, ConfigError, ModelConfig, TrainConfig, load_train_config
from lima_core.data import IGNORE, DataError, Example, Row, encode_conversation, epoch_batches, pack, read_conversations
from lima_core.hf import load_sharded, read_config, save_sharded
from lima_core.model import Llama
from lima_core.optim import adamw, lr_at, set_lr
from lima_core.parallelize import parallelize
from lima_core.report import choose_epoch, plot_losses, write_json
from lima_core.sampling import answer
from lima_core.state import latest_state, load_state, rng_state, save_state, set_rng_state
from lima_core.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Diverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class Run:
    """Everything a run needs, built and validated before the first write."""

    cfg: TrainConfig
    model: Llama
    tokenizer: Tokenizer
    train: list[Example]
    dev: list[list[str]]
    dev_examples: list[Example]
    batch_size: int
    device: torch.device
    out: Path
    init_from: Path | None = None
    """HF checkpoint the (meta-device) model is filled from once sharded; None: already initialised."""
    group: object = None
    """Process group of the data-parallel ranks; None for a single process."""
    rank: int = 0
    world: int = 1


def init_distributed(cfg: TrainConfig):
    """(group, rank, world, device) under torchrun (gloo on CPU, NCCL on CUDA); (None, 0, 1, None) otherwise."""
    if "WORLD_SIZE" not in os.environ:
        return None, 0, 1, None
    import torch.distributed as dist

    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.group.WORLD, dist.get_rank(), dist.get_world_size(), device


def prepare(cfg: TrainConfig, device: torch.device | None = None) -> Run:
    """Read the data, the tokenizer and the model; raises DataError/ConfigError on bad input.

    A checkpoint is built on the meta device (its shards are read after sharding, each rank
    its own slices); a preset is initialised in full on every rank from the same seed."""
    device = device or torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                    "cpu" if cfg.device == "auto" else cfg.device)
    checkpoint = Path(cfg.model)
    if not checkpoint.is_dir() and cfg.model not in PRESETS:
        raise ConfigError(f"--model {cfg.model!r} is neither a checkpoint folder nor a preset name")
    tokenizer = Tokenizer(cfg.tokenizer or (checkpoint if checkpoint.is_dir() else Path(__file__).parent / "assets/tokenizer.model"))
    train_turns = read_conversations(cfg.data)
    dev = read_conversations(cfg.dev_data) if cfg.dev_data else []
    encode = lambda turns: encode_conversation(tokenizer, turns, cfg.max_len)  # noqa: E731

    torch.manual_seed(cfg.seed)
    if checkpoint.is_dir():
        with torch.device("meta"):
            model = Llama(replace(read_config(checkpoint), kernels=cfg.kernels))
        model.resize_vocab(tokenizer.vocab_size)
    else:
        mcfg = ModelConfig.from_name(cfg.model, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                     eos_id=tokenizer.eos_id, kernels=cfg.kernels)
        with torch.device(device):
            model = Llama(mcfg)
        model.init_weights(torch.Generator(device).manual_seed(cfg.seed))
    n_params = model.cfg.num_params()
    model.set_residual_dropout(cfg.dropout if cfg.dropout >= 0 else (0.3 if n_params > 50e9 else 0.2))
    batch_size = cfg.batch_size or (32 if n_params >= 30e9 else 64)
    return Run(cfg, model, tokenizer, [encode(t) for t in train_turns], dev, [encode(t) for t in dev],
               batch_size, device, Path(cfg.out_dir) / cfg.name, checkpoint if checkpoint.is_dir() else None)


def step_loss(model: Llama, batch: list[Example], max_len: int, device, dropout_seed: int | None, dtype,
              rank: int = 0, world: int = 1, group=None):
    """Forward and backward of one global batch, packed into rows (one micro-batch each).

    Every rank packs the whole batch the same way and takes rows[rank::world]. Each row's summed
    loss is divided by the target count of the whole global batch (known to every rank without a
    collective), so the gradient is the mean over every target token whatever the packing, the
    number of micro-batches and of ranks. Ranks with fewer rows run an all-ignored copy of a row
    so every rank issues the same collectives. Returns (summed loss of the global batch, target
    tokens, all tokens); the summed loss is all-reduced over `group` (collective when world > 1)."""
    rows = pack(batch, max_len)
    n_targets = sum(r.num_targets for r in rows)
    mine = [(i, rows[i]) for i in range(rank, len(rows), world)]
    idle = Row(rows[0].tokens, torch.full_like(rows[0].labels, IGNORE), rows[0].positions, rows[0].cu_seqlens,
               rows[0].max_seqlen)
    mine += [(None, idle)] * (math.ceil(len(rows) / world) - len(mine))
    total = torch.zeros((), device=device)
    for micro, row in mine:
        row = row.to(device)
        # Keyed by the row's global index, so masks do not depend on the number of ranks.
        seed = None if dropout_seed is None or micro is None else ops.mix_seed(dropout_seed, micro)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss_sum, _ = model(row.tokens, row.labels, positions=row.positions, cu_seqlens=row.cu_seqlens,
                                max_seqlen=row.max_seqlen, dropout_seed=seed)
        (loss_sum / n_targets).backward()
        total += loss_sum.detach()
    if world > 1:
        torch.distributed.all_reduce(total, group=group)
    return total, n_targets, sum(r.tokens.numel() for r in rows)


@torch.no_grad()
def dev_loss(model: Llama, examples: list[Example], max_len: int, device, dtype) -> float:
    model.eval()
    total, count = 0.0, 0
    for row in pack(examples, max_len):
        row = row.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss_sum, n = model(row.tokens, row.labels, positions=row.positions, cu_seqlens=row.cu_seqlens,
                                max_seqlen=row.max_seqlen)
        total, count = total + float(loss_sum), count + int(n)
    model.train()
    return total / max(count, 1)


def shard(run: Run):
    """Checkpointing and FSDP applied to the model (see parallelize); weights read if pending."""
    cfg = run.cfg
    sharded = parallelize(run.model, group=run.group, checkpointing=cfg.checkpointing, device=run.device,
                          param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])
    if run.init_from is not None:
        load_sharded(sharded, run.init_from)
    if run.model.inv_freq.is_meta:
        run.model.init_buffers()
    return sharded


def train(run: Run) -> dict:
    """The loop. Every rank runs it in lockstep (the model's forward holds collectives); only
    rank 0 writes metrics, exports, states' metadata, the summary and the progress bar."""
    from tqdm import tqdm

    cfg, model, device, lead = run.cfg, run.model, run.device, run.rank == 0
    dtype = DTYPES[cfg.dtype]
    sharded = shard(run)
    optimizer = adamw(sharded.param_groups(cfg.weight_decay), cfg.lr, (cfg.beta1, cfg.beta2), fused=cfg.fused_adamw,
                      moment_dtype=DTYPES[cfg.moment_dtype])
    steps_per_epoch = math.ceil(len(run.train) / run.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    progress = resume(run, sharded, optimizer)
    epochs, history, tokens_seen, step = progress["epochs"], progress["history"], progress["tokens"], progress["step"]
    if lead:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(run.out / "config.json", {"train": asdict(cfg), "model": asdict(model.cfg), "world_size": run.world,
                                             "batch_size": run.batch_size, "total_steps": total_steps})
        metrics_file = open(run.out / "metrics.jsonl", "w")
        metrics_file.writelines(json.dumps(r) + "\n" for r in history)
    bar = tqdm(total=total_steps, initial=step, desc=cfg.name, unit="step", dynamic_ncols=True, file=sys.stderr,
               disable=not lead)
    model.train()
    for epoch in range(len(epochs) + 1, cfg.epochs + 1):  # a state may lie between an epoch's last step and its end
        for batch in epoch_batches(run.train, run.batch_size, epoch, cfg.seed)[step - (epoch - 1) * steps_per_epoch:]:
            started = time.perf_counter()
            lr = lr_at(step, total_steps, cfg.lr, cfg.lr_end)
            set_lr(optimizer, lr)
            loss_sum, n_targets, n_tokens = step_loss(model, batch, cfg.max_len, device, ops.mix_seed(cfg.seed, step),
                                                     dtype, run.rank, run.world, run.group)
            loss = float(loss_sum) / n_targets
            if not math.isfinite(loss):
                raise Diverged(f"step {step} (epoch {epoch}): loss is {loss}; stopped before the update. "
                               f"The last completed export is intact in {run.out}.")
            grad_norm = float(sharded.clip_grad_norm_(cfg.grad_clip or float("inf")))
            optimizer.step()
            sharded.zero_grad()
            tokens_seen += n_tokens
            elapsed = time.perf_counter() - started
            record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "tokens": tokens_seen,
                      "targets": n_targets, "grad_norm": grad_norm, "tokens_per_s": n_tokens / elapsed}
            history.append(record)
            step += 1
            if lead:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / elapsed:.0f}")
            bar.update()
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint_state(run, sharded, optimizer, step, epochs, history, tokens_seen)
        epochs.append(end_of_epoch(run, sharded, epoch, dtype))
        if not cfg.save_every:
            checkpoint_state(run, sharded, optimizer, step, epochs, history, tokens_seen)
        if lead:
            bar.write(f"epoch {epoch}: train loss {history[-1]['loss']:.4f}, dev loss {epochs[-1]['dev_loss']}")
    bar.close()
    if lead:
        metrics_file.close()
    return finish(run, epochs, history)


def checkpoint_state(run: Run, sharded, optimizer, step, epochs, history, tokens_seen):
    """Save the sharded train state of `step` (collective). The data position is the global step:
    any number of ranks continues at the same batch."""
    progress = {"step": step, "epochs": epochs, "history": history, "tokens": tokens_seen, "rng": rng_state()}
    save_state(run.out / "state", step, sharded, optimizer, progress)


def resume(run: Run, sharded, optimizer) -> dict:
    """The progress to start from: fresh, or restored from --resume (auto: the newest complete state)."""
    fresh = {"step": 0, "epochs": [], "history": [], "tokens": 0}
    if not run.cfg.resume:
        return fresh
    path = latest_state(run.out / "state") if run.cfg.resume == "auto" else Path(run.cfg.resume)
    if path is None:
        return fresh
    progress = load_state(path, sharded, optimizer)
    set_rng_state(progress.pop("rng"))
    if run.rank == 0:
        print(f"lima-core: resumed from {path} (step {progress['step']})", file=sys.stderr)
    return progress


def end_of_epoch(run: Run, sharded, epoch: int, dtype) -> dict:
    """Dev loss, the HF export and (in the selection window) the dev generations of an epoch.
    Collective: every rank runs the dev forwards (they gather parameters); rank 0 writes."""
    cfg = run.cfg
    export = run.out / f"epoch-{epoch}"
    save_sharded(sharded, export, run.tokenizer)
    info = {"epoch": epoch, "export": str(export),
            "dev_loss": dev_loss(run.model, run.dev_examples, cfg.max_len, run.device, dtype) if run.dev else None}
    first, last = selection_window(cfg)
    if run.dev and first <= epoch <= last:
        generator = torch.Generator(run.device).manual_seed(cfg.seed + epoch)
        answers = [{"prompt": turns[:-1], "reference": turns[-1],
                    "answer": answer(run.model, run.tokenizer, turns[:-1], max_new_tokens=cfg.gen_max_tokens,
                                     temperature=cfg.temperature, top_p=cfg.top_p,
                                     repetition_penalty=cfg.repetition_penalty, generator=generator)}
                   for turns in run.dev]
        info["generations"] = str(run.out / f"generations-epoch-{epoch}.json")
        if run.rank == 0:
            write_json(Path(info["generations"]), answers)
    return info


def selection_window(cfg: TrainConfig) -> tuple[int, int]:
    """LIMA's epochs 5-10 of 15, scaled to this run's number of epochs."""
    scale = cfg.epochs / 15
    first = max(1, min(cfg.epochs, round(cfg.select_epochs[0] * scale)))
    last = max(first, min(cfg.epochs, round(cfg.select_epochs[1] * scale)))
    return first, last


def finish(run: Run, epochs: list[dict], history: list[dict]) -> dict:
    chosen, reason = choose_epoch(epochs, selection_window(run.cfg))
    summary = {"chosen_epoch": chosen["epoch"], "checkpoint": chosen["export"], "reason": reason,
               "window": list(selection_window(run.cfg)), "epochs": epochs,
               "final_train_loss": history[-1]["loss"], "steps": len(history), "tokens": history[-1]["tokens"]}
    if run.rank != 0:
        return summary
    write_json(run.out / "summary.json", summary)
    if run.cfg.plot:
        plot_losses(history, epochs, run.out / "loss.png")
    return summary


def main(argv=None):
    try:
        cfg = load_train_config(argv)
        group, rank, world, device = init_distributed(cfg)
        run = prepare(cfg, device)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    run.group, run.rank, run.world = group, rank, world
    try:
        return train_and_report(run)
    finally:
        if group is not None:
            # The sharded model's hooks hold the process group in reference cycles; a gloo group
            # left to interpreter finalization aborts the process now and then ("terminate called
            # without an active exception", pytorch#179291). Free them while Python is alive.
            run = None
            gc.collect()
            torch.distributed.destroy_process_group()


def train_and_report(run: Run) -> dict:
    cfg, lead = run.cfg, run.rank == 0
    if lead:
        print(f"lima-core: {run.cfg.model} ({run.model.cfg.num_params() / 1e6:.1f}M parameters) on {run.device} "
              f"x {run.world}, {len(run.train)} training conversations, batch {run.batch_size}, {cfg.epochs} epochs "
              f"-> {run.out}", file=sys.stderr)
    try:
        summary = train(run)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if not lead:
        return summary
    print(f"chosen checkpoint: {summary['checkpoint']} ({summary['reason']})")
    if run.dev:
        chosen = next(e for e in summary["epochs"] if e["epoch"] == summary["chosen_epoch"])
        if "generations" in chosen:
            first = json.loads(Path(chosen["generations"]).read_text())[0]
            print(f"\nuser> {first['prompt'][-1]}\nlima> {first['answer']}")
    return summary


if __name__ == "__main__":
    main()
