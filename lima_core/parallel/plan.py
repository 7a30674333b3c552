"""Memory, bytes per link and time of lima-core's FSDP run of LIMA on a cluster of GPU nodes.

    python -m lima_core.plan --model llama-65b --gpus 64 --gpu-memory 80

Memory per GPU: fp32 master parameter shard (and its bf16 copy, which the gathers send, when
computing in bf16), fp32 gradient shard, AdamW moments (2 x fp32, or 2 x bf16 with
`--moment-dtype bf16`), gathered units in flight (the unit computing, the one prefetched, and a
unit's full gradient buffer), and the peak of one micro-batch's activations (`activation_bytes`:
every tensor a training step's forward and backward allocate, parameter gradients aside).
Two-level sharding adds each Block's partition kept from its forward to its backward
(`two_level_bytes`); the node-local decode layout, a tensor-parallel copy and its KV cache
beside the train state (`node_copy_bytes`, `kv_cache_bytes`).

Bytes: every collective of the run, per (phase, collective, level) as the run's ByteCounter
counts them (lima_core.parallel.topology; `Traffic`): levels "world" (every rank), "node" (the L
ranks of a node) and "cross" (one rank a node, N nodes); buffers padded as FSDP pads a unit
(ceil(n / W) * W values); a rank sends (G - 1) / G of a buffer over a level of G ranks, twice
that for an all-reduce. `train_step`, `dev_loss`, `gather_decode`, `node_decode` and `export`
are the formulas of FSDP's collective list (lima_core.parallel.fsdp) and of the decode layouts;
tests/parallel/test_plan_bytes.py holds them to what a 2 x 2 gloo run counts, call for call.

Time (`Cluster`, H100 SXM figures by default): "node" bytes go over NVLink, "cross" bytes over
each GPU's own NIC, and a "world" collective is split as NCCL's hierarchical algorithms move it:
each node imports (N - 1) / N of the buffer, spread over its L NICs, so a GPU's NIC carries
(N - 1) / N * buffer / L and NVLink the rest, (L - 1) / L * buffer (the two add up to the counted
(W - 1) / W). Each part of the run lasts as long as its busiest resource (compute at `--mfu`,
NVLink, the NIC, HBM), assuming they all work at once: the gathers are prefetched beside compute
and NCCL pipelines its NVLink and NIC phases. At line rate that is an all-gather over 8 x 8 at
about 450 GB/s bus bandwidth; users measure 100-230 GB/s on 2 x 8 H100 (NVIDIA/nccl#2409, where
~470 was expected) and ~200 GB/s for an all-gather on 256 H100 (NVIDIA/nccl#1218): far above
the one-NIC ring's 50 GB/s, which only a node's 8 NICs together can give, and below line rate,
so the network times are lower bounds (the plan prints the run at the measured ~200 GB/s too).
Decoding on the node layout is bound by HBM (each step reads the GPU's share of the weights and
its KV cache) plus the latency of its 2 all-reduces per Block (`--nvlink-latency-us`).

Around training, at each epoch's end: the HF export (by default the epochs of the selection
window and the last), dev loss, and in the window the dev generations, on the gather layout
(every rank decodes its share of the prompts as one batch, each decode step gathering every
unit) or the node layout (every unit gathered once an epoch into a tensor-parallel copy per
node; each node decodes its share with no collective across nodes).

Activations are those of the plain-torch path (`--kernels torch`, what CPU runs), derived op by
op from what it keeps for backward (the formula is in `activation_bytes`) and checked against
the measured peak on CPU (tests/parallel/test_plan.py). Known limits: the Triton path (the CUDA default)
keeps less: its norms keep their input and 1/rms only (2 d values per Block fewer), and its fused
linear-cross-entropy keeps the head's gradients, computed in forward, instead of the
[tokens, vocab] log-probs. On CPU, packed rows add an [s, s] fp32 attention mask per Block
(CUDA's varlen attention has none). Not modelled: memory a kernel allocates and frees inside one
op (FlashAttention's workspace and backward accumulators; on CPU in bf16, the attention
backward's fp32 buffers), the RNG state torch.utils.checkpoint saves per Block (5 KB), the
reduce dtype's copy of a unit's gradient when it differs from the compute dtype, allocator
fragmentation; the latency of the gather layout's collectives (tens of microseconds each,
against a transfer of a tenth of a second a step), and attention's FLOPs.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch

from lima_core.config import CHECKPOINTING, DTYPES, ConfigError, TrainConfig
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.parallelize import llama_units, unit_numels

BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}
FLAG_BYTES = 4
"""The decode core's "anyone still decoding" flag: one int32, all-reduced every step."""
LONGEST_BYTES = 8
"""The decode core's longest prompt: one int64, all-reduced once a generation."""
NORM_BYTES = 8
"""clip_grad_norm_'s squared norm: one float64, all-reduced once a step."""
MEASURED_BUS_GBS = 200
"""All-gather bus bandwidth users measure on 256 H100 (NVIDIA/nccl#1218), GB/s."""


# ---- memory ----------------------------------------------------------------------------------


@dataclass
class Plan:
    gpus: int
    params: int  # bytes per GPU, each part
    grads: int
    optimizer: int
    in_flight: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.in_flight + self.activations


