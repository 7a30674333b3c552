"""Where the ranks are, and every collective the parallel code issues over them.

A cluster is nodes of `node_size` ranks: inside a node the ranks share fast links (NVLink), and
between nodes each rank has its own NIC. Rank r is local rank r % node_size of node
r // node_size (torchrun numbers ranks node by node). Three levels of process group follow:
"world" (every rank), "node" (the ranks of this rank's node) and "cross" (the ranks with this
rank's local rank, one per node: the ranks whose NICs a cross-node collective of a two-level
scheme uses). `build_topology` creates them; every rank must call it, since creating a group is
itself a collective.

`Collectives` issues every collective over a level's group and, when given a `ByteCounter`,
records what each one moved (on in tests and with `--count-bytes`), so the planner's formulas
(lima_core.parallel.planning.traffic) are checked against what the code really asks of the network
(docs/design.md, decision 19). A count is algorithmic, as NCCL's ring and tree algorithms move
data: a collective over G ranks of a buffer of S bytes (the gathered output, the reduced input)
has each rank send (G - 1) / G of S (twice that for an all-reduce: reduce-scatter then
all-gather), whatever the backend does underneath.
"""

from __future__ import annotations

import os
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

LEVELS = ("world", "node", "cross")

_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Topology:
    """This rank's place in the cluster and the process group of each level (None: one process)."""

    rank: int
    world: int
    node_size: int
    groups: dict[str, object] = field(default_factory=dict)

    @property
    def nodes(self) -> int:
        return self.world // self.node_size

    @property
    def node(self) -> int:
        return self.rank // self.node_size

    @property
    def local_rank(self) -> int:
        return self.rank % self.node_size

    def size(self, level: str) -> int:
        """Ranks in this rank's group of `level`."""
        return {"world": self.world, "node": self.node_size, "cross": self.nodes}[level]

    def group(self, level: str):
        return self.groups.get(level)


def node_size_of(world: int, requested: int) -> int:
    """Ranks per node: as requested (parallel.node_size), else torchrun's LOCAL_WORLD_SIZE, else
    every rank on one node. A ValueError names a size that does not divide the world."""
    size = requested or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if size < 1 or world % size:
        raise ValueError(f"--node-size {size}: the {world} ranks do not split into nodes of {size}")
    return size


def build_topology(group, rank: int, world: int, node_size: int) -> Topology:
    """The three levels' groups (a collective: every rank of `group` calls it with the same node_size)."""
    if group is None:
        return Topology(0, 1, 1)
    nodes = world // node_size
    groups = {"world": group}
    for n in range(nodes):  # new_group is collective: every rank creates every node's group
        members = list(range(n * node_size, (n + 1) * node_size))
        created = dist.new_group(members) if node_size > 1 else None
        if rank in members:
            groups["node"] = created
    for local in range(node_size):
        members = list(range(local, world, node_size))
        created = dist.new_group(members) if nodes > 1 else None
        if rank in members:
            groups["cross"] = created
    return Topology(rank, world, node_size, groups)


@dataclass
class Count:
    calls: int = 0
    buffer_bytes: int = 0
    """The full buffers: what an all-gather produced, what a reduce-scatter or all-reduce reduced."""
    sent_bytes: float = 0.0
    """What this rank sent over the level's links: (G - 1) / G of each buffer (x2 for an all-reduce)."""


@dataclass
class ByteCounter:
    """Bytes moved per (phase, collective, level), on this rank. The phase is what the run is
    doing ("train", "dev_loss", "dev_generation", "export"), set by `Collectives.phase`. Barriers
    and the few small objects exchanged with *_object collectives are not counted."""

    counts: dict[tuple[str, str, str], Count] = field(default_factory=lambda: defaultdict(Count))
    current: str = "train"

    def add(self, collective: str, level: str, ranks: int, buffer_bytes: int):
        count = self.counts[self.current, collective, level]
        count.calls += 1
        count.buffer_bytes += buffer_bytes
        share = (ranks - 1) / ranks * buffer_bytes
        count.sent_bytes += 2 * share if collective == "all_reduce" else share

    def as_dict(self) -> dict[str, dict]:
        """{"train/all_gather/world": {"calls", "buffer_bytes", "sent_bytes"}, ...}, for JSON."""
        return {"/".join(key): vars(n) for key, n in sorted(self.counts.items())}


class Collectives:
    """Every collective of lima-core's parallel code, over a level's group; a level of one rank
    is a copy (or nothing). With a counter, each call is recorded before it is issued."""

    def __init__(self, topology: Topology, counter: ByteCounter | None = None):
        self.topology, self.counter = topology, counter

    @contextmanager
    def phase(self, name: str):
        """Count what the block moves under `name` (nothing happens without a counter)."""
        if self.counter is None:
            yield
            return
        before, self.counter.current = self.counter.current, name
        try:
            yield
        finally:
            self.counter.current = before

    def _record(self, collective: str, level: str, buffer: torch.Tensor) -> bool:
        """Whether the collective has anyone to talk to; counts it when it has."""
        ranks = self.topology.size(level)
        if ranks == 1:
            return False
        if self.counter is not None:
            self.counter.add(collective, level, ranks, buffer.numel() * buffer.element_size())
        return True

    def all_gather(self, output: torch.Tensor, shard: torch.Tensor, level: str = "world", async_op: bool = False):
        """output [G * n] <- every rank's shard [n], in rank order within the level's group."""
        if not self._record("all_gather", level, output):
            output.copy_(shard)
            return None
        return _all_gather(output, shard, group=self.topology.group(level), async_op=async_op)

    def reduce_scatter(self, shard: torch.Tensor, full: torch.Tensor, level: str = "world"):
        """shard [n] <- this rank's n-slice of the sum over the level's ranks of full [G * n]."""
        if not self._record("reduce_scatter", level, full):
            shard.copy_(full)
            return
        _reduce_scatter(shard, full, group=self.topology.group(level))

    def all_reduce(self, tensor: torch.Tensor, level: str = "world", op=dist.ReduceOp.SUM):
        """tensor <- its reduction over the level's ranks, in place."""
        if self._record("all_reduce", level, tensor):
            dist.all_reduce(tensor, op=op, group=self.topology.group(level))
