"""A rank of the collective-folder test (launched by torchrun from tests/checkpoint/test_sharded.py).

    torchrun --standalone --nproc_per_node 2 tests/checkpoint/collective_worker.py FOLDER {write,crash}

Every rank writes rank-<r>.txt into checkpoint.sharded.collective_dir(FOLDER); with `write`,
every rank then finds every rank's file at FOLDER; with `crash`, rank 1 raises inside the
block after writing (rank 0 never gets past the barrier, so FOLDER must stay as it was).
"""

import sys
from pathlib import Path

import torch.distributed as dist

from lima_core.checkpoint.sharded import collective_dir


def main(folder: Path, mode: str):
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    with collective_dir(folder, rank, group) as tmp:
        (tmp / f"rank-{rank}.txt").write_text(f"{rank}\n")
        if mode == "crash" and rank == 1:
            raise RuntimeError("rank 1 fails inside the collective folder (injected)")
    # the block is left with the folder in place, every rank's file in it, for every rank
    assert sorted(p.name for p in folder.iterdir()) == [f"rank-{r}.txt" for r in range(world)]
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