@dataclass(frozen=True)
class UnitShape:
    """An FSDP unit as the byte formulas need it (the trainer's own list, parallelize.llama_units)."""

    numel: int
    kept: bool
    """Stays gathered from its forward to its backward (the head, the tied embedding): no backward
    gather, and its gradient reduced over "world" in both shardings."""
    regathered: bool
    """Freed after forward and gathered again for backward (the Blocks)."""

    def padded(self, world: int) -> int:
        """The unit's flat buffer as FSDP pads it: a multiple of the world size."""
        return math.ceil(self.numel / world) * world


def fsdp_units(cfg: ModelConfig) -> list[UnitShape]:
    """The FSDP units in forward order, read off the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Llama(cfg)
    specs = llama_units(model)
    return [UnitShape(n, not s.reshard_after_forward, s.reshard_after_forward and s.gather_for_backward)
            for s, n in zip(specs, unit_numels(specs))]


def unit_sizes(cfg: ModelConfig) -> list[int]:
    """Parameter counts of the FSDP units in forward order."""
    return [u.numel for u in fsdp_units(cfg)]


def activation_bytes(cfg: ModelConfig, checkpointing: str, tokens: int, p: int) -> int:
    """Peak bytes of activations in the forward and backward of one micro-batch of T = `tokens`,
    on the plain-torch path in a compute dtype of p bytes; F = 4 bytes for what that path keeps
    in fp32 (norm inputs and statistics, attention logsumexp, logits). Parameter gradients are
    not activations (see `plan`). With d = dim, f = ffn_dim, h = n_heads, hd = head_dim,
    hq = h hd, hkv = n_kv_heads hd, V = vocab_size, L = n_layers, per token:

      norm      = F d + F + 2 p d         an RMSNorm saves its input in fp32 (an fp32 copy when
                                          p < F), 1/rms, x/rms cast back, and weight * that
      saved     = 2 norm + p (2 hq + 2 hkv + 4 f) + F h
                                          a Block without checkpointing: rotated q and k, v, the
                                          attention output and its logsumexp (h per token),
                                          SwiGLU's gate, up, silu(gate) and product
      grad      = p (d + 2 f)             a Block's backward at its widest: the gradients of its
                                          output, of the SwiGLU product and of one factor
      shared    = 2 p hd                  rotary cos and sin, one copy for all Blocks
      head      = F d + F + p d + F d     the final norm (input, 1/rms, x/rms) and the fp32 copy of
                                          its output the logits are computed from
      kept      = saved                   none
                | p d                     block: the Block's input
                | p (3 d + 2 hq + 2 hkv + 2 f) + F h
                                          selective: the input and every matmul and attention
                                          output (q, k, v, attention and logsumexp, wo, gate,
                                          up, down)
      recompute = saved                   none: a Block's tensors in its backward
                | p d + saved - overlap   block: its input and its recomputed saved tensors
                | p d + saved - overlap + p d
                                          selective: the same, and the cached down-projection
                                          output, never consumed, as recomputation stops at the
                                          last tensor backward needs
      overlap   = F d when p == F         the kept input is then the norm's fp32 input itself

    and per micro-batch, W = F V d when p < F (the head weight's fp32 copy the logits are
    computed with), G = F V d when p < F or embeddings are tied (the fp32 weight gradient the
    logits matmul returns; with an untied fp32 head it is the parameter's gradient itself),
    E = p V d with tied embeddings (the head's share of the shared weight's gradient, held by
    autograd until the embedding's share joins it at the end of backward), else 0 each:

      peak = max(T (shared + L kept + head) + max(3 F V T + W, F V T + F d T + W + G),
                 T (shared + (L - 1) kept + recompute + grad) + E,
                 T p d + 2 E)

    The three moments: the head's backward (everything kept; then the fp32 log-probs, their
    gradient and the logits' gradient; or the logits' gradient with those of the hidden states
    and of the weight), the last Block's backward (its whole saved set and gradients, the other
    Blocks' kept tensors), and the embedding's backward (both shares of a tied weight's
    gradient). Not a moment here: the final norm's backward (about 6 F d temporaries over what
    is kept), which can exceed the head's only when V is below about 2 d (no LLaMA shape).
    """
    F = 4
    d, f, h, hd, V, L = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.head_dim, cfg.vocab_size, cfg.n_layers
    hq, hkv = h * hd, cfg.n_kv_heads * hd
    norm = F * d + F + 2 * p * d
    saved = 2 * norm + p * (2 * hq + 2 * hkv + 4 * f) + F * h
    grad = p * (d + 2 * f)
    shared = 2 * p * hd
    head = F * d + F + p * d + F * d
    overlap = F * d if p == F else 0
    if checkpointing == "none":
        kept, recompute = saved, saved
    elif checkpointing == "block":
        kept, recompute = p * d, p * d + saved - overlap
    elif checkpointing == "selective":
        kept = p * (3 * d + 2 * hq + 2 * hkv + 2 * f) + F * h
        recompute = p * d + saved - overlap + p * d
    else:
        raise ValueError(f"--checkpointing must be none, block or selective, got {checkpointing!r}")
    T, tied = tokens, cfg.tie_embeddings
    W = F * V * d if p < F else 0
    G = F * V * d if p < F or tied else 0
    E = p * V * d if tied else 0
    head_backward = T * (shared + L * kept + head) + max(3 * F * V * T + W, F * V * T + F * d * T + W + G)
    block_backward = T * (shared + (L - 1) * kept + recompute + grad) + E
    embedding_backward = T * p * d + 2 * E
    return max(head_backward, block_backward, embedding_backward)


def plan(cfg: ModelConfig, gpus: int, *, seq: int = 2048, micro_batch: int = 1, checkpointing: str = "block",
         param_dtype: str = "bf16", moment_dtype: str = "fp32") -> Plan:
    """Bytes per GPU of training with flat sharding over `gpus` ranks, by part."""
    sizes = unit_sizes(cfg)
    shard = sum(math.ceil(n / gpus) for n in sizes)
    p = BYTES[param_dtype]
    return Plan(gpus, params=(4 + (p if p < 4 else 0)) * shard, grads=4 * shard,
                optimizer=2 * BYTES[moment_dtype] * shard,
                in_flight=3 * max(sizes) * p if gpus > 1 else 0,
                activations=activation_bytes(cfg, checkpointing, seq * micro_batch, p))


def two_level_bytes(units: list[UnitShape], world: int, node_size: int, p: int, g: int) -> int:
    """What two-level sharding holds beside flat's, per GPU: every regathered unit's partition
    (padded / L values in the compute dtype, kept from its forward to its backward, all of them
    at once when backward begins), and while a gradient is reduced its [L, N, c] copy and the
    node's [N, c] sum in the reduce dtype (the largest unit's)."""
    if world == node_size or node_size == 1:
        return 0  # no second level: two-level is flat
    partitions = sum(u.padded(world) // node_size * p for u in units if u.regathered)
    largest = max(u.padded(world) for u in units if not u.kept)
    return partitions + largest * g + largest // node_size * g


def node_copy_params(cfg: ModelConfig, node_size: int) -> int:
    """Parameters a GPU holds of its node's tensor-parallel copy (the GPU with the most): per
    Block its n_heads / L query heads and n_kv_heads / L key-value heads (rows of wq, wk and wv,
    columns of wo), ceil(ffn_dim / L) columns of the MLP, both norms; the embedding, final norm
    and head in full."""
    L = node_size
    attention = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) // L
    block = attention + 3 * cfg.dim * math.ceil(cfg.ffn_dim / L) + 2 * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    return cfg.n_layers * block + cfg.vocab_size * cfg.dim + cfg.dim + head


def node_layout_splits(cfg: ModelConfig, node_size: int) -> bool:
    """Whether the query and key-value heads split evenly over the GPUs of a node (the MLP need not)."""
    return cfg.n_heads % node_size == 0 and cfg.n_kv_heads % node_size == 0


def kv_cache_bytes(cfg: ModelConfig, rows: int, positions: int, kv_heads: int, b: int) -> int:
    """Keys and values of `rows` rows of `positions` slots, `kv_heads` heads a GPU, b bytes a value."""
    return 2 * cfg.n_layers * rows * positions * kv_heads * cfg.head_dim * b


def smallest_cluster(cfg: ModelConfig, memory_bytes: float, step: int = 8, **kw) -> int | None:
    """The smallest multiple of `step` GPUs (or 1, 2, 4) whose plan fits in memory_bytes each."""
    for gpus in [1, 2, 4] + list(range(8, 4097, step)):
        if plan(cfg, gpus, **kw).total <= memory_bytes:
            return gpus
    return None


def micro_batches(cfg: ModelConfig, gpus: int, seq: int, tokens_per_example: int) -> int:
    """Packed rows each rank runs per step: LIMA's global batch (TrainConfig.global_batch) packed
    into rows of `seq` tokens (best-fit decreasing lands within 1% of the bound), spread over the
    ranks. Each one costs a full gather in forward and backward and a reduce-scatter."""
    batch = TrainConfig().global_batch(cfg.num_params())
    return math.ceil(math.ceil(batch * tokens_per_example / seq) / gpus)


# ---- the cluster and the bytes each collective moves -------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """GPUs in nodes and their links: H100 SXM by default (NVLink 4: 900 GB/s a GPU both ways;
    one 400 Gbit/s NIC a GPU; HBM3 at 3.35 TB/s)."""

    gpus: int
    gpus_per_node: int = 8
    nvlink_gbs: float = 450.0
    """NVLink bandwidth a GPU, each way, GB/s."""
    nic_gbps: float = 400.0
    """Network bandwidth a GPU (its own NIC), Gbit/s."""
    hbm_gbs: float = 3350.0
    nvlink_latency_us: float = 5.0
    """One small all-reduce inside a node (assumed: NCCL's low-latency protocol over NVSwitch)."""

    @property
    def node_size(self) -> int:
        return min(self.gpus, self.gpus_per_node)

    @property
    def nodes(self) -> int:
        return self.gpus // self.node_size

    def size(self, level: str) -> int:
        return {"world": self.gpus, "node": self.node_size, "cross": self.nodes}[level]

    def seconds(self, nvlink_bytes: float = 0.0, nic_bytes: float = 0.0, hbm_bytes: float = 0.0) -> dict[str, float]:
        """Seconds each link needs for its bytes."""
        return {"NVLink": nvlink_bytes / (self.nvlink_gbs * 1e9), "NIC": nic_bytes / (self.nic_gbps * 1e9 / 8),
                "HBM": hbm_bytes / (self.hbm_gbs * 1e9)}


Key = tuple[str, str, str]  # (phase, collective, level), as ByteCounter keys its counts


@dataclass
class Traffic:
    """One rank's collectives in a part of the run, in ByteCounter's units: per (phase,
    collective, level), the calls and the bytes of their buffers. A level of one rank moves
    nothing and is not counted, as in Collectives."""

    cluster: Cluster
    flows: dict[Key, list[int]] = field(default_factory=dict)  # key -> [calls, buffer bytes]

    def add(self, phase: str, collective: str, level: str, buffer_bytes: int, calls: int = 1):
        if self.cluster.size(level) > 1 and calls:
            flow = self.flows.setdefault((phase, collective, level), [0, 0])
            flow[0] += calls
            flow[1] += calls * buffer_bytes

    def __add__(self, other: Traffic) -> Traffic:
        total = Traffic(self.cluster, {k: list(v) for k, v in self.flows.items()})
        for (phase, collective, level), (calls, buffer) in other.flows.items():
            flow = total.flows.setdefault((phase, collective, level), [0, 0])
            flow[0] += calls
            flow[1] += buffer
        return total

    def __mul__(self, times: int) -> Traffic:
        return Traffic(self.cluster, {k: [calls * times, buffer * times] for k, (calls, buffer) in self.flows.items()})

    def sent_bytes(self, key: Key) -> float:
        """What this rank sends over the level's links: (G - 1) / G of the buffers (x2 all-reduce)."""
        ranks, buffer = self.cluster.size(key[2]), self.flows[key][1]
        return (2 if key[1] == "all_reduce" else 1) * (ranks - 1) / ranks * buffer

    def as_counts(self) -> dict[str, dict]:
        """{"train/all_gather/world": {"calls", "buffer_bytes", "sent_bytes"}, ...}: ByteCounter.as_dict's form."""
        return {"/".join(key): {"calls": calls, "buffer_bytes": buffer, "sent_bytes": self.sent_bytes(key)}
                for key, (calls, buffer) in sorted(self.flows.items())}

    def link_bytes(self) -> tuple[float, float]:
        """(NVLink, NIC) bytes this rank sends: "node" over NVLink, "cross" over its NIC, and a
        "world" collective as NCCL's hierarchical algorithms move it, (N - 1) / N of the buffer
        into each node over its L NICs, (L - 1) / L over NVLink."""
        N, L = self.cluster.nodes, self.cluster.node_size
        nvlink = nic = 0.0
        for (phase, collective, level), (calls, buffer) in self.flows.items():
            times = 2 if collective == "all_reduce" else 1
            if level == "node":
                nvlink += self.sent_bytes((phase, collective, level))
            elif level == "cross":
                nic += self.sent_bytes((phase, collective, level))
            else:
                nic += times * (N - 1) / N * buffer / L
                nvlink += times * (L - 1) / L * buffer
        return nvlink, nic


def train_step(units: list[UnitShape], cluster: Cluster, *, micro_batches: int, p: int, g: int,
               sharding: str) -> Traffic:
    """One training step of `micro_batches` rows a rank. Per micro-batch: the forward gathers
    every unit over "world"; the backward gathers each regathered unit again, over "world"
    (flat) or "node" (two-level: from the node's partitions); each unit's gradient is
    reduce-scattered over "world" (flat, and kept units in both), or over "node" and then its
    [N, c] node sum over "cross" (two-level). Per step: clip_grad_norm_'s float64 all-reduce.
    Two-level on one node, or nodes of one rank, is flat (it has no second level)."""
    t = Traffic(cluster)
    two_level = sharding == "two-level" and cluster.nodes > 1 and cluster.node_size > 1
    W, L, M = cluster.gpus, cluster.node_size, micro_batches
    for u in units:
        padded = u.padded(W)
        t.add("train", "all_gather", "world", padded * p, M)
        if u.regathered:
            t.add("train", "all_gather", "node" if two_level else "world", padded * p, M)
        if two_level and not u.kept:
            t.add("train", "reduce_scatter", "node", padded * g, M)
            t.add("train", "reduce_scatter", "cross", padded // L * g, M)
        else:
            t.add("train", "reduce_scatter", "world", padded * g, M)
    t.add("train", "all_reduce", "world", NORM_BYTES)
    return t


def every_unit_gathered(units: list[UnitShape], cluster: Cluster, phase: str, *, times: int, p: int) -> Traffic:
    """Every unit gathered `times` over "world" in a dtype of p bytes: what a forward without
    grad does (the units kept for a backward are freed at the root's end), an export, and the
    node layout's copy."""
    t = Traffic(cluster)
    for u in units:
        t.add(phase, "all_gather", "world", u.padded(cluster.gpus) * p, times)
    return t


def dev_loss(units: list[UnitShape], cluster: Cluster, *, rows: int, p: int) -> Traffic:
    """An epoch's dev loss: this rank's ceil(rows / W) packed dev rows, a forward each."""
    return every_unit_gathered(units, cluster, "dev_loss", times=math.ceil(rows / cluster.gpus), p=p)


def export(units: list[UnitShape], cluster: Cluster, *, e: int) -> Traffic:
    """One HF export: every unit gathered once over "world" in the export dtype (e bytes)."""
    return every_unit_gathered(units, cluster, "export", times=1, p=e)


def gather_decode(units: list[UnitShape], cluster: Cluster, *, steps: int, p: int) -> Traffic:
    """An epoch's dev generation on the gather layout: `steps` forwards of the sharded model
    (the prompts', then one a new token; steps is the longest answer of any rank, in tokens,
    its stop token included), each gathering every unit over "world"; the longest prompt
    all-reduced once over "world", and the "anyone decoding" flag once a step. Not here: on
    CUDA with dev_decode auto, the least free memory (one int64 over "world") that chooses the
    layout."""
    t = every_unit_gathered(units, cluster, "dev_generation", times=steps, p=p)
    t.add("dev_generation", "all_reduce", "world", LONGEST_BYTES)
    t.add("dev_generation", "all_reduce", "world", FLAG_BYTES, steps)
    return t


def node_decode(units: list[UnitShape], cfg: ModelConfig, cluster: Cluster, *, rows: int, prompt_tokens: int,
                steps: int, p: int) -> Traffic:
    """An epoch's dev generation on the node layout, for a rank of a node decoding `rows` rows
    (its node's prompts, or one idle row) whose longest prompt is `prompt_tokens` tokens, for
    `steps` steps (the node's longest answer): every unit gathered once over "world" into the
    copy; per forward (the prompts' of rows x prompt_tokens tokens, then steps - 1 of rows x 1)
    2 all-reduces per Block over "node" of the sublayer's output [rows, tokens, dim]; the longest
    prompt all-reduced once over "node" and the flag once a step. Nothing crosses nodes after
    the gather. Not here: on CUDA with dev_decode auto, the least free memory (one int64 over
    "world") that chooses the layout."""
    t = every_unit_gathered(units, cluster, "dev_generation", times=1, p=p)
    sublayers = 2 * cfg.n_layers
    t.add("dev_generation", "all_reduce", "node", rows * prompt_tokens * cfg.dim * p, sublayers)  # the prompts
    t.add("dev_generation", "all_reduce", "node", rows * cfg.dim * p, sublayers * (steps - 1))  # a token a row
    t.add("dev_generation", "all_reduce", "node", LONGEST_BYTES)
    t.add("dev_generation", "all_reduce", "node", FLAG_BYTES, steps)
    return t


# ---- time per part of the run ------------------------------------------------------------------


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
    return math.ceil(job.examples / TrainConfig().global_batch(cfg.num_params())) * job.epochs


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


# ---- the whole run, and the layout to run it with ------------------------------------------------


@dataclass
class RunPlan:
    """Every part of LIMA's run on a cluster, on each layout."""

    cfg: ModelConfig
    cluster: Cluster
    job: Job
    memory: Plan
    two_level: int
    """Bytes two-level sharding holds beside flat's (two_level_bytes)."""
    steps: int
    train: dict[str, Cost]  # sharding -> a step
    dev_loss: Cost  # an epoch
    generation: dict[str, Generation]  # dev_decode -> an epoch; no "node" where the heads do not split
    export: tuple[Cost, float]

    def training_seconds(self, sharding: str) -> float:
        return self.steps * self.train[sharding].seconds

    def run_seconds(self, sharding: str, dev_decode: str) -> float:
        """Training, dev loss every epoch, dev generations in the window, and the exports."""
        gather, write = self.export
        return (self.training_seconds(sharding) + self.job.epochs * self.dev_loss.seconds
                + self.job.window_epochs * self.generation[dev_decode].epoch.seconds
                + self.job.export_count * (gather.seconds + write))

    def train_state(self) -> int:
        """What a GPU holds between steps: the plan without the activations."""
        return self.memory.total - self.memory.activations

    def fits(self, memory_bytes: float, sharding: str = "flat", dev_decode: str | None = None) -> bool:
        if dev_decode is None:
            return self.memory.total + (self.two_level if sharding == "two-level" else 0) <= memory_bytes
        g = self.generation[dev_decode]
        return self.train_state() + g.copy + g.kv_cache <= memory_bytes


def lima_plan(cfg: ModelConfig, cluster: Cluster, job: Job) -> RunPlan:
    units = fsdp_units(cfg)
    memory = plan(cfg, cluster.gpus, seq=job.seq, micro_batch=job.micro_batch, checkpointing=job.checkpointing,
                  param_dtype=job.param_dtype, moment_dtype=job.moment_dtype)
    generation = {"gather": gather_generation(cfg, units, cluster, job)}
    if node_layout_splits(cfg, cluster.node_size):
        generation["node"] = node_generation(cfg, units, cluster, job)
    return RunPlan(cfg, cluster, job, memory, two_level_bytes(units, cluster.gpus, cluster.node_size, job.p, 4),
                   training_steps(cfg, job), {s: training(cfg, units, cluster, job, s) for s in ("flat", "two-level")},
                   dev_loss_epoch(cfg, units, cluster, job), generation, export_cost(cfg, units, cluster, job))


def recommend(run: RunPlan, memory_bytes: float) -> tuple[str, str, str, str]:
    """(sharding, why, dev_decode, why): the faster layout of each that fits."""
    c = run.cluster
    flat, two = run.training_seconds("flat"), run.training_seconds("two-level")
    if c.nodes == 1 or c.node_size == 1:
        sharding, why = "flat", "one level only here, where two-level is flat"
    elif not run.fits(memory_bytes, "two-level"):
        sharding, why = "flat", f"two-level does not fit, {(run.memory.total + run.two_level) / 2**30:.2f} GiB"
    elif two < flat:
        saved = run.train["flat"].nic_bytes - run.train["two-level"].nic_bytes
        sharding, why = "two-level", (f"training {two / 3600:.2f} h against {flat / 3600:.2f} h flat: the backward "
                                      f"gather stays on NVLink, {_size(saved)} a step less over each NIC")
    else:
        sharding, why = "flat", (f"two-level saves no time here, {two / 3600:.2f} h against {flat / 3600:.2f} h, "
                                 f"for {run.two_level / 2**30:.2f} GiB more a GPU")
    gather = run.generation["gather"].epoch.seconds
    if "node" not in run.generation:
        dev, dev_why = "gather", (f"the {run.cfg.n_heads} query and {run.cfg.n_kv_heads} key-value heads do not "
                                  f"split over {c.node_size} GPUs")
    elif not run.fits(memory_bytes, dev_decode="node"):
        dev, dev_why = "gather", "the node copy and its KV cache do not fit beside the train state" + (
            "" if run.fits(memory_bytes, dev_decode="gather") else
            "; nor does the gather layout's KV cache: more GPUs, or a lower --max-new-tokens")
    elif run.generation["node"].epoch.seconds < gather:
        node = run.generation["node"].epoch.seconds
        dev, dev_why = "node", (f"dev generation {_duration(node)} an epoch against {_duration(gather)}: the model "
                                f"crosses the network once an epoch, not once a token")
    else:
        dev, dev_why = "gather", "the node layout saves no time here"
    return sharding, why, dev, dev_why


# ---- the command line ----------------------------------------------------------------------------


def _size(n: float) -> str:
    """Bytes in decimal units, three significant digits (link figures are GB/s)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _count(n: int, thing: str, things: str | None = None) -> str:
    return f"{n} {thing if n == 1 else things or thing + 's'}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 600:
        return f"{seconds:.{1 if seconds < 10 else 0}f} s"
    return f"{seconds / 3600:.2f} h"


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return int(text)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a positive number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError("must be in (0, 1]")
    return value


def parse_args(argv=None) -> tuple[argparse.Namespace, ModelConfig]:
    """The planner's flags (each a setting of the run it plans, or of the cluster) and the model they name."""
    ap = argparse.ArgumentParser(prog="python -m lima_core.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-65b")
    ap.add_argument("--gpus", type=_positive_int, default=64)
    ap.add_argument("--gpu-memory", type=_positive, default=80, help="GiB per GPU")
    ap.add_argument("--gpus-per-node", type=_positive_int, default=8, help="GPUs sharing NVLink (H100 SXM: 8)")
    ap.add_argument("--nvlink-gbs", type=_positive, default=450,
                    help="NVLink bandwidth a GPU, each way, GB/s (H100 SXM, NVLink 4: 900 both ways)")
    ap.add_argument("--nic-gbps", "--link-gbps", type=_positive, default=400,
                    help="network bandwidth a GPU (its own NIC), Gbit/s")
    ap.add_argument("--hbm-gbs", type=_positive, default=3350, help="HBM bandwidth a GPU, GB/s (H100 SXM: 3350)")
    ap.add_argument("--nvlink-latency-us", type=_positive, default=5.0,
                    help="latency of one small all-reduce inside a node, microseconds (assumed)")
    ap.add_argument("--sharding", choices=("flat", "two-level"), default=None,
                    help="plan this training layout only (default: both, and recommend one)")
    ap.add_argument("--dev-decode", choices=("gather", "node"), default=None,
                    help="plan this dev-generation layout only (default: both, and recommend one)")
    ap.add_argument("--seq", type=_positive_int, default=2048)
    ap.add_argument("--micro-batch", type=_positive_int, default=1)
    ap.add_argument("--checkpointing", default="block", choices=CHECKPOINTING)
    ap.add_argument("--param-dtype", default="bf16", choices=list(BYTES))
    ap.add_argument("--moment-dtype", default="fp32", choices=list(BYTES), help="AdamW moments (bf16: native op)")
    ap.add_argument("--mfu", type=_fraction, default=0.4)
    ap.add_argument("--peak-tflops", type=_positive, default=989, help="dense bf16 peak per GPU (H100 SXM: 989)")
    ap.add_argument("--dev-prompts", type=_positive_int, default=50, help="dev conversations (LIMA: 50)")
    ap.add_argument("--dev-prompt-tokens", type=_positive_int, default=512, help="longest dev prompt in tokens")
    ap.add_argument("--max-new-tokens", type=_positive_int, default=2048,
                    help="longest dev answer (sampling.max_new_tokens)")
    ap.add_argument("--epochs", type=_positive_int, default=15)
    ap.add_argument("--window", type=_positive_int, nargs=2, default=(5, 10),
                    help="epochs with dev generations (LIMA: 5-10)")
    ap.add_argument("--exports", type=_positive_int, default=None,
                    help="exports per run (default: the window and the last epoch)")
    ap.add_argument("--write-gbs", type=_positive, default=2.0, help="file write bandwidth per GPU's process, GB/s")
    a = ap.parse_args(argv)
    if a.gpus > a.gpus_per_node and a.gpus % a.gpus_per_node:
        ap.error(f"--gpus {a.gpus} do not make whole nodes of {a.gpus_per_node} (--gpus-per-node)")
    try:
        cfg = ModelConfig.from_name(a.model)
    except ConfigError as e:
        ap.error(str(e))
    if a.dev_decode == "node" and not node_layout_splits(cfg, min(a.gpus, a.gpus_per_node)):
        ap.error(f"--dev-decode node: {a.model}'s heads do not split over {min(a.gpus, a.gpus_per_node)} GPUs")
    return a, cfg


def main(argv=None):
    """Print the plan: memory per GPU, the bytes each part of the run sends over each link, and
    the time of a LIMA run on each layout, with the layout recommended."""
    a, cfg = parse_args(argv)
    job = Job(seq=a.seq, micro_batch=a.micro_batch, checkpointing=a.checkpointing, param_dtype=a.param_dtype,
              moment_dtype=a.moment_dtype, mfu=a.mfu, peak_tflops=a.peak_tflops, epochs=a.epochs,
              dev_prompts=a.dev_prompts, dev_prompt_tokens=a.dev_prompt_tokens, max_new_tokens=a.max_new_tokens,
              window=tuple(a.window), exports=a.exports, write_gbs=a.write_gbs)
    cluster = Cluster(a.gpus, a.gpus_per_node, a.nvlink_gbs, a.nic_gbps, a.hbm_gbs, a.nvlink_latency_us)
    run = lima_plan(cfg, cluster, job)
    memory = a.gpu_memory * 2**30
    choice = recommend(run, memory)
    shardings = [a.sharding] if a.sharding else ["flat", "two-level"]
    decodes = [a.dev_decode] if a.dev_decode else list(run.generation)
    print_memory(run, a.model, memory)
    print_links(cluster)
    print_training(run, shardings)
    print_dev(run, decodes, memory)
    print_exports(run)
    print_totals(run, a.sharding or choice[0], a.dev_decode or choice[2], recommended=choice)


def _fits(held: float, memory: float) -> str:
    return f"{held / 2**30:.2f} GiB in all: {'fits' if held <= memory else 'does NOT fit'}"


def print_memory(run: RunPlan, model: str, memory: float):
    cfg, c, job, p = run.cfg, run.cluster, run.job, run.memory
    print(f"{model}: {cfg.num_params() / 1e9:.1f}B parameters, {len(unit_sizes(cfg))} FSDP units, {c.gpus} GPUs "
          f"({c.nodes} node{'s' * (c.nodes > 1)} of {c.node_size}), seq {job.seq} x micro-batch {job.micro_batch}, "
          f"checkpointing {job.checkpointing}, compute in {job.param_dtype}, AdamW moments in {job.moment_dtype}")
    gib = 2**30
    for name in ("params", "grads", "optimizer", "in_flight", "activations"):
        print(f"  {name:<12} {getattr(p, name) / gib:8.2f} GiB")
    print(f"  {'total':<12} {p.total / gib:8.2f} GiB of {memory / gib:.0f} GiB: "
          f"{'fits' if p.total <= memory else 'does NOT fit'}")
    if run.two_level:
        print(f"  {'two-level':<12} {run.two_level / gib:+8.2f} GiB (each Block's {job.param_dtype} partition from its "
              f"forward to its backward, and a gradient's copies between the levels): "
              f"{_fits(p.total + run.two_level, memory)}")
    kw = dict(seq=job.seq, micro_batch=job.micro_batch, checkpointing=job.checkpointing,
              param_dtype=job.param_dtype, moment_dtype=job.moment_dtype)
    print(f"smallest cluster that fits: {smallest_cluster(cfg, memory, **kw)} GPUs")


def bus_gbs(cluster: Cluster) -> float:
    """The bus bandwidth (nccl-tests' busbw: (W - 1) / W of the buffer over the time) of a world
    all-gather in this model, GB/s."""
    nvlink, nic = Traffic(cluster, {("", "all_gather", "world"): [1, 10**9]}).link_bytes()
    seconds = max(cluster.seconds(nvlink, nic).values())
    return (cluster.gpus - 1) / cluster.gpus / seconds


def print_links(c: Cluster):
    N, L = c.nodes, c.node_size
    links = (f"links: NVLink {c.nvlink_gbs:g} GB/s a GPU each way, NIC {c.nic_gbps:g} Gbit/s a GPU, "
             f"HBM {c.hbm_gbs:g} GB/s")
    if N == 1 or L == 1:
        print(f"{links}; {'one node: every collective over NVLink' if N == 1 else 'one GPU a node: over the NICs'}")
        return
    print(f"{links}; a collective over all {c.gpus} ranks sends {N - 1}/{N} of its buffer / {L} over each NIC (each "
          f"node imports {N - 1}/{N} of it over its {L} NICs, as NCCL's hierarchical algorithms move it) and "
          f"{L - 1}/{L} of it over NVLink: an all-gather at {bus_gbs(c):.0f} GB/s bus bandwidth, the line-rate "
          f"bound (users measure 100-230 GB/s on 2 x 8 H100, NVIDIA/nccl#2409; ~200 GB/s on 256, NVIDIA/nccl#1218)")


def print_training(run: RunPlan, shardings: list[str]):
    cfg, c, job = run.cfg, run.cluster, run.job
    rows = micro_batches(cfg, c.gpus, job.seq, job.tokens_per_example)
    compute = step_compute(cfg, c, job)
    print(f"training, a step ({_count(rows, 'micro-batch', 'micro-batches')} a GPU: LIMA's batch, "
          f"~{job.tokens_per_example} tokens an example; compute {compute:.2f} s at MFU {job.mfu}), what a GPU sends:")
    for s in shardings:
        cost = run.train[s]
        print(f"  {s:<10} NVLink {_size(cost.nvlink_bytes)}, NIC {_size(cost.nic_bytes)}: {cost.seconds:.2f} s, "
              f"{cost.bound}-bound")
    print(f"LIMA training (1,030 examples x {job.epochs} epochs, ~{job.tokens_per_example} tokens each, {run.steps} "
          f"steps): " + ", ".join(f"{s} {run.training_seconds(s) / 3600:.2f} h" for s in shardings)
          + f" (compute {run.steps * compute / 3600:.2f} h at MFU {job.mfu})")


def print_dev(run: RunPlan, decodes: list[str], memory: float):
    c, job, loss = run.cluster, run.job, run.dev_loss
    forwards_a_gpu = math.ceil(math.ceil(job.dev_prompts * job.tokens_per_example / job.seq) / c.gpus)
    print(f"dev loss: {_count(forwards_a_gpu, 'forward')} a GPU an epoch (NVLink {_size(loss.nvlink_bytes)}, NIC "
          f"{_size(loss.nic_bytes)}): {_duration(loss.seconds)}, {loss.bound}-bound; "
          f"{_duration(job.epochs * loss.seconds)} for {job.epochs} epochs")
    print(f"dev generation, epochs {job.window[0]}-{job.window[1]} ({job.dev_prompts} prompts, up to "
          f"{job.max_new_tokens} decode steps):")
    for layout in decodes:
        print(_gather_line(run, memory) if layout == "gather" else _node_line(run, memory))


def _epochs(run: RunPlan, g: Generation) -> str:
    return f"{_duration(g.epoch.seconds)} an epoch, {_duration(run.job.window_epochs * g.epoch.seconds)} for the window"


def _gather_line(run: RunPlan, memory: float) -> str:
    g = run.generation["gather"]
    step = g.epoch * (1 / run.job.max_new_tokens)
    return (f"  gather  {_count(g.rows, 'prompt')} a GPU; every step gathers all {run.cfg.num_params() / 1e9:.1f}B "
            f"parameters (NVLink {_size(step.nvlink_bytes)}, NIC {_size(step.nic_bytes)} a step): "
            f"{_duration(g.per_token)} a token, {g.epoch.bound}-bound; {_epochs(run, g)}; KV cache "
            f"{g.kv_cache / 2**30:.2f} GiB per GPU, {_fits(run.train_state() + g.kv_cache, memory)}")


def _node_line(run: RunPlan, memory: float) -> str:
    g, c = run.generation["node"], run.cluster
    held = run.train_state() + g.copy + g.kv_cache
    return (f"  node    the model gathered once an epoch (NVLink {_size(g.gather.nvlink_bytes)}, NIC "
            f"{_size(g.gather.nic_bytes)}: {_duration(g.gather.seconds)}, {g.gather.bound}-bound), "
            f"then {_count(g.rows, 'prompt')} a node, tensor-parallel over {c.node_size} GPUs: "
            f"{_duration(g.per_token)} a token (HBM-bound: the GPU's share of the weights and KV cache, and "
            f"{2 * run.cfg.n_layers + 1} all-reduces over NVLink at {c.nvlink_latency_us:g} us); {_epochs(run, g)}; "
            f"copy {g.copy / 2**30:.2f} GiB + KV cache {g.kv_cache / 2**30:.2f} GiB per GPU, {_fits(held, memory)}")


def print_exports(run: RunPlan):
    job, (gather, write) = run.job, run.export
    size = export_bytes(run.cfg, job.param_dtype)
    n = job.export_count
    print(f"exports: {n} of {size / 1e9:.0f} GB in {job.param_dtype} ({n * size / 1e9:.0f} GB a run), "
          f"{gather.seconds + write:.0f} s each (the gather {_duration(gather.seconds)}, {gather.bound}-bound, then "
          f"every rank writing its files at {job.write_gbs} GB/s)")


def print_totals(run: RunPlan, sharding: str, dev_decode: str, recommended: tuple[str, str, str, str]):
    best = (sharding, dev_decode) == (recommended[0], recommended[2])
    chosen = f"with --sharding {sharding} --dev-decode {dev_decode}{' (recommended)' if best else ''}"
    baseline = "" if (sharding, dev_decode) == ("flat", "gather") else \
        f"; {run.run_seconds('flat', 'gather') / 3600:.2f} h with flat and gather"
    print(f"LIMA run in all: {run.run_seconds(sharding, dev_decode) / 3600:.2f} h {chosen}{baseline} "
          f"(training, dev loss, dev generations and exports)")
    c = run.cluster
    if c.nodes > 1 and c.node_size > 1 and bus_gbs(c) > MEASURED_BUS_GBS:
        # The NIC rate at which the model's world all-gather runs at the bus bandwidth users measure.
        nic = MEASURED_BUS_GBS * c.gpus / (c.gpus - 1) * (c.nodes - 1) / c.nodes / c.node_size * 8
        slow = lima_plan(run.cfg, Cluster(c.gpus, c.gpus_per_node, c.nvlink_gbs, nic, c.hbm_gbs,
                                          c.nvlink_latency_us), run.job)
        print(f"  at the ~{MEASURED_BUS_GBS} GB/s all-gather bus bandwidth users measure (NVIDIA/nccl#1218; "
              f"--nic-gbps {nic:.0f}): {slow.run_seconds(sharding, dev_decode) / 3600:.2f} h, "
              f"{slow.run_seconds('flat', 'gather') / 3600:.2f} h with flat and gather")
    print(f"recommended: --sharding {recommended[0]}: {recommended[1]}; --dev-decode {recommended[2]}: "
          f"{recommended[3]}")
