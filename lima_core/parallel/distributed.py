"""The ranks of a run: the process group and device torchrun gives (gloo on the CPU, NCCL on
GPUs), or a single process. Passed as an argument everywhere; there is no global group.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Distributed:
    """The data-parallel ranks: group None for a single process."""

    group: object
    rank: int
    world: int
    device: torch.device


def init_distributed(device: str) -> Distributed:
    """The process group under torchrun (NCCL on CUDA, gloo on CPU); one process otherwise."""
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "WORLD_SIZE" not in os.environ:
        return Distributed(None, 0, 1, torch.device("cuda" if cuda else "cpu"))
    local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    group = torch.distributed.group.WORLD
    return Distributed(group, torch.distributed.get_rank(group), torch.distributed.get_world_size(group), local)


def destroy_distributed(dist: Distributed):
    """End the process group, once every sharded model is unreachable.

    The sharded model's hooks hold the process group in reference cycles; a gloo group left to
    interpreter finalization aborts the process now and then ("terminate called without an
    active exception", pytorch#179291). Collect them while Python is alive, then destroy."""
    if dist.group is not None:
        gc.collect()
        torch.distributed.destroy_process_group()
