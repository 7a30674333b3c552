"""A rank of the multi-process FSDP tests (launched by torchrun from tests/parallel/test_fsdp.py
and tests/parallel/test_two_level.py).

    torchrun --standalone --nproc_per_node N tests/parallel/dist_worker.py OUT {ours,fsdp2} [CHECKPOINTING [tied]]
    torchrun --standalone --nproc_per_node N tests/parallel/dist_worker.py OUT layouts NODE_SIZE

ours, fsdp2: trains the tiny test model for STEPS steps on fixed random batches, sharded with
lima-core's FSDP or with PyTorch's FSDP2, and writes (rank 0) OUT/losses.json and
OUT/weights.safetensors, plus every rank's held bytes in OUT/bytes-<rank>.json.

layouts: on nodes of NODE_SIZE ranks, in one launch (4 gloo ranks are slow to start): the same
training with flat and with two-level sharding (OUT/<sharding>/losses.json, weights.safetensors);
and, per sharding and dtype setting of COUNTED, one counted step (OUT/counts-<setting>-<sharding>-<rank>.json:
the ByteCounter's counts of one forward-backward, the clip and an export, and the micro-batches
this rank ran) with the shard gradients before the clip (grads-...-<rank>.safetensors).
"""

import gc
import json
import sys
from pathlib import Path

import helpers
import torch
import torch.distributed as dist
from helpers import TINY, build_optimizer, tiny_model
from safetensors.torch import save_file

from lima_core.data.encode import Example
from lima_core.data.packing import shard_batch
from lima_core.model.llama import Llama
from lima_core.parallel.topology import ByteCounter, Collectives, build_topology
from lima_core.train.loop import forward_backward
from lima_core.train.optim import lr_at, set_lr

STEPS, LR, LR_END, BETAS, WD, CLIP, MAX_LEN = 10, 1e-3, 1e-4, (0.9, 0.95), 0.1, 1.0, 48
COUNTED = {  # setting: (tied head, param_dtype, reduce_dtype) of a counted step
    "untied-fp32": (False, torch.float32, torch.float32),
    "untied-bf16-reduce": (False, torch.float32, torch.bfloat16),
    "tied-bf16": (True, torch.bfloat16, torch.float32),
}


def random_batches(n_steps: int, batch: int = 7, seed: int = 0) -> list[list[Example]]:
    return helpers.random_batches(n_steps, batch, TINY["vocab_size"], seed)


def train_reference(model: Llama, steps: int = STEPS) -> list[float]:
    """Single process, no sharding: the plain loop of lima_core.train before FSDP."""
    opt = build_optimizer(model, LR, BETAS, WD)
    losses = []
    for step, batch in enumerate(random_batches(steps)):
        set_lr(opt, lr_at(step, steps, LR, LR_END))
        loss_sum, n, _ = forward_backward(model, batch, MAX_LEN, torch.device("cpu"), None, torch.float32)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss_sum) / n)
    return losses


def scheduled_forward_backward(model: Llama, opt, step: int, batch: list[Example], group) -> tuple[torch.Tensor, int]:
    """This step's learning rate, then forward and backward of this rank's rows: (summed loss, targets)."""
    set_lr(opt, lr_at(step, STEPS, LR, LR_END))
    loss_sum, n, _ = forward_backward(model, batch, MAX_LEN, torch.device("cpu"), None, torch.float32,
                                      dist.get_rank(group), dist.get_world_size(group), group)
    return loss_sum, n


def train_ours(model: Llama, group, checkpointing: str, **sharding):
    """lima-core's FSDP over `group` (or over `comm=`, `sharding=` when given), torch's AdamW."""
    from lima_core.parallel.parallelize import parallelize

    sharded = parallelize(model, group=group, checkpointing=checkpointing, **sharding)
    opt = torch.optim.AdamW(sharded.param_groups(WD), lr=LR, betas=BETAS, foreach=False)
    losses = []
    for step, batch in enumerate(random_batches(STEPS)):
        loss_sum, n = scheduled_forward_backward(model, opt, step, batch, group)
        sharded.clip_grad_norm_(CLIP)
        opt.step()
        sharded.zero_grad()
        losses.append(float(loss_sum) / n)
    held = {"params": sum(u.shard.numel() * 4 for u in sharded.units),
            "grads": sum(u.grad.numel() * 4 for u in sharded.units),
            "optimizer": sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                             if torch.is_tensor(t) and t.ndim > 0)}
    weights = {}
    for unit in sharded.units:
        weights.update(sharded.full_tensors(unit))
    return losses, weights, held


