"""Step time of lima-core's FSDP against the same model without FSDP and against FSDP2.

    torchrun --standalone --nproc_per_node 1 bench/fsdp_step.py OUT.json

One training step (forward, backward, clip, AdamW) of the same model on the same packed row,
three ways, timed over the same rounds (median, after warm-up):
- plain: the Llama as it is, torch's fused AdamW (CUDA) or foreach AdamW (CPU);
- lima-fsdp: `parallelize` (block checkpointing off, so the three do the same compute) and the
  trainer's optimizer over the shards;
- fsdp2: PyTorch's `fully_shard` on each block and the root, torch's AdamW.
On CUDA the model has about 1B parameters (hidden 2048, 16 layers, MLP 5504, vocab 32000) in
bf16 compute with fp32 masters; on CPU a tiny one (the harness only). Writes the medians, the
ratios to plain and to FSDP2, and peak memory (CUDA) to OUT.json.
"""

import functools
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.parallelize import parallelize
from lima_core.train.optim import adamw

CUDA = torch.cuda.is_available()
SHAPE = (dict(dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, ffn_dim=5504, vocab_size=32000)
         if CUDA else dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=500))
TOKENS = 4096 if CUDA else 256
ROUNDS, WARMUP = (10, 3) if CUDA else (3, 1)


def build(device) -> Llama:
    with torch.device(device):
        model = Llama(ModelConfig(max_seq_len=TOKENS, **SHAPE))
    model.init_weights(torch.Generator(device).manual_seed(0))
    model.set_residual_dropout(0.0)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The unsharded runs' AdamW groups, by the rule of FSDP.param_groups: decay on matrices only."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def step_fn(model, clip, optimizer, batch, dtype):
    tokens, labels, positions, cu = batch

    def step():
        with torch.autocast(tokens.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss_sum, n = model(tokens, labels, positions=positions, cu_seqlens=cu, max_seqlen=TOKENS)
        (loss_sum / n).backward()
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def timed(step) -> float:
    times = []
    for _ in range(WARMUP + ROUNDS):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:])


def main():
    out = sys.argv[1]
    device = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    dist.init_process_group("nccl" if CUDA else "gloo")
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, SHAPE["vocab_size"], (1, TOKENS), generator=g).to(device)
    batch = (tokens, tokens.roll(-1, 1), torch.arange(TOKENS, device=device)[None],
             torch.tensor([0, TOKENS], dtype=torch.int32, device=device))
    dtype = torch.bfloat16 if CUDA else torch.float32
    results = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "world": dist.get_world_size(),
               "torch": torch.__version__, "params": ModelConfig(**SHAPE).num_params(), "tokens": TOKENS}

    def measure(name, model, clip, optimizer):
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        results[f"{name}_s"] = timed(step_fn(model, clip, optimizer, batch, dtype))
        if CUDA:
            results[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated()

    model = build(device)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-6, fused=CUDA, foreach=not CUDA)
    measure("plain", model, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), opt)
    del model, opt

    model = build(device)
    sharded = parallelize(model, group=group, checkpointing="none", device=device,
                          param_dtype=dtype, reduce_dtype=torch.float32)
    opt = adamw(sharded.param_groups(0.1), 1e-6, (0.9, 0.95))
    measure("lima_fsdp", model, functools.partial(sharded.clip_grad_norm_, 1.0), opt)
    del model, sharded, opt

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = build(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-6, fused=CUDA, foreach=not CUDA)
    measure("fsdp2", model, lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), opt)
    model = opt = None

    results["lima_fsdp_vs_plain"] = results["plain_s"] / results["lima_fsdp_s"]
    results["lima_fsdp_vs_fsdp2"] = results["fsdp2_s"] / results["lima_fsdp_s"]
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(results, indent=2))
    import gc

    gc.collect()  # free what holds the process group before destroying it (see lima_core.train.loop.main)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
