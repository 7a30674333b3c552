"""Fine-tune a LLaMA the LIMA way.

    python -m lima_core.train [--config FILE.toml] [--key value ...]

Everything is validated before anything is written: bad data or configuration prints an error
naming the file and line (or the argument) and exits with status 2, leaving no run folder.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lima_core import ops
from lima_core.config import PRESETS, ConfigError, ModelConfig, TrainConfig, load_train_config
from lima_core.data import DataError, Example, encode_conversation, epoch_batches, pack, read_conversations
from lima_core.sampling import answer
from lima_core.hf import load_pretrained, save_pretrained
from lima_core.model import Llama
from lima_core.optim import build_optimizer, lr_at, set_lr
from lima_core.report import choose_epoch, plot_losses, write_json
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


def prepare(cfg: TrainConfig) -> Run:
    """Read the data, the tokenizer and the model; raises DataError/ConfigError on bad input."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
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
        model = load_pretrained(checkpoint, dtype=torch.float32, device=device)
        model.resize_vocab(tokenizer.vocab_size)
    else:
        mcfg = ModelConfig.from_name(cfg.model, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                     eos_id=tokenizer.eos_id)
        with torch.device(device):
            model = Llama(mcfg)
        model.init_weights(torch.Generator(device).manual_seed(cfg.seed))
    n_params = model.cfg.num_params()
    model.set_residual_dropout(cfg.dropout if cfg.dropout >= 0 else (0.3 if n_params > 50e9 else 0.2))
    batch_size = cfg.batch_size or (32 if n_params >= 30e9 else 64)
    return Run(cfg, model, tokenizer, [encode(t) for t in train_turns], dev, [encode(t) for t in dev],
               batch_size, device, Path(cfg.out_dir) / cfg.name)


def step_loss(model: Llama, batch: list[Example], max_len: int, device, dropout_seed: int | None, dtype):
    """Forward and backward of one global batch, packed into rows (one micro-batch each).

    Each row's summed loss is divided by the target count of the whole batch, so the gradient
    is the mean over every target token whatever the packing and the number of micro-batches.
    Returns (summed loss, target tokens, all tokens)."""
    rows = pack(batch, max_len)
    n_targets = sum(r.num_targets for r in rows)
    total = torch.zeros((), device=device)
    for micro, row in enumerate(rows):
        row = row.to(device)
        seed = None if dropout_seed is None else ops.mix_seed(dropout_seed, micro)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss_sum, _ = model(row.tokens, row.labels, positions=row.positions, cu_seqlens=row.cu_seqlens,
                                max_seqlen=row.max_seqlen, dropout_seed=seed)
        (loss_sum / n_targets).backward()
        total += loss_sum.detach()
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


def train(run: Run) -> dict:
    from tqdm import tqdm

    cfg, model, device = run.cfg, run.model, run.device
    dtype = DTYPES[cfg.dtype]
    optimizer = build_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    steps_per_epoch = math.ceil(len(run.train) / run.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    run.out.mkdir(parents=True, exist_ok=True)
    write_json(run.out / "config.json", {"train": asdict(cfg), "model": asdict(model.cfg),
                                         "batch_size": run.batch_size, "total_steps": total_steps})
    metrics_file = open(run.out / "metrics.jsonl", "w")
    epochs, history, tokens_seen, step = [], [], 0, 0
    bar = tqdm(total=total_steps, desc=cfg.name, unit="step", dynamic_ncols=True, file=sys.stderr)
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        for batch in epoch_batches(run.train, run.batch_size, epoch, cfg.seed):
            started = time.perf_counter()
            lr = lr_at(step, total_steps, cfg.lr, cfg.lr_end)
            set_lr(optimizer, lr)
            loss_sum, n_targets, n_tokens = step_loss(model, batch, cfg.max_len, device,
                                                     ops.mix_seed(cfg.seed, step), dtype)
            loss = float(loss_sum) / n_targets
            if not math.isfinite(loss):
                raise Diverged(f"step {step} (epoch {epoch}): loss is {loss}; stopped before the update. "
                               f"The last completed export is intact in {run.out}.")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += n_tokens
            elapsed = time.perf_counter() - started
            record = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "tokens": tokens_seen,
                      "targets": n_targets, "grad_norm": grad_norm, "tokens_per_s": n_tokens / elapsed}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            history.append(record)
            step += 1
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / elapsed:.0f}")
            bar.update()
        epochs.append(end_of_epoch(run, epoch, dtype))
        bar.write(f"epoch {epoch}: train loss {history[-1]['loss']:.4f}, dev loss {epochs[-1]['dev_loss']}")
    bar.close()
    metrics_file.close()
    return finish(run, epochs, history)


def end_of_epoch(run: Run, epoch: int, dtype) -> dict:
    """Dev loss, the HF export and (in the selection window) the dev generations of an epoch."""
    cfg = run.cfg
    export = run.out / f"epoch-{epoch}"
    save_pretrained(run.model, export, run.tokenizer)
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
    write_json(run.out / "summary.json", summary)
    if run.cfg.plot:
        plot_losses(history, epochs, run.out / "loss.png")
    return summary


def main(argv=None):
    try:
        cfg = load_train_config(argv)
        run = prepare(cfg)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"lima-core: {run.cfg.model} ({run.model.cfg.num_params() / 1e6:.1f}M parameters) on {run.device}, "
          f"{len(run.train)} training conversations, batch {run.batch_size}, {cfg.epochs} epochs -> {run.out}",
          file=sys.stderr)
    try:
        summary = train(run)
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"chosen checkpoint: {summary['checkpoint']} ({summary['reason']})")
    if run.dev:
        chosen = next(e for e in summary["epochs"] if e["epoch"] == summary["chosen_epoch"])
        if "generations" in chosen:
            first = json.loads(Path(chosen["generations"]).read_text())[0]
            print(f"\nuser> {first['prompt'][-1]}\nlima> {first['answer']}")


if __name__ == "__main__":
    main()
