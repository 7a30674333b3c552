"""The bytes every collective of the run moves, written as formulas so that a plan needs no run,
and held to what a run counts: tests/parallel/test_plan_bytes.py compares them with a 2 x 2 gloo
run's ByteCounter, call for call.

Every collective of the run, per (phase, collective, level) as the run's ByteCounter counts them
(lima_core.parallel.topology; `Traffic`): levels "world" (every rank), "node" (the L ranks of a
node) and "cross" (one rank a node, N nodes); buffers padded as FSDP pads a unit
(ceil(n / W) * W values); a rank sends (G - 1) / G of a buffer over a level of G ranks, twice
that for an all-reduce. `train_step`, `dev_loss`, `gather_decode`, `node_decode` and `export`
are the formulas of FSDP's collective list (lima_core.parallel.fsdp) and of the decode layouts.

Over the links (`Traffic.link_bytes`): "node" bytes go over NVLink, "cross" bytes over each
GPU's own NIC, and a "world" collective is split as NCCL's hierarchical algorithms move it: each
node imports (N - 1) / N of the buffer, spread over its L NICs, so a GPU's NIC carries
(N - 1) / N * buffer / L and NVLink the rest, (L - 1) / L * buffer (the two add up to the
counted (W - 1) / W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lima_core.model.shapes import ModelConfig
from lima_core.parallel.planning.cluster import Cluster
from lima_core.parallel.planning.memory import UnitShape

FLAG_BYTES = 4
"""The decode core's "anyone still decoding" flag: one int32, all-reduced every step."""
LONGEST_BYTES = 8
"""The decode core's longest prompt: one int64, all-reduced once a generation."""
NORM_BYTES = 8
"""clip_grad_norm_'s squared norm: one float64, all-reduced once a step."""

Key = tuple[str, str, str]  # (phase, collective, level), as ByteCounter keys its counts


@dataclass
class Traffic:
    """One rank's collectives in a part of the run, in ByteCounter's units: per (phase,
    collective, level), the calls and the bytes of their buffers. A level of one rank moves
    nothing and is not counted, as in Collectives."""

    cluster: Cluster
    flows: dict[Key, list[int]] = field(default_factory=dict)  # key -> [calls, buffer bytes]

    def add(self, phase: str, collective: str, level: str, buffer_bytes: int, calls: int = 1):
        if self.cluster.size(level) > 1 and calls:
            flow = self.flows.setdefault((phase, collective, level), [0, 0])
            flow[0] += calls
            flow[1] += calls * buffer_bytes

    def __add__(self, other: Traffic) -> Traffic:
        total = Traffic(self.cluster, {k: list(v) for k, v in self.flows.items()})
        for (phase, collective, level), (calls, buffer) in other.flows.items():
            flow = total.flows.setdefault((phase, collective, level), [0, 0])
            flow[0] += calls
            flow[1] += buffer
        return total

    def __mul__(self, times: int) -> Traffic:
        return Traffic(self.cluster, {k: [calls * times, buffer * times] for k, (calls, buffer) in self.flows.items()})

    def sent_bytes(self, key: Key) -> float:
        """What this rank sends over the level's links: (G - 1) / G of the buffers (x2 all-reduce)."""
        ranks, buffer = self.cluster.size(key[2]), self.flows[key][1]
        return (2 if key[1] == "all_reduce" else 1) * (ranks - 1) / ranks * buffer

    def as_counts(self) -> dict[str, dict]:
        """{"train/all_gather/world": {"calls", "buffer_bytes", "sent_bytes"}, ...}: ByteCounter.as_dict's form."""
        return {"/".join(key): {"calls": calls, "buffer_bytes": buffer, "sent_bytes": self.sent_bytes(key)}
                for key, (calls, buffer) in sorted(self.flows.items())}

    def link_bytes(self) -> tuple[float, float]:
        """(NVLink, NIC) bytes this rank sends: "node" over NVLink, "cross" over its NIC, and a
        "world" collective as NCCL's hierarchical algorithms move it, (N - 1) / N of the buffer
        into each node over its L NICs, (L - 1) / L over NVLink."""
        N, L = self.cluster.nodes, self.cluster.node_size
        nvlink = nic = 0.0
        for (phase, collective, level), (calls, buffer) in self.flows.items():
            times = 2 if collective == "all_reduce" else 1
            if level == "node":
                nvlink += self.sent_bytes((phase, collective, level))
            elif level == "cross":
                nic += self.sent_bytes((phase, collective, level))
            else:
                nic += times * (N - 1) / N * buffer / L
                nvlink += times * (L - 1) / L * buffer
        return nvlink, nic


