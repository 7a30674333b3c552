"""Memory, bytes per link and time of lima-core's FSDP run of LIMA on a cluster of GPU nodes.

    python -m lima_core.plan --model llama-65b --gpus 64 --gpu-memory 80

The command: its flags (each a setting of the run it plans, or of the cluster), the plan they
name, and the report it prints. The first line above is also the command's --help description.
"""

from __future__ import annotations

import argparse
import math

from lima_core.config import CHECKPOINTING, ConfigError
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.planning.cluster import Cluster
from lima_core.parallel.planning.memory import BYTES, node_layout_splits
from lima_core.parallel.planning.report import (
    print_dev,
    print_exports,
    print_links,
    print_memory,
    print_totals,
    print_training,
    recommend,
)
from lima_core.parallel.planning.run import lima_plan
from lima_core.parallel.planning.timing import Job


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
    _add_cluster_flags(ap)
    ap.add_argument("--sharding", choices=("flat", "two-level"), default=None,
                    help="plan this training layout only (default: both, and recommend one)")
    ap.add_argument("--dev-decode", choices=("gather", "node"), default=None,
                    help="plan this dev-generation layout only (default: both, and recommend one)")
    _add_job_flags(ap)
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


def _add_cluster_flags(ap: argparse.ArgumentParser):
    """The cluster's flags: its GPUs, their memory and their links."""
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


def _add_job_flags(ap: argparse.ArgumentParser):
    """The run's flags (each a field of Job)."""
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
