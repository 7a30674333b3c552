"""Memory and communication plan of lima-core's FSDP for a model on a cluster.

    python -m lima_core.plan --model llama-65b --gpus 64 --gpu-memory 80

Per GPU: fp32 master parameter shard, fp32 gradient shard, AdamW moments (2 x fp32), gathered
units in flight (the unit computing, the one prefetched, and a unit's full gradient buffer),
and activations of one micro-batch. Activations are counted per token from the tensors
autograd saves (measured on the reference CPU path, tests/test_plan.py):
  per block, no checkpointing: 4 d + 4 f + 4 h*hd + 3 kv*hd values (norm inputs/outputs,
  q/k/v and their rotations, attention output, the SwiGLU intermediates);
  head: 2 d values plus the fp32 logits row (V);
  "block" keeps each block's input (d) and recomputes one block at a time;
  "selective" also keeps the matmul outputs (q, k, v, attention, wo, gate, up, down).
Communication per step and rank (ring collectives move (G-1)/G of the buffer): all-gather of
every unit in forward and again in backward (but the embedding and the head), and a
reduce-scatter of every unit's gradient, per micro-batch.
Known limits: FlashAttention's workspace and allocator fragmentation are not modelled.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from lima_core.config import ModelConfig

BYTES = {"fp32": 4, "bf16": 2}


@dataclass
class Plan:
    gpus: int
    params: int  # bytes per GPU, each part
    grads: int
    optimizer: int
    in_flight: int
    activations: int
    gather_bytes: int  # bytes each rank receives per step
    reduce_bytes: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.in_flight + self.activations


def unit_sizes(cfg: ModelConfig) -> list[int]:
    """Parameter counts of the FSDP units in forward order (see fsdp._unit_params)."""
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    block = attn + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim
    embed = cfg.vocab_size * cfg.dim
    if cfg.tie_embeddings:
        return [embed + cfg.dim] + [block] * cfg.n_layers
    return [embed] + [block] * cfg.n_layers + [cfg.dim + cfg.vocab_size * cfg.dim]


def activation_values_per_token(cfg: ModelConfig, checkpointing: str) -> float:
    d, f, hq, hkv = cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    full_block = 4 * d + 4 * f + 4 * hq + 3 * hkv
    head = 2 * d + 2 * cfg.head_dim  # norm in/out, rotary cos/sin (shared by all blocks)
    if checkpointing == "none":
        return cfg.n_layers * full_block + head
    if checkpointing == "block":
        return cfg.n_layers * d + full_block + head
    if checkpointing == "selective":
        kept = d + 2 * hq + 2 * hkv + 2 * d + 3 * f
        return cfg.n_layers * kept + (full_block - kept + d) + head
    raise ValueError(f"--checkpointing must be none, block or selective, got {checkpointing!r}")


def plan(cfg: ModelConfig, gpus: int, *, seq: int = 2048, micro_batch: int = 1, checkpointing: str = "block",
         param_dtype: str = "bf16") -> Plan:
    sizes = unit_sizes(cfg)
    shard = sum(math.ceil(n / gpus) for n in sizes)
    p = BYTES[param_dtype]
    tokens = seq * micro_batch
    acts = activation_values_per_token(cfg, checkpointing) * tokens * p + cfg.vocab_size * tokens * 4
    ring = (gpus - 1) / gpus
    gathered = sum(sizes[1:-1]) if not cfg.tie_embeddings else sum(sizes[1:])
    return Plan(gpus, params=4 * shard, grads=4 * shard, optimizer=8 * shard,
                in_flight=3 * max(sizes) * p if gpus > 1 else 0, activations=int(acts),
                gather_bytes=int(ring * (sum(sizes) + gathered) * p),
                reduce_bytes=int(ring * sum(sizes) * 4))


def smallest_cluster(cfg: ModelConfig, memory_bytes: float, step: int = 8, **kw) -> int | None:
    """The smallest multiple of `step` GPUs (or 1, 2, 4) whose plan fits in memory_bytes each."""
    for gpus in [1, 2, 4] + list(range(8, 4097, step)):
        if plan(cfg, gpus, **kw).total <= memory_bytes:
            return gpus
    return None


def lima_time(cfg: ModelConfig, p: Plan, *, mfu: float, peak_tflops: float, link_gbps: float,
              examples: int = 1030, epochs: int = 15, tokens_per_example: int = 650, checkpointing: str = "block"):
    """Seconds for LIMA's run: compute at `mfu` of peak (6 N per token, 8 N with recomputation),
    plus communication not hidden behind compute (the larger of the two per step)."""
    recompute = {"none": 6, "block": 8, "selective": 6.7}[checkpointing]
    tokens = examples * epochs * tokens_per_example
    compute = recompute * cfg.num_params() * tokens / (p.gpus * peak_tflops * 1e12 * mfu)
    steps = math.ceil(examples / 32) * epochs
    comm = steps * (p.gather_bytes + p.reduce_bytes) / (link_gbps * 1e9 / 8)
    return max(compute, comm), compute, comm


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lima_core.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-65b")
    ap.add_argument("--gpus", type=int, default=64)
    ap.add_argument("--gpu-memory", type=float, default=80, help="GiB per GPU")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--checkpointing", default="block", choices=["none", "block", "selective"])
    ap.add_argument("--param-dtype", default="bf16", choices=list(BYTES))
    ap.add_argument("--mfu", type=float, default=0.4)
    ap.add_argument("--peak-tflops", type=float, default=989, help="dense bf16 peak per GPU (H100 SXM: 989)")
    ap.add_argument("--link-gbps", type=float, default=400, help="per-GPU network bandwidth, Gbit/s")
    a = ap.parse_args(argv)
    cfg = ModelConfig.from_name(a.model)
    kw = dict(seq=a.seq, micro_batch=a.micro_batch, checkpointing=a.checkpointing, param_dtype=a.param_dtype)
    p = plan(cfg, a.gpus, **kw)
    gib = 2**30
    print(f"{a.model}: {cfg.num_params() / 1e9:.1f}B parameters, {len(unit_sizes(cfg))} FSDP units, {a.gpus} GPUs, "
          f"seq {a.seq} x micro-batch {a.micro_batch}, checkpointing {a.checkpointing}, compute in {a.param_dtype}")
    for name in ("params", "grads", "optimizer", "in_flight", "activations"):
        print(f"  {name:<12} {getattr(p, name) / gib:8.2f} GiB")
    print(f"  {'total':<12} {p.total / gib:8.2f} GiB of {a.gpu_memory:.0f} GiB: "
          f"{'fits' if p.total <= a.gpu_memory * gib else 'does NOT fit'}")
    print(f"per step and rank: all-gather {p.gather_bytes / gib:.1f} GiB, reduce-scatter {p.reduce_bytes / gib:.1f} GiB "
          f"(one micro-batch per rank)")
    smallest = smallest_cluster(cfg, a.gpu_memory * gib, **kw)
    print(f"smallest cluster that fits: {smallest} GPUs")
    total, compute, comm = lima_time(cfg, p, mfu=a.mfu, peak_tflops=a.peak_tflops, link_gbps=a.link_gbps,
                                     checkpointing=a.checkpointing)
    print(f"LIMA (1,030 examples x 15 epochs, ~650 tokens each): {total / 3600:.2f} h "
          f"(compute {compute / 3600:.2f} h at MFU {a.mfu}, communication {comm / 3600:.2f} h at {a.link_gbps} Gbit/s)")


if __name__ == "__main__":
    main()
