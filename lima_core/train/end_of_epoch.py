"""What the trainer does at each epoch's end, and how it picks the checkpoint (LIMA 2.3).

The epoch's HF export (by default only in the selection window and at the last epoch); dev
loss (the mean over every assistant token of the dev set) and dev generations with the run's
sampling settings. Both are spread over the ranks: each rank runs its share of the packed dev
rows; dev prompts are decoded as one batch a share, either by each rank on the sharded model
(a decode step gathers each FSDP unit once for everyone) or by each node on its tensor-parallel
copy, gathered once an epoch (lima_core.parallel.decode_layout says which, and why). The
selection window (LIMA's epochs 5-10 of 15, scaled to the run) and the default choice in it; at
the run's end, the summary that records the choice (a judge's, where one is configured), the
loss curve, and the choice printed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lima_core.checkpoint.atomic import write_json
from lima_core.checkpoint.hf import save_sharded
from lima_core.checkpoint.state import Progress
from lima_core.config import TrainConfig
from lima_core.data.encode import Example, prompt_ids
from lima_core.data.formats import Conversation
from lima_core.data.packing import shard_batch
from lima_core.inference.decode import answers
from lima_core.model.dispatch import mix_seed
from lima_core.parallel.decode_layout import choose_dev_layout, free_memory, tensor_parallel_copy
from lima_core.parallel.fsdp import FSDP
from lima_core.train.metrics import plot_losses
from lima_core.train.prepare import Run


def end_of_epoch(run: Run, sharded: FSDP, epoch: int) -> dict:
    """The HF export, dev loss and (in the selection window) the dev generations of an epoch.
    Collective: every rank runs its share of the dev forwards (they gather parameters)."""
    cfg, device, comm = run.cfg, run.dist.device, run.dist.comm
    first, last = selection_window(cfg.train)
    export = None
    if cfg.train.export_epochs == "all" or first <= epoch <= last or epoch == cfg.train.epochs:
        export = run.out / f"epoch-{epoch}"
        with comm.phase("export"):
            save_sharded(sharded, run.model.cfg, export, run.tokenizer, dtype=run.export_dtype, sampling=cfg.sampling)
    with comm.phase("dev_loss"):
        loss = dev_loss(run.model, run.dev_examples, cfg.train.max_len, device, cfg.compute_dtype,
                        run.dist.rank, run.dist.world, run.dist.group) if run.dev else None
    info = {"epoch": epoch, "export": None if export is None else str(export), "dev_loss": loss}
    if run.dev and first <= epoch <= last:
        with comm.phase("dev_generation"):
            answers = dev_generations(run, sharded, epoch)
        info["generations"] = str(run.out / f"generations-epoch-{epoch}.json")
        if run.dist.rank == 0:
            write_json(info["generations"], answers)
    return info


@torch.no_grad()
def dev_loss(model, examples: list[Example], max_len: int, device, dtype: torch.dtype, rank: int = 0, world: int = 1,
             group=None) -> float:
    """Mean token loss of the dev examples, packed into rows like training data; each rank runs
    its share of the rows (data.shard_batch) and the sums are all-reduced."""
    model.eval()
    mine = shard_batch(examples, max_len, rank, world)
    total = torch.zeros((), device=device, dtype=torch.float64)
    for _, row in mine.rows:
        row = row.to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss_sum, _ = model(row.tokens, row.labels, positions=row.positions, cu_seqlens=row.cu_seqlens,
                                max_seqlen=row.max_seqlen)
        total += loss_sum
    if world > 1:
        torch.distributed.all_reduce(total, group=group)
    model.train()
    return float(total) / max(mine.num_targets, 1)


def dev_generations(run: Run, sharded: FSDP, epoch: int) -> list[dict]:
    """The model's answer to each dev conversation's last user turn, beside the reference answer
    (collective: every rank returns all). The layout is chosen (decode_layout.choose_dev_layout)
    and said in one line. Gather: rank r decodes conversations r, r + world, ... as one batch on
    the sharded model, drawing from mix_seed(seed, epoch, r). Node: the ranks of node n build
    their tensor-parallel copy, decode conversations n, n + nodes, ... together, drawing from
    mix_seed(seed, epoch, n), and free the copy; no collective leaves the node while decoding.
    The answers are exchanged over the world at the end."""
    cfg, topology, comm = run.cfg, run.dist.topology, run.dist.comm
    lengths = [len(prompt_ids(run.tokenizer, c.prompt)) for c in run.dev]
    free = free_memory(run.dist.device, comm) if cfg.parallel.dev_decode == "auto" else None
    layout = choose_dev_layout(cfg, run.model.cfg, topology, lengths, free)
    if run.dist.world > 1:  # one process has one layout: the model as trained
        run.say(f"epoch {epoch}: {layout.describe()}")
    if layout.name == "node":
        share, shares = topology.node, topology.nodes
        mine = _node_local_answers(run, sharded, epoch)
    else:
        share, shares = topology.rank, topology.world
        mine = _answers(run, run.model, run.dev[share::shares], mix_seed(cfg.train.seed, epoch, share), "world")
    if topology.world > 1:
        every = [None] * topology.world
        torch.distributed.all_gather_object(every, mine, group=run.dist.group)  # strings between our own ranks
        speaker = topology.world // shares  # share s is rank s's (gather), or its node's local rank 0's
        mine = [every[(i % shares) * speaker][i // shares] for i in range(len(run.dev))]
    return [{"prompt": c.turns[:-1], "system": c.system, "reference": c.turns[-1], "answer": reply}
            for c, reply in zip(run.dev, mine)]


def _node_local_answers(run: Run, sharded: FSDP, epoch: int) -> list[str]:
    """This node's share of the answers, decoded on its tensor-parallel copy (freed on return)."""
    topology = run.dist.topology
    copy = tensor_parallel_copy(sharded, run.model.cfg, run.dist.comm, run.cfg.param_dtype, run.cfg.train.kernels)
    return _answers(run, copy, run.dev[topology.node::topology.nodes],
                    mix_seed(run.cfg.train.seed, epoch, topology.node), "node")


