"""Memory and communication plan of lima-core's FSDP for a model on a cluster.

    python -m lima_core.plan --model llama-65b --gpus 64 --gpu-memory 80

Per GPU: fp32 master parameter shard (and its bf16 copy, which the gathers send, when computing
in bf16), fp32 gradient shard, AdamW moments (2 x fp32, or 2 x bf16 with `--moment-dtype bf16`), gathered
units in flight (the unit computing, the one prefetched, and a unit's full gradient buffer),
and the peak of one micro-batch's activations (`activation_bytes`: every tensor a training
step's forward and backward allocate, parameter gradients aside).
Communication per step and rank (ring collectives move (G-1)/G of the buffer): all-gather of
every unit in forward and again in backward (but the embedding and the head), and a
reduce-scatter of every unit's gradient, per micro-batch.

Around training, at each epoch's end: the HF export (by default the epochs of the selection
window and the last; `export_bytes`, `export_seconds`) and, in the window, the dev generations
(`dev_generation`): every rank decodes its share of the dev prompts as one batch, so each decode
step gathers every unit once, and the longest answer sets the number of steps.

Activations are those of the plain-torch path (`--kernels torch`, what CPU runs), derived op by
op from what it keeps for backward (the formula is in `activation_bytes`) and checked against
the measured peak on CPU (tests/parallel/test_plan.py). Known limits: the Triton path (the CUDA default)
keeps less: its norms keep their input and 1/rms only (2 d values per Block fewer), and its fused
linear-cross-entropy keeps the head's gradients, computed in forward, instead of the
[tokens, vocab] log-probs. On CPU, packed rows add an [s, s] fp32 attention mask per Block
(CUDA's varlen attention has none). Not modelled: memory a kernel allocates and frees inside one
op (FlashAttention's workspace and backward accumulators; on CPU in bf16, the attention
backward's fp32 buffers), the RNG state torch.utils.checkpoint saves per Block (5 KB), and
allocator fragmentation.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from lima_core.config import CHECKPOINTING, DTYPES, ConfigError, TrainConfig
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.parallelize import llama_units, unit_numels

BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


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
    """Parameter counts of the FSDP units in forward order: the trainer's own unit list
    (parallelize.llama_units) read off the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Llama(cfg)
    return unit_numels(llama_units(model))


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
    sizes = unit_sizes(cfg)
    shard = sum(math.ceil(n / gpus) for n in sizes)
    p = BYTES[param_dtype]
    tokens = seq * micro_batch
    ring = (gpus - 1) / gpus
    gathered = sum(sizes[1:-1]) if not cfg.tie_embeddings else sum(sizes[1:])
    return Plan(gpus, params=(4 + (p if p < 4 else 0)) * shard, grads=4 * shard,
                optimizer=2 * BYTES[moment_dtype] * shard,
                in_flight=3 * max(sizes) * p if gpus > 1 else 0,
                activations=activation_bytes(cfg, checkpointing, tokens, p),
                gather_bytes=int(ring * (sum(sizes) + gathered) * p),
                reduce_bytes=int(ring * sum(sizes) * 4))


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


def lima_time(cfg: ModelConfig, p: Plan, *, mfu: float, peak_tflops: float, link_gbps: float,
              examples: int = 1030, epochs: int = 15, tokens_per_example: int = 650, checkpointing: str = "block",
              seq: int = 2048):
    """Seconds for LIMA's run: compute at `mfu` of peak (6 N per token, 8 N with recomputation),
    plus communication not hidden behind compute (the larger of the two per step)."""
    recompute = {"none": 6, "block": 8, "selective": 6.7}[checkpointing]
    tokens = examples * epochs * tokens_per_example
    compute = recompute * cfg.num_params() * tokens / (p.gpus * peak_tflops * 1e12 * mfu)
    steps = math.ceil(examples / TrainConfig().global_batch(cfg.num_params())) * epochs
    per_step = micro_batches(cfg, p.gpus, seq, tokens_per_example) * (p.gather_bytes + p.reduce_bytes)
    comm = steps * per_step / (link_gbps * 1e9 / 8)
    return max(compute, comm), compute, comm


def dev_generation(cfg: ModelConfig, p: Plan, *, prompts: int, prompt_tokens: int, new_tokens: int,
                   link_gbps: float, param_dtype: str = "bf16") -> tuple[float, int]:
    """(seconds per evaluated epoch, KV-cache bytes per GPU) of the dev generations: `new_tokens`
    decode steps (the longest answer), each gathering every parameter once (ring all-gather,
    (G-1)/G of the model received per rank); decoding is bound by that gather, not by compute.
    The cache holds keys and values of ceil(prompts / G) rows of prompt_tokens + new_tokens."""
    b = BYTES[param_dtype]
    per_step = (p.gpus - 1) / p.gpus * cfg.num_params() * b if p.gpus > 1 else 0
    seconds = new_tokens * per_step / (link_gbps * 1e9 / 8)
    rows = math.ceil(prompts / p.gpus)
    cache = 2 * cfg.n_layers * rows * (prompt_tokens + new_tokens) * cfg.n_kv_heads * cfg.head_dim * b
    return seconds, cache


def export_bytes(cfg: ModelConfig, dtype: str = "bf16") -> int:
    """Bytes of one HF export's safetensors (the tensors; headers and configs are kilobytes)."""
    return cfg.num_params() * BYTES[dtype]


