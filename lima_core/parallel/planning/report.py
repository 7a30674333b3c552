"""The plan in words: the lines `python -m lima_core.plan` prints for each part of the run, and
the layouts it recommends with the reason, kept apart from the formulas so that these read as
numbers and the report as text.
"""

from __future__ import annotations

import math

from lima_core.parallel.planning.cluster import Cluster
from lima_core.parallel.planning.memory import smallest_cluster, unit_sizes
from lima_core.parallel.planning.run import RunPlan, lima_plan
from lima_core.parallel.planning.timing import (
    MEASURED_BUS_GBS,
    Generation,
    bus_gbs,
    export_bytes,
    micro_batches,
    step_compute,
)


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


def recommend(run: RunPlan, memory_bytes: float) -> tuple[str, str, str, str]:
    """(sharding, why, dev_decode, why): the faster layout of each that fits."""
    return (*recommend_sharding(run, memory_bytes), *recommend_dev_decode(run, memory_bytes))


def recommend_sharding(run: RunPlan, memory_bytes: float) -> tuple[str, str]:
    """(sharding, why): two-level where it fits and trains faster, else flat."""
    c = run.cluster
    flat, two = run.training_seconds("flat"), run.training_seconds("two-level")
    if c.nodes == 1 or c.node_size == 1:
        return "flat", "one level only here, where two-level is flat"
    if not run.fits(memory_bytes, "two-level"):
        return "flat", f"two-level does not fit, {(run.memory.total + run.two_level) / 2**30:.2f} GiB"
    if two < flat:
        saved = run.train["flat"].nic_bytes - run.train["two-level"].nic_bytes
        return "two-level", (f"training {two / 3600:.2f} h against {flat / 3600:.2f} h flat: the backward "
                             f"gather stays on NVLink, {_size(saved)} a step less over each NIC")
    return "flat", (f"two-level saves no time here, {two / 3600:.2f} h against {flat / 3600:.2f} h, "
                    f"for {run.two_level / 2**30:.2f} GiB more a GPU")


def recommend_dev_decode(run: RunPlan, memory_bytes: float) -> tuple[str, str]:
    """(dev_decode, why): the node layout where the heads split, it fits and it decodes faster, else gather."""
    c = run.cluster
    gather = run.generation["gather"].epoch.seconds
    if "node" not in run.generation:
        return "gather", (f"the {run.cfg.n_heads} query and {run.cfg.n_kv_heads} key-value heads do not "
                          f"split over {c.node_size} GPUs")
    if not run.fits(memory_bytes, dev_decode="node"):
        return "gather", "the node copy and its KV cache do not fit beside the train state" + (
            "" if run.fits(memory_bytes, dev_decode="gather") else
            "; nor does the gather layout's KV cache: more GPUs, or a lower --max-new-tokens")
    node = run.generation["node"].epoch.seconds
    if node < gather:
        return "node", (f"dev generation {_duration(node)} an epoch against {_duration(gather)}: the model "
                        f"crosses the network once an epoch, not once a token")
    return "gather", "the node layout saves no time here"


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
