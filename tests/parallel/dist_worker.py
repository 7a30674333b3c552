"""A rank of the multi-process FSDP tests (launched by torchrun from tests/parallel/test_fsdp.py).

    torchrun --standalone --nproc_per_node N tests/parallel/dist_worker.py OUT {ours,fsdp2} [CHECKPOINTING [tied]]

Trains the tiny test model for STEPS steps on fixed random batches, sharded with lima-core's
FSDP or with PyTorch's FSDP2, and writes (rank 0) OUT/losses.json and OUT/weights.safetensors,
plus every rank's held bytes in OUT/bytes-<rank>.json.
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
from lima_core.model.llama import Llama
from lima_core.train.loop import forward_backward
from lima_core.train.optim import lr_at, set_lr

STEPS, LR, LR_END, BETAS, WD, CLIP, MAX_LEN = 10, 1e-3, 1e-4, (0.9, 0.95), 0.1, 1.0, 48


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


def train_ours(model: Llama, group, checkpointing: str):
    from lima_core.parallel.parallelize import parallelize

    sharded = parallelize(model, group=group, checkpointing=checkpointing)
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
    checkpointing = sys.argv[3] if len(sys.argv) > 3 else "none"
    tied = len(sys.argv) > 4 and sys.argv[4] == "tied"
    dist.init_process_group("gloo")
    group = dist.group.WORLD
    model = tiny_model(tie_embeddings=tied)
    if mode == "ours":
        losses, weights, held = train_ours(model, group, checkpointing)
    else:
        losses, weights, held = train_fsdp2(model, group)
    out.mkdir(parents=True, exist_ok=True)
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
