"""How long each part of LIMA's run takes on a cluster, from the bytes it sends over each link
(traffic) and the FLOPs it computes, so that layouts can be compared before anyone runs them.

Each part of the run lasts as long as its busiest resource (compute at `--mfu`, NVLink, the NIC,
HBM, the links' bytes as `Traffic.link_bytes` splits them), assuming they all work at once: the
gathers are prefetched beside compute and NCCL pipelines its NVLink and NIC phases. At line rate
that is an all-gather over 8 x 8 at about 450 GB/s bus bandwidth; users measure 100-230 GB/s on
2 x 8 H100 (NVIDIA/nccl#2409, where ~470 was expected) and ~200 GB/s for an all-gather on 256
H100 (NVIDIA/nccl#1218): far above the one-NIC ring's 50 GB/s, which only a node's 8 NICs
together can give, and below line rate, so the network times are lower bounds (the plan prints
the run at the measured ~200 GB/s too). Decoding on the node layout is bound by HBM (each step
reads the GPU's share of the weights and its KV cache) plus the latency of its 2 all-reduces per
Block (`--nvlink-latency-us`).

Not modelled: the latency of the gather layout's collectives (tens of microseconds each, against
a transfer of a tenth of a second a step), and attention's FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lima_core.config import TrainConfig
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.planning.cluster import Cluster
from lima_core.parallel.planning.memory import BYTES, UnitShape, kv_cache_bytes, node_copy_params
from lima_core.parallel.planning.traffic import (
    FLAG_BYTES,
    Traffic,
    dev_loss,
    every_unit_gathered,
    export,
    gather_decode,
    node_decode,
    train_step,
)

MEASURED_BUS_GBS = 200
"""All-gather bus bandwidth users measure on 256 H100 (NVIDIA/nccl#1218), GB/s."""


@dataclass(frozen=True)
class Job:
    """LIMA's run as the planner sees it (each field a flag of the planner)."""

    seq: int = 2048
    micro_batch: int = 1
    checkpointing: str = "block"
    param_dtype: str = "bf16"
    moment_dtype: str = "fp32"
    mfu: float = 0.4
    peak_tflops: float = 989.0
    examples: int = 1030
    epochs: int = 15
    tokens_per_example: int = 650
    dev_prompts: int = 50
    dev_prompt_tokens: int = 512
    max_new_tokens: int = 2048
    window: tuple[int, int] = (5, 10)
    exports: int | None = None
    write_gbs: float = 2.0

    @property
    def p(self) -> int:
        return BYTES[self.param_dtype]

    @property
    def flops(self) -> float:
        """What one GPU computes a second at the job's MFU."""
        return self.peak_tflops * 1e12 * self.mfu

    @property
    def window_epochs(self) -> int:
        return self.window[1] - self.window[0] + 1

    @property
    def export_count(self) -> int:
        return self.exports if self.exports is not None else self.window_epochs + (self.epochs > self.window[1])


@dataclass(frozen=True)
class Cost:
    """How long a part of the run takes, what bounds it, and the bytes a GPU sends over each link."""

    seconds: float
    bound: str
    nvlink_bytes: float = 0.0
    nic_bytes: float = 0.0

    def __mul__(self, times: float) -> Cost:
        return Cost(self.seconds * times, self.bound, self.nvlink_bytes * times, self.nic_bytes * times)


def busiest(traffic: Traffic, compute: float = 0.0, hbm_bytes: float = 0.0) -> Cost:
    """A part as long as its busiest resource: compute, NVLink, the NIC and HBM work at once."""
    nvlink, nic = traffic.link_bytes()
    seconds = {"compute": compute, **traffic.cluster.seconds(nvlink, nic, hbm_bytes)}
    bound = max(seconds, key=seconds.get)
    return Cost(seconds[bound], bound, nvlink, nic)


def training_steps(cfg: ModelConfig, job: Job) -> int:
    """Optimizer steps of the run: each epoch's examples in LIMA's global batches."""
    return math.ceil(job.examples / TrainConfig().global_batch(cfg.num_params())) * job.epochs


def micro_batches(cfg: ModelConfig, gpus: int, seq: int, tokens_per_example: int) -> int:
    """Packed rows each rank runs per step: LIMA's global batch (TrainConfig.global_batch) packed
    into rows of `seq` tokens (best-fit decreasing lands within 1% of the bound), spread over the
    ranks. Each one costs a full gather in forward and backward and a reduce-scatter."""
    batch = TrainConfig().global_batch(cfg.num_params())
    return math.ceil(math.ceil(batch * tokens_per_example / seq) / gpus)


def step_compute(cfg: ModelConfig, cluster: Cluster, job: Job) -> float:
    """Seconds a GPU computes a training step: 6 N FLOPs a token (8 N with block recomputation),
    the run's tokens spread evenly over its steps and GPUs."""
    recompute = {"none": 6, "block": 8, "selective": 6.7}[job.checkpointing]
    tokens = job.examples * job.epochs * job.tokens_per_example
    return recompute * cfg.num_params() * tokens / (cluster.gpus * job.flops) / training_steps(cfg, job)


def training(cfg: ModelConfig, units: list[UnitShape], cluster: Cluster, job: Job, sharding: str) -> Cost:
    """One training step: its collectives (fp32 gradients) beside its compute."""
    rows = micro_batches(cfg, cluster.gpus, job.seq, job.tokens_per_example)
    traffic = train_step(units, cluster, micro_batches=rows, p=job.p, g=4, sharding=sharding)
    return busiest(traffic, step_compute(cfg, cluster, job))


def dev_loss_epoch(cfg: ModelConfig, units: list[UnitShape], cluster: Cluster, job: Job) -> Cost:
    """An epoch's dev loss: the dev set packed into rows of `seq`, a forward (2 N a token) each."""
    rows = math.ceil(job.dev_prompts * job.tokens_per_example / job.seq)
    compute = math.ceil(rows / cluster.gpus) * 2 * cfg.num_params() * job.seq / job.flops
    return busiest(dev_loss(units, cluster, rows=rows, p=job.p), compute)


@dataclass(frozen=True)
class Generation:
    """An epoch of dev generations on one layout, and what it holds beside the train state."""

    layout: str
    epoch: Cost
    per_token: float
    """Seconds of a decode step."""
    rows: int
    """Prompts a GPU decodes (gather) or a node decodes (node)."""
    kv_cache: int
    copy: int = 0
    """Bytes a GPU holds of the node's copy."""
    gather: Cost | None = None
    """The node layout's one gather of the model an epoch."""


def decoded_weights(cfg: ModelConfig, params: int, p: int) -> int:
    """Bytes a forward reads of `params` parameters: all but the untied embedding, of which it
    reads only its rows."""
    return (params - cfg.vocab_size * cfg.dim * (not cfg.tie_embeddings)) * p


def gather_generation(cfg: ModelConfig, units: list[UnitShape], cluster: Cluster, job: Job) -> Generation:
    """Every rank decodes ceil(P / W) prompts as one batch for max_new_tokens steps (the longest
    answer), each step gathering every unit over "world"; it also reads the whole model and its
    KV cache (half full on average) from HBM, and the busier of the two bounds it."""
    rows, T, S = math.ceil(job.dev_prompts / cluster.gpus), job.dev_prompt_tokens, job.max_new_tokens
    cache = kv_cache_bytes(cfg, rows, T + S, cfg.n_kv_heads, job.p)
    hbm = S * (decoded_weights(cfg, cfg.num_params(), job.p) + cache * (T + S / 2) / (T + S))
    epoch = busiest(gather_decode(units, cluster, steps=S, p=job.p), hbm_bytes=hbm)
    return Generation("gather", epoch, epoch.seconds / S, rows, cache)


def all_reduce_seconds(traffic: Traffic) -> float:
    """The node all-reduces of `traffic`: each one NVLink latency, plus their bytes over NVLink."""
    key = ("dev_generation", "all_reduce", "node")
    if key not in traffic.flows:
        return 0.0
    c, calls = traffic.cluster, traffic.flows[key][0]
    return calls * c.nvlink_latency_us * 1e-6 + c.seconds(nvlink_bytes=traffic.sent_bytes(key))["NVLink"]


def node_generation(cfg: ModelConfig, units: list[UnitShape], cluster: Cluster, job: Job) -> Generation:
    """Every unit gathered once over "world" into the node's tensor-parallel copy; each node
    decodes ceil(P / N) prompts: the prompts' forward (compute- or HBM-bound), then a step a
    token that reads the GPU's share of the weights and of the KV cache (half full on average)
    from HBM and waits for 2 all-reduces per Block and the flag's."""
    L, rows, p = cluster.node_size, math.ceil(job.dev_prompts / cluster.nodes), job.p
    T, S = job.dev_prompt_tokens, job.max_new_tokens
    weights = decoded_weights(cfg, node_copy_params(cfg, L), p)
    cache = kv_cache_bytes(cfg, rows, T + S, cfg.n_kv_heads // L, p)
    reads = cluster.seconds(hbm_bytes=weights + cache * (T + S / 2) / (T + S))["HBM"]
    step = Traffic(cluster)
    step.add("dev_generation", "all_reduce", "node", rows * cfg.dim * p, 2 * cfg.n_layers)
    step.add("dev_generation", "all_reduce", "node", FLAG_BYTES)
    prefill = max(2 * weights / p * rows * T / job.flops, cluster.seconds(hbm_bytes=weights)["HBM"])
    gather = busiest(every_unit_gathered(units, cluster, "dev_generation", times=1, p=p))
    traffic = node_decode(units, cfg, cluster, rows=rows, prompt_tokens=T, steps=S, p=p)
    seconds = gather.seconds + prefill + (S - 1) * reads + all_reduce_seconds(traffic)
    nvlink, nic = traffic.link_bytes()
    return Generation("node", Cost(seconds, "HBM", nvlink, nic), reads + all_reduce_seconds(step), rows, cache,
                      node_copy_params(cfg, L) * p, gather)


def export_bytes(cfg: ModelConfig, dtype: str = "bf16") -> int:
    """Bytes of one HF export's safetensors (the tensors; headers and configs are kilobytes)."""
    return cfg.num_params() * BYTES[dtype]


def export_cost(cfg: ModelConfig, units: list[UnitShape], cluster: Cluster, job: Job,
                file_bytes: int = 5 * 2**30) -> tuple[Cost, float]:
    """One export: (the gather of every unit, the seconds of the writes: 5 GiB files written by
    the ranks in turn, each rank at `write_gbs` GB/s, a shared filesystem taking every rank's
    writes at once)."""
    size = export_bytes(cfg, job.param_dtype)
    files = math.ceil(size / file_bytes)
    write = math.ceil(files / cluster.gpus) * min(size, file_bytes) / (job.write_gbs * 1e9)
    return busiest(export(units, cluster, e=job.p)), write


def bus_gbs(cluster: Cluster) -> float:
    """The bus bandwidth (nccl-tests' busbw: (W - 1) / W of the buffer over the time) of a world
    all-gather in this model, GB/s."""
    nvlink, nic = Traffic(cluster, {("", "all_gather", "world"): [1, 10**9]}).link_bytes()
    seconds = max(cluster.seconds(nvlink, nic).values())
    return (cluster.gpus - 1) / cluster.gpus / seconds