def export_seconds(cfg: ModelConfig, gpus: int, *, dtype: str = "bf16", write_gbs: float, link_gbps: float,
                   file_bytes: int = 5 * 2**30) -> float:
    """One export: the model gathered once (as the dev decode step gathers it), then 5 GiB files
    written by the ranks in turn, each rank at `write_gbs` GB/s (a shared filesystem that takes
    every rank's writes at once)."""
    size = export_bytes(cfg, dtype)
    files = math.ceil(size / file_bytes)
    gather = (gpus - 1) / gpus * size / (link_gbps * 1e9 / 8) if gpus > 1 else 0
    return gather + math.ceil(files / gpus) * min(size, file_bytes) / (write_gbs * 1e9)


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
    """The planner's flags (each a setting of the run it plans) and the model they name."""
    ap = argparse.ArgumentParser(prog="python -m lima_core.plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-65b")
    ap.add_argument("--gpus", type=_positive_int, default=64)
    ap.add_argument("--gpu-memory", type=_positive, default=80, help="GiB per GPU")
    ap.add_argument("--seq", type=_positive_int, default=2048)
    ap.add_argument("--micro-batch", type=_positive_int, default=1)
    ap.add_argument("--checkpointing", default="block", choices=CHECKPOINTING)
    ap.add_argument("--param-dtype", default="bf16", choices=list(BYTES))
    ap.add_argument("--moment-dtype", default="fp32", choices=list(BYTES), help="AdamW moments (bf16: native op)")
    ap.add_argument("--mfu", type=_fraction, default=0.4)
    ap.add_argument("--peak-tflops", type=_positive, default=989, help="dense bf16 peak per GPU (H100 SXM: 989)")
    ap.add_argument("--link-gbps", type=_positive, default=400, help="per-GPU network bandwidth, Gbit/s")
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
    try:
        return a, ModelConfig.from_name(a.model)
    except ConfigError as e:
        ap.error(str(e))


def main(argv=None):
    """Print the plan: memory per GPU, bytes moved, and the time of a LIMA run."""
    a, cfg = parse_args(argv)
    kw = dict(seq=a.seq, micro_batch=a.micro_batch, checkpointing=a.checkpointing, param_dtype=a.param_dtype,
              moment_dtype=a.moment_dtype)
    p = plan(cfg, a.gpus, **kw)
    gib = 2**30
    print(f"{a.model}: {cfg.num_params() / 1e9:.1f}B parameters, {len(unit_sizes(cfg))} FSDP units, {a.gpus} GPUs, "
          f"seq {a.seq} x micro-batch {a.micro_batch}, checkpointing {a.checkpointing}, compute in {a.param_dtype}, "
          f"AdamW moments in {a.moment_dtype}")
    for name in ("params", "grads", "optimizer", "in_flight", "activations"):
        print(f"  {name:<12} {getattr(p, name) / gib:8.2f} GiB")
    print(f"  {'total':<12} {p.total / gib:8.2f} GiB of {a.gpu_memory:.0f} GiB: "
          f"{'fits' if p.total <= a.gpu_memory * gib else 'does NOT fit'}")
    micro = micro_batches(cfg, a.gpus, a.seq, 650)
    print(f"per micro-batch and rank: all-gather {p.gather_bytes / gib:.1f} GiB, reduce-scatter "
          f"{p.reduce_bytes / gib:.1f} GiB; {micro} micro-batch(es) per rank and step "
          f"(LIMA's batch, ~650 tokens an example)")
    smallest = smallest_cluster(cfg, a.gpu_memory * gib, **kw)
    print(f"smallest cluster that fits: {smallest} GPUs")
    total, compute, comm = lima_time(cfg, p, mfu=a.mfu, peak_tflops=a.peak_tflops, link_gbps=a.link_gbps,
                                     checkpointing=a.checkpointing, seq=a.seq, epochs=a.epochs)
    print(f"LIMA training (1,030 examples x {a.epochs} epochs, ~650 tokens each): {total / 3600:.2f} h "
          f"(compute {compute / 3600:.2f} h at MFU {a.mfu}, "
          f"communication {comm / 3600:.2f} h at {a.link_gbps} Gbit/s)")
    window = a.window[1] - a.window[0] + 1
    gen, cache = dev_generation(cfg, p, prompts=a.dev_prompts, prompt_tokens=a.dev_prompt_tokens,
                                new_tokens=a.max_new_tokens, link_gbps=a.link_gbps, param_dtype=a.param_dtype)
    during = p.total - p.activations + cache  # the train state stays; activations are gone
    print(f"dev generation: {gen / 3600:.2f} h an epoch, {window * gen / 3600:.2f} h for epochs "
          f"{a.window[0]}-{a.window[1]} ({a.dev_prompts} prompts as one batch over the ranks, up to "
          f"{a.max_new_tokens} decode steps, each gathering all {cfg.num_params() / 1e9:.1f}B parameters); KV cache "
          f"{cache / gib:.2f} GiB per GPU, {during / gib:.2f} GiB in all: "
          f"{'fits' if during <= a.gpu_memory * gib else 'does NOT fit'}")
    exports = a.exports if a.exports is not None else window + (a.epochs > a.window[1])
    size = export_bytes(cfg, a.param_dtype)
    one = export_seconds(cfg, a.gpus, dtype=a.param_dtype, write_gbs=a.write_gbs, link_gbps=a.link_gbps)
    print(f"exports: {exports} of {size / 1e9:.0f} GB in {a.param_dtype} ({exports * size / 1e9:.0f} GB a run), "
          f"{one:.0f} s each with every rank writing its files at {a.write_gbs} GB/s")
    run = total + window * gen + exports * one
    print(f"LIMA run in all: {run / 3600:.2f} h (training, dev generations and exports)")