def train_step(units: list[UnitShape], cluster: Cluster, *, micro_batches: int, p: int, g: int,
               sharding: str) -> Traffic:
    """One training step of `micro_batches` rows a rank. Per micro-batch: the forward gathers
    every unit over "world"; the backward gathers each regathered unit again, over "world"
    (flat) or "node" (two-level: from the node's partitions); each unit's gradient is
    reduce-scattered over "world" (flat, and kept units in both), or over "node" and then its
    [N, c] node sum over "cross" (two-level). Per step: clip_grad_norm_'s float64 all-reduce.
    Two-level on one node, or nodes of one rank, is flat (it has no second level)."""
    t = Traffic(cluster)
    two_level = sharding == "two-level" and cluster.nodes > 1 and cluster.node_size > 1
    W, L, M = cluster.gpus, cluster.node_size, micro_batches
    for u in units:
        padded = u.padded(W)
        t.add("train", "all_gather", "world", padded * p, M)
        if u.regathered:
            t.add("train", "all_gather", "node" if two_level else "world", padded * p, M)
        if two_level and not u.kept:
            t.add("train", "reduce_scatter", "node", padded * g, M)
            t.add("train", "reduce_scatter", "cross", padded // L * g, M)
        else:
            t.add("train", "reduce_scatter", "world", padded * g, M)
    t.add("train", "all_reduce", "world", NORM_BYTES)
    return t


def every_unit_gathered(units: list[UnitShape], cluster: Cluster, phase: str, *, times: int, p: int) -> Traffic:
    """Every unit gathered `times` over "world" in a dtype of p bytes: what a forward without
    grad does (the units kept for a backward are freed at the root's end), an export, and the
    node layout's copy."""
    t = Traffic(cluster)
    for u in units:
        t.add(phase, "all_gather", "world", u.padded(cluster.gpus) * p, times)
    return t


def dev_loss(units: list[UnitShape], cluster: Cluster, *, rows: int, p: int) -> Traffic:
    """An epoch's dev loss: this rank's ceil(rows / W) packed dev rows, a forward each."""
    return every_unit_gathered(units, cluster, "dev_loss", times=math.ceil(rows / cluster.gpus), p=p)


def export(units: list[UnitShape], cluster: Cluster, *, e: int) -> Traffic:
    """One HF export: every unit gathered once over "world" in the export dtype (e bytes)."""
    return every_unit_gathered(units, cluster, "export", times=1, p=e)


def gather_decode(units: list[UnitShape], cluster: Cluster, *, steps: int, p: int) -> Traffic:
    """An epoch's dev generation on the gather layout: `steps` forwards of the sharded model
    (the prompts', then one a new token; steps is the longest answer of any rank, in tokens,
    its stop token included), each gathering every unit over "world"; the longest prompt
    all-reduced once over "world", and the "anyone decoding" flag once a step. Not here: on
    CUDA with dev_decode auto, the least free memory (one int64 over "world") that chooses the
    layout."""
    t = every_unit_gathered(units, cluster, "dev_generation", times=steps, p=p)
    t.add("dev_generation", "all_reduce", "world", LONGEST_BYTES)
    t.add("dev_generation", "all_reduce", "world", FLAG_BYTES, steps)
    return t


def node_decode(units: list[UnitShape], cfg: ModelConfig, cluster: Cluster, *, rows: int, prompt_tokens: int,
                steps: int, p: int) -> Traffic:
    """An epoch's dev generation on the node layout, for a rank of a node decoding `rows` rows
    (its node's prompts, or one idle row) whose longest prompt is `prompt_tokens` tokens, for
    `steps` steps (the node's longest answer): every unit gathered once over "world" into the
    copy; per forward (the prompts' of rows x prompt_tokens tokens, then steps - 1 of rows x 1)
    2 all-reduces per Block over "node" of the sublayer's output [rows, tokens, dim]; the longest
    prompt all-reduced once over "node" and the flag once a step. Nothing crosses nodes after
    the gather. Not here: on CUDA with dev_decode auto, the least free memory (one int64 over
    "world") that chooses the layout."""
    t = every_unit_gathered(units, cluster, "dev_generation", times=1, p=p)
    sublayers = 2 * cfg.n_layers
    t.add("dev_generation", "all_reduce", "node", rows * prompt_tokens * cfg.dim * p, sublayers)  # the prompts
    t.add("dev_generation", "all_reduce", "node", rows * cfg.dim * p, sublayers * (steps - 1))  # a token a row
    t.add("dev_generation", "all_reduce", "node", LONGEST_BYTES)
    t.add("dev_generation", "all_reduce", "node", FLAG_BYTES, steps)
    return t
