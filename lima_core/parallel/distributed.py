"""The ranks of a run: the process group and device torchrun gives (gloo on the CPU, NCCL on
GPUs), or a single process, and where the ranks are (lima_core.parallel.topology: nodes, and
the groups inside and across them). Passed as an argument everywhere; there is no global group.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

from lima_core.parallel.topology import ByteCounter, Collectives, Topology, build_topology, node_size_of


@dataclass(frozen=True)
class Distributed:
    """The data-parallel ranks: group None for a single process."""

    group: object
    rank: int
    world: int
    device: torch.device
    comm: Collectives = Collectives(Topology(0, 1, 1))
    """Every collective of the parallel code, over the topology's levels (world, node, cross)."""

    @property
    def topology(self) -> Topology:
        return self.comm.topology


def init_distributed(device: str, node_size: int = 0, count_bytes: bool = False) -> Distributed:
    """The process group under torchrun (NCCL on CUDA, gloo on CPU) and its topology, nodes of
    `node_size` ranks (0: torchrun's LOCAL_WORLD_SIZE); one process otherwise. With
    `count_bytes`, its collectives count what they move (parallel.topology.ByteCounter). A
    ValueError names a node size that does not divide the world (the group is ended first)."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    counter = ByteCounter() if count_bytes else None
    if "WORLD_SIZE" not in os.environ:
        node_size_of(1, node_size)  # one process is one node of one rank: a larger node size is an error
        return Distributed(None, 0, 1, torch.device("cuda" if cuda else "cpu"), Collectives(Topology(0, 1, 1), counter))
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    group = torch.distributed.group.WORLD
    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    try:
        size = node_size_of(world, node_size)
    except ValueError:
        torch.distributed.destroy_process_group()
        raise
    return Distributed(group, rank, world, local, Collectives(build_topology(group, rank, world, size), counter))


def destroy_distributed(dist: Distributed):
    """End the process groups, once every sharded model is unreachable.

    The sharded model's hooks hold the process group in reference cycles; a gloo group left to
    interpreter finalization aborts the process now and then ("terminate called without an
    active exception", pytorch#179291). Collect them while Python is alive, end the topology's
    node and cross groups one by one and forget them, then end the world group."""
    if dist.group is None:
        return
    gc.collect()
    groups = dist.topology.groups
    for level in ("node", "cross"):
        if groups.get(level) is not None:
            torch.distributed.destroy_process_group(groups[level])
    groups.clear()
    torch.distributed.destroy_process_group()
    gc.collect()