def count_one_step(comm: Collectives, sharding: str, setting: str, group) -> tuple[dict, dict]:
    """One step's forward-backward (batch 0), clip and export of the tiny model, counted from a
    fresh ByteCounter: ({"counts", "micro_batches", "sharding"}, the shard gradients before the clip)."""
    from lima_core.parallel.parallelize import parallelize

    tied, param_dtype, reduce_dtype = COUNTED[setting]
    model = tiny_model(tie_embeddings=tied)
    comm.counter = ByteCounter()
    sharded = parallelize(model, comm=comm, sharding=sharding, checkpointing="block", param_dtype=param_dtype,
                          reduce_dtype=reduce_dtype)
    batch = random_batches(1, batch=20)[0]  # several rows a rank: counts are per micro-batch
    forward_backward(model, batch, MAX_LEN, torch.device("cpu"), None, param_dtype, dist.get_rank(group),
                     dist.get_world_size(group), group)  # computes in param_dtype, as the trainer does
    grads = {u.name: u.grad.clone() for u in sharded.units}
    sharded.clip_grad_norm_(CLIP)
    with comm.phase("export"):
        for unit in sharded.units:
            sharded.full_tensors(unit)
    micro_batches = len(shard_batch(batch, MAX_LEN, dist.get_rank(group), dist.get_world_size(group)).rows)
    counts = {"counts": comm.counter.as_dict(), "micro_batches": micro_batches, "sharding": sharded.sharding}
    comm.counter = None
    return counts, grads


def layouts(out: Path, group, node_size: int):
    """Flat and two-level training, and the counted steps, on nodes of `node_size` ranks."""
    rank = dist.get_rank(group)
    comm = Collectives(build_topology(group, rank, dist.get_world_size(group), node_size))
    for sharding in ("flat", "two-level"):
        model = tiny_model()
        losses, weights, _ = train_ours(model, group, "block", comm=comm, sharding=sharding)
        model = None
        gc.collect()
        if rank == 0:
            (out / sharding).mkdir(parents=True, exist_ok=True)
            (out / sharding / "losses.json").write_text(json.dumps(losses))
            save_file({k: v.contiguous() for k, v in weights.items()}, out / sharding / "weights.safetensors")
        for setting in COUNTED:
            counts, grads = count_one_step(comm, sharding, setting, group)
            (out / f"counts-{setting}-{sharding}-{rank}.json").write_text(json.dumps(counts))
            save_file(grads, out / f"grads-{setting}-{sharding}-{rank}.safetensors")
            gc.collect()


def train_fsdp2(model: Llama, group) -> tuple[list[float], dict]:
    """The reference: PyTorch's FSDP2 on the same model, same forward_backward, torch's AdamW and clipping."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(group),))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = build_optimizer(model, LR, BETAS, WD, fused=False)  # the reference: torch's AdamW on DTensors
    world = dist.get_world_size(group)
    losses = []
    for step, batch in enumerate(random_batches(STEPS)):
        loss_sum, n = scheduled_forward_backward(model, opt, step, batch, group)
        # FSDP2 averages gradients over ranks; lima-core's loss is already globally normalized.
        for p in model.parameters():
            p.grad.mul_(world)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss_sum) / n)
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    return losses, weights, {}


def main():
    out, mode = Path(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    out.mkdir(parents=True, exist_ok=True)
    if mode == "layouts":
        layouts(out, group, int(sys.argv[3]))
        gc.collect()
        dist.destroy_process_group()
        return
    checkpointing = sys.argv[3] if len(sys.argv) > 3 else "none"
    tied = len(sys.argv) > 4 and sys.argv[4] == "tied"
    model = tiny_model(tie_embeddings=tied)
    if mode == "ours":
        losses, weights, held = train_ours(model, group, checkpointing)
    else:
        losses, weights, held = train_fsdp2(model, group)
    (out / f"bytes-{dist.get_rank()}.json").write_text(json.dumps(held))
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps(losses))
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "weights.safetensors")
    # Free the sharded model (its hooks hold the group) before the group: see lima_core.train.loop.main.
    model = None
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
