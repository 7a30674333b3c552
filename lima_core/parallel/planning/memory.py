"""What a GPU holds in lima-core's FSDP run, derived from the model's shapes so that the planner
can size a cluster without one.

Memory per GPU: fp32 master parameter shard (and its bf16 copy, which the gathers send, when
computing in bf16), fp32 gradient shard, AdamW moments (2 x fp32, or 2 x bf16 with
`--moment-dtype bf16`), gathered units in flight (the unit computing, the one prefetched, and a
unit's full gradient buffer), and the peak of one micro-batch's activations (`activation_bytes`:
every tensor a training step's forward and backward allocate, parameter gradients aside).
Two-level sharding adds each Block's partition kept from its forward to its backward
(`two_level_bytes`); the node-local decode layout, a tensor-parallel copy and its KV cache
beside the train state (`node_copy_params`, `kv_cache_bytes`).

Activations are those of the plain-torch path (`--kernels torch`, what CPU runs), derived op by
op from what it keeps for backward and checked against the measured peak on CPU
(tests/parallel/test_plan.py). Known limits: the Triton path (the CUDA default) keeps less: its
norms keep their input and 1/rms only (2 d values per Block fewer), and its fused
linear-cross-entropy keeps the head's gradients, computed in forward, instead of the
[tokens, vocab] log-probs. On CPU, packed rows add an [s, s] fp32 attention mask per Block
(CUDA's varlen attention has none). Not modelled: memory a kernel allocates and frees inside one
op (FlashAttention's workspace and backward accumulators; on CPU in bf16, the attention
backward's fp32 buffers), the RNG state torch.utils.checkpoint saves per Block (5 KB), the
reduce dtype's copy of a unit's gradient when it differs from the compute dtype, allocator
fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lima_core.config import DTYPES
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.parallelize import llama_units, unit_numels

BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


@dataclass
class Plan:
    """What a GPU holds training with flat sharding, in bytes, by part."""

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


def kept_and_recomputed(cfg: ModelConfig, checkpointing: str, p: int) -> tuple[int, int]:
    """Bytes per token a Block keeps from its forward to its backward, and holds in its backward,
    on the plain-torch path in a compute dtype of p bytes; F = 4 bytes for what that path keeps in
    fp32 (norm inputs and statistics, attention logsumexp). With d = dim, f = ffn_dim,
    h = n_heads, hd = head_dim, hq = h hd, hkv = n_kv_heads hd:

      norm      = F d + F + 2 p d         an RMSNorm saves its input in fp32 (an fp32 copy when
                                          p < F), 1/rms, x/rms cast back, and weight * that
      saved     = 2 norm + p (2 hq + 2 hkv + 4 f) + F h
                                          a Block without checkpointing: rotated q and k, v, the
                                          attention output and its logsumexp (h per token),
                                          SwiGLU's gate, up, silu(gate) and product
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
    """
    F = 4
    d, f, h, hd = cfg.dim, cfg.ffn_dim, cfg.n_heads, cfg.head_dim
    hq, hkv = h * hd, cfg.n_kv_heads * hd
    norm = F * d + F + 2 * p * d
    saved = 2 * norm + p * (2 * hq + 2 * hkv + 4 * f) + F * h
    overlap = F * d if p == F else 0
    if checkpointing == "none":
        return saved, saved
    if checkpointing == "block":
        return p * d, p * d + saved - overlap
    if checkpointing == "selective":
        return p * (3 * d + 2 * hq + 2 * hkv + 2 * f) + F * h, p * d + saved - overlap + p * d
    raise ValueError(f"--checkpointing must be none, block or selective, got {checkpointing!r}")


def activation_bytes(cfg: ModelConfig, checkpointing: str, tokens: int, p: int) -> int:
    """Peak bytes of activations in the forward and backward of one micro-batch of T = `tokens`,
    on the plain-torch path in a compute dtype of p bytes; F = 4 bytes for what that path keeps
    in fp32 (norm inputs and statistics, attention logsumexp, logits). Parameter gradients are
    not activations (see `plan`). With d = dim, f = ffn_dim, hd = head_dim, V = vocab_size,
    L = n_layers, kept and recompute a Block's (`kept_and_recomputed`), per token:

      grad      = p (d + 2 f)             a Block's backward at its widest: the gradients of its
                                          output, of the SwiGLU product and of one factor
      shared    = 2 p hd                  rotary cos and sin, one copy for all Blocks
      head      = F d + F + p d + F d     the final norm (input, 1/rms, x/rms) and the fp32 copy of
                                          its output the logits are computed from

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
    d, f, hd, V, L = cfg.dim, cfg.ffn_dim, cfg.head_dim, cfg.vocab_size, cfg.n_layers
    kept, recompute = kept_and_recomputed(cfg, checkpointing, p)
    grad = p * (d + 2 * f)
    shared = 2 * p * hd
    head = F * d + F + p * d + F * d
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