def _answers(run: Run, model, conversations: list[Conversation], seed: int, level: str) -> list[str]:
    """The answers to `conversations` as one batch with the run's sampling settings, a collective
    over `level` (every rank of it steps until all are done)."""
    s = run.cfg.sampling
    generator = torch.Generator(run.dist.device).manual_seed(seed)
    return answers(model, run.tokenizer, [c.prompt for c in conversations], max_new_tokens=s.max_new_tokens,
                   temperature=s.temperature, top_p=s.top_p, repetition_penalty=s.repetition_penalty,
                   generator=generator, comm=run.dist.comm, level=level)


def write_byte_counts(run: Run):
    """With --count-bytes, every rank's counts in bytes.json (rank 0 writes; a collective)."""
    counter, topology = run.dist.comm.counter, run.dist.topology
    if counter is None:
        return
    every = [counter.as_dict()]
    if run.dist.world > 1:
        every = [None] * run.dist.world
        torch.distributed.all_gather_object(every, counter.as_dict(), group=run.dist.group)
    if run.dist.rank == 0:
        write_json(run.out / "bytes.json", {"world": topology.world, "node_size": topology.node_size,
                                            "ranks": every})


def finish(run: Run, progress: Progress):
    """The run's end, on rank 0: summary.json with the default choice, loss.png, the judge's
    choice where one is configured, and the choice printed with its first dev generation."""
    if run.dist.rank != 0:
        return
    t = run.cfg.train
    summary = summarize(progress, selection_window(t))
    write_json(run.out / "summary.json", summary)
    if t.plot:
        plot_losses(progress.history, progress.epochs, run.out / "loss.png")
    if t.judge_url and run.dev:
        problem = judge_choice(run)
        if problem:
            run.say(f"warning: the judge could not choose ({problem}); the dev-loss choice stands")
        summary = json.loads((run.out / "summary.json").read_text())
    print(f"chosen checkpoint: {summary['checkpoint']} ({summary['reason']})")
    chosen = next(e for e in summary["epochs"] if e["epoch"] == summary["chosen_epoch"])
    if "generations" in chosen:
        first = json.loads(Path(chosen["generations"]).read_text())[0]
        print(f"\nuser> {first['prompt'][-1]}\nlima> {first['answer']}")


def judge_choice(run: Run) -> str | None:
    """With a judge configured (train.judge_url and judge_model), choose among the window's epochs
    by its pairwise verdicts on the dev generations (lima_core.eval.choose, which rewrites
    summary.json with the choice and why). Rank 0 only; returns why it could not, or None."""
    import os

    from lima_core.eval.choose import choose
    from lima_core.eval.client import EndpointError, make_client
    from lima_core.eval.generate import EvalError
    from lima_core.eval.judge import Judge

    t = run.cfg.train
    judge = Judge(make_client(t.judge_url, os.environ.get("OPENAI_API_KEY", ""), timeout=600.0), t.judge_model)
    try:
        choose(run.out, judge)
    except (EvalError, EndpointError) as e:
        return str(e)
    return None


def selection_window(cfg: TrainConfig) -> tuple[int, int]:
    """LIMA's epochs 5-10 of 15, scaled to this run's number of epochs."""
    scale = cfg.epochs / 15
    first = max(1, min(cfg.epochs, round(cfg.select_epochs[0] * scale)))
    last = max(first, min(cfg.epochs, round(cfg.select_epochs[1] * scale)))
    return first, last


def choose_epoch(epochs: list[dict], window: tuple[int, int]) -> tuple[dict, str]:
    """The default rule: lowest dev loss among the epochs of the window.

    LIMA chose among epochs 5-10 by reading dev generations, since perplexity did not track
    quality; the generations of every epoch in the window are saved beside the summary so a
    person (or a pairwise judge) can overrule this choice."""
    first, last = window
    candidates = [e for e in epochs if first <= e["epoch"] <= last]
    if all(e["dev_loss"] is None for e in candidates):
        chosen = candidates[-1]
        return chosen, f"no dev set: the last epoch of the window {first}-{last}"
    chosen = min((e for e in candidates if e["dev_loss"] is not None), key=lambda e: e["dev_loss"])
    return chosen, (f"lowest dev loss ({chosen['dev_loss']:.4f}) among epochs {first}-{last}; "
                    "read the saved dev generations to overrule, as LIMA did")


def summarize(progress, window: tuple[int, int]) -> dict:
    """The run's summary: the chosen epoch and why, every epoch's record, the totals."""
    chosen, reason = choose_epoch(progress.epochs, window)
    return {"chosen_epoch": chosen["epoch"], "checkpoint": chosen["export"], "reason": reason,
            "window": list(window), "epochs": progress.epochs, "final_train_loss": progress.history[-1]["loss"],
            "steps": progress.step, "tokens": progress.tokens}
