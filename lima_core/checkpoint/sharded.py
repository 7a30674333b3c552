"""A folder of files written by every rank at once (an HF export, a train state), appearing whole.

One way for both writers (hf.save_sharded, state.save_state): `collective_dir` gives every rank
the same temporary folder (atomic's temporary name, so a crash never leaves a half-written
folder at the final path and the next run's remove_stale_temps finds what it left), and rank 0
renames it into place once every rank has written. The files of a model follow transformers:
tensors go into files in order, the next file when this one is full (`shard_files`), named
`model.safetensors` or `model-00001-of-00003.safetensors`, and listed in
`model.safetensors.index.json` when there are several (`write_index`).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from lima_core.checkpoint.atomic import commit_dir, fresh_temp_dir, temp_path, write_json
from lima_core.data.packing import in_order

INDEX = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}
"""What transformers writes in (and expects of) a safetensors header: the tensors are PyTorch's."""


def barrier(group):
    """Wait for every rank of `group`; a single process (group None, or one rank) has none to wait for."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


@contextmanager
def collective_dir(final: str | Path, rank: int, group):
    """`with collective_dir(path, rank, group) as tmp:` every rank writes its files into tmp, one
    folder the ranks share (on a filesystem they all see); after the block, once every rank is
    done, rank 0 puts tmp in place of `path` (replacing an older folder), and every rank leaves
    with the folder there. Collective: every rank of `group` enters it.

    An error in the block skips the rest: `path` stays as it was and the temporary folder stays
    for atomic.remove_stale_temps (another rank may still be writing into it, so no rank deletes it)."""
    final = Path(final)
    if rank == 0:
        fresh_temp_dir(final)
    barrier(group)  # the folder exists before any rank writes into it
    yield temp_path(final)
    barrier(group)  # every rank's files are written
    if rank == 0:
        commit_dir(temp_path(final), final)
    barrier(group)  # the folder is in place for every rank


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def shard_name(i: int, n: int) -> str:
    """transformers' name of file i (from 0) of a model in n files."""
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def shard_files(sizes: list[int], max_shard_bytes: int) -> list[tuple[str, list[int]]]:
    """The files of a model whose tensors (or FSDP units) have these byte sizes, in order: each
    file's name and the indices of the items it holds, at most max_shard_bytes per file but for
    an item larger than that, which gets a file of its own."""
    groups = in_order(sizes, max_shard_bytes)
    return [(shard_name(i, len(groups)), members) for i, members in enumerate(groups)]


def write_index(folder: Path, weight_map: dict[str, str], total_size: int):
    """The index of a model in several files (tensor name -> file name, and the tensors' bytes);
    a model in one file has none, as transformers writes it."""
    if len(set(weight_map.values())) > 1:
        write_json(folder / INDEX, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int):
    """All of a model's tensors (in their order) as safetensors files in `folder`, with the index."""
    keys = list(tensors)
    weight_map = {}
    for name, members in shard_files([nbytes(tensors[k]) for k in keys], max_shard_bytes):
        part = {keys[i]: tensors[keys[i]] for i in members}
        save_file(part, folder / name, metadata=SAFETENSORS_METADATA)
        weight_map.update(dict.fromkeys(part, name))
    write_index(folder, weight_map, sum(nbytes(t) for t in tensors.values()))
