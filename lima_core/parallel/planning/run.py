"""The whole LIMA run on a cluster, every part of it on each layout, in one value that the report
prints and the recommendation reads.

Around training, at each epoch's end: the HF export (by default the epochs of the selection
window and the last), dev loss, and in the window the dev generations, on the gather layout
(every rank decodes its share of the prompts as one batch, each decode step gathering every
unit) or the node layout (every unit gathered once an epoch into a tensor-parallel copy per
node; each node decodes its share with no collective across nodes).
"""

from __future__ import annotations

from dataclasses import dataclass

from lima_core.model.shapes import ModelConfig
from lima_core.parallel.planning.cluster import Cluster
from lima_core.parallel.planning.memory import Plan, fsdp_units, node_layout_splits, plan, two_level_bytes
from lima_core.parallel.planning.timing import (
    Cost,
    Generation,
    Job,
    dev_loss_epoch,
    export_cost,
    gather_generation,
    node_generation,
    training,
    training_steps,
)


@dataclass
class RunPlan:
    """Every part of LIMA's run on a cluster, on each layout."""

    cfg: ModelConfig
    cluster: Cluster
    job: Job
    memory: Plan
    two_level: int
    """Bytes two-level sharding holds beside flat's (two_level_bytes)."""
    steps: int
    train: dict[str, Cost]  # sharding -> a step
    dev_loss: Cost  # an epoch
    generation: dict[str, Generation]  # dev_decode -> an epoch; no "node" where the heads do not split
    export: tuple[Cost, float]

    def training_seconds(self, sharding: str) -> float:
        return self.steps * self.train[sharding].seconds

    def run_seconds(self, sharding: str, dev_decode: str) -> float:
        """Training, dev loss every epoch, dev generations in the window, and the exports."""
        gather, write = self.export
        return (self.training_seconds(sharding) + self.job.epochs * self.dev_loss.seconds
                + self.job.window_epochs * self.generation[dev_decode].epoch.seconds
                + self.job.export_count * (gather.seconds + write))

    def train_state(self) -> int:
        """What a GPU holds between steps: the plan without the activations."""
        return self.memory.total - self.memory.activations

    def fits(self, memory_bytes: float, sharding: str = "flat", dev_decode: str | None = None) -> bool:
        if dev_decode is None:
            return self.memory.total + (self.two_level if sharding == "two-level" else 0) <= memory_bytes
        g = self.generation[dev_decode]
        return self.train_state() + g.copy + g.kv_cache <= memory_bytes


def lima_plan(cfg: ModelConfig, cluster: Cluster, job: Job) -> RunPlan:
    """Every part of `job` on `cluster`: both shardings, and each dev-decode layout the heads allow."""
    units = fsdp_units(cfg)
    memory = plan(cfg, cluster.gpus, seq=job.seq, micro_batch=job.micro_batch, checkpointing=job.checkpointing,
                  param_dtype=job.param_dtype, moment_dtype=job.moment_dtype)
    generation = {"gather": gather_generation(cfg, units, cluster, job)}
    if node_layout_splits(cfg, cluster.node_size):
        generation["node"] = node_generation(cfg, units, cluster, job)
    return RunPlan(cfg, cluster, job, memory, two_level_bytes(units, cluster.gpus, cluster.node_size, job.p, 4),
                   training_steps(cfg, job), {s: training(cfg, units, cluster, job, s) for s in ("flat", "two-level")},
                   dev_loss_epoch(cfg, units, cluster, job), generation, export_cost(cfg, units, cluster, job))
