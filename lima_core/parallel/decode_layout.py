"""The node-local decode layout: one tensor-parallel copy of the model a node, for generating.

Decoding with the sharded training model gathers every unit over every rank for every token
(at 65B, 131 GB a token). Instead, once per generation phase the ranks of a node assemble one
copy sharded inside the node, as Megatron-LM splits a layer (Shoeybi et al. 2019) and as
DeepSpeed-Chat's hybrid engine reshards ZeRO-3 weights for `generate()`: each rank keeps its
n_heads / L query heads and n_kv_heads / L key/value heads (rows of wq, wk, wv; columns of wo)
and ffn_dim / L columns of the MLP (rows of w_gate and w_up; columns of w_down), so attention
and the MLP run on local heads and columns, and only the outputs of wo and w_down are partial:
forward hooks sum them over the node (`apply_tensor_parallel`; the model stays a plain Llama
with local shapes). Embedding, norms and head are replicated. Every rank of a node ends with
the same logits, so ranks that share a generator seed draw the same tokens.

Three ways in: `tensor_parallel_copy` from the sharded training model (each unit gathered once,
sliced, the rest freed at once), `load_tensor_parallel` from an HF checkpoint (each rank reads
only its slices), and `choose_dev_layout`, which says whether dev generation uses this layout
or gathers the sharded model every step (today's path), and why.

Known limits: the heads must split evenly over the node's ranks (else the layout is refused
and dev generation gathers); ffn_dim need not (the first ranks then hold one column less).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.utils.hooks import RemovableHandle

from lima_core.checkpoint.hf import hf_key, inspect_checkpoint
from lima_core.config import Config
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.fsdp import FSDP
from lima_core.parallel.topology import Collectives, Topology

# A Block's split parameters (our names): the dimension split, and what it holds (heads of
# queries, heads of keys/values, or MLP columns). The others are replicated.
_SPLIT = {
    "attn.wq.weight": (0, "heads"),
    "attn.wk.weight": (0, "kv_heads"),
    "attn.wv.weight": (0, "kv_heads"),
    "attn.wo.weight": (1, "heads"),
    "mlp.w_gate.weight": (0, "ffn"),
    "mlp.w_up.weight": (0, "ffn"),
    "mlp.w_down.weight": (1, "ffn"),
}


def _part(n: int, parts: int, part: int) -> tuple[int, int]:
    """[start, end) of part `part` of `parts` contiguous pieces of n (equal when parts divides n)."""
    return part * n // parts, (part + 1) * n // parts


def split_problem(cfg: ModelConfig, parts: int) -> str | None:
    """Why `cfg` cannot be split over `parts` ranks a node, or None when it can."""
    if cfg.n_heads % parts or cfg.n_kv_heads % parts:
        return (f"the node-local layout needs the {cfg.n_heads} query and {cfg.n_kv_heads} key/value heads to split "
                f"over the {parts} ranks of a node")
    return None


def local_config(cfg: ModelConfig, parts: int, part: int) -> ModelConfig:
    """The shapes of rank `part`'s copy: its heads and MLP columns, the same width and head size."""
    start, end = _part(cfg.ffn_dim, parts, part)
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // parts, n_kv_heads=cfg.n_kv_heads // parts,
                               head_dim=cfg.head_dim, ffn_dim=end - start)


def local_index(key: str, cfg: ModelConfig, parts: int, part: int) -> tuple[slice, ...]:
    """Rank `part`'s piece of parameter `key` (our state-dict name) as an index: rows or columns
    of a split Block matrix, everything of a replicated parameter."""
    split = next((rule for suffix, rule in _SPLIT.items() if key.endswith("." + suffix)), None)
    if split is None:
        return (slice(None),)
    dim, what = split
    width = {"heads": cfg.n_heads * cfg.head_dim, "kv_heads": cfg.n_kv_heads * cfg.head_dim, "ffn": cfg.ffn_dim}[what]
    start, end = _part(width, parts, part)  # head boundaries: parts divides the heads (split_problem)
    return (slice(None),) * dim + (slice(start, end),)


def apply_tensor_parallel(model: Llama, comm: Collectives) -> list[RemovableHandle]:
    """Sum each Block's attention output and MLP down projection over the node's ranks (the
    partial products of their local heads and columns), in place, by forward hooks. Returns
    the hooks' handles (`handle.remove()` undoes it); a node of one rank has nothing to sum."""
    def all_reduce(module, args, output):
        comm.all_reduce(output, "node")

    return [module.register_forward_hook(all_reduce) for block in model.layers
            for module in (block.attn.wo, block.mlp.w_down)]


def _assemble(cfg: ModelConfig, parts: int, part: int, state: dict[str, torch.Tensor], comm: Collectives,
              kernels: str) -> Llama:
    """Rank `part`'s copy from its pieces (local_index of every parameter), hooked for the node."""
    with torch.device("meta"):
        model = Llama(local_config(cfg, parts, part), kernels=kernels)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.init_buffers()
    apply_tensor_parallel(model, comm)
    return model


@torch.no_grad()
def tensor_parallel_copy(sharded: FSDP, cfg: ModelConfig, comm: Collectives, dtype: torch.dtype,
                         kernels: str = "auto") -> Llama:
    """This rank's tensor-parallel copy of a sharded model, in `dtype` (collective: every rank of
    the world calls it). Each unit is gathered once over the world (FSDP.full_tensors, as an
    export gathers it), this rank's pieces are kept and the rest freed before the next unit."""
    parts, part = comm.topology.node_size, comm.topology.local_rank
    state = {}
    for unit in sharded.units:
        for key, full in sharded.full_tensors(unit, dtype).items():
            piece = full[local_index(key, cfg, parts, part)]
            # A slice is copied, so the whole tensor is freed at once; a replicated one is kept.
            state[key] = piece.clone() if piece.numel() < full.numel() else full
    return _assemble(cfg, parts, part, state, comm, kernels)


@torch.no_grad()
def load_tensor_parallel(checkpoint_dir: str | Path, comm: Collectives, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu", kernels: str = "auto") -> Llama:
    """This rank's tensor-parallel copy of an HF checkpoint (the node's ranks together hold one
    model), each rank reading only its slices of the safetensors files (safe_open + get_slice).
    Every header is checked first (hf.inspect_checkpoint); a ValueError says why heads that do
    not split over the node's ranks cannot be laid out."""
    path = Path(checkpoint_dir)
    cfg, stored = inspect_checkpoint(path)
    parts, part = comm.topology.node_size, comm.topology.local_rank
    problem = split_problem(cfg, parts)
    if problem:
        raise ValueError(f"{path}: {problem}")
    with torch.device("meta"):
        keys = list(Llama(cfg).state_dict())
    state = {}
    for file in sorted({stored[hf_key(key)].file for key in keys}):
        with safe_open(str(file), framework="pt") as f:
            for key in (k for k in keys if stored[hf_key(k)].file == file):
                piece = f.get_slice(hf_key(key))[local_index(key, cfg, parts, part)]
                state[key] = piece.to(device, dtype)
    return _assemble(cfg, parts, part, state, comm, kernels)


# ---- which layout dev generation uses, and why --------------------------------------------


@dataclass(frozen=True)
class DevLayout:
    """How dev generation decodes: "node" (a node's tensor-parallel copy) or "gather" (the sharded
    model, as trained: every unit gathered every step on more than one rank), and why."""

    name: str
    where: str
    """What decodes, in words."""
    reason: str

    def describe(self) -> str:
        return f"dev generation on {self.where} ({self.reason})"


_NODE_LOCAL = "the node-local layout"
_GATHERED = "the sharded model, every unit gathered each decode step"


def copy_bytes(cfg: ModelConfig, parts: int, dtype: torch.dtype) -> int:
    """A rank's copy: its heads and MLP columns of every Block, the embedding, norms and head whole."""
    return local_config(cfg, parts, parts - 1).num_params() * dtype.itemsize  # the last rank: the most columns


def cache_bytes(cfg: ModelConfig, parts: int, rows: int, positions: int, dtype: torch.dtype) -> int:
    """A rank's KV cache for `rows` rows of `positions` positions: keys and values of its kv heads."""
    return 2 * cfg.n_layers * rows * positions * (cfg.n_kv_heads // parts) * cfg.head_dim * dtype.itemsize


def choose_dev_layout(cfg: Config, model_cfg: ModelConfig, topology: Topology, prompt_lengths: list[int],
                      free_bytes: int | None) -> DevLayout:
    """parallel.dev_decode resolved. "gather" as asked; "node" unless the heads do not split over
    a node's ranks; "auto": node where that holds and the copy with the KV cache of the largest
    node share of the dev prompts fits in `free_bytes` (the least free memory of any rank,
    `free_memory`; None: the CPU, where it always fits), else gather; one process gathers
    nothing (its model is whole), so auto keeps it. Every rank gets the same answer."""
    setting, ranks, nodes = cfg.parallel.dev_decode, topology.node_size, topology.nodes
    if setting == "gather":
        return DevLayout("gather", _GATHERED, "--dev-decode gather")
    problem = split_problem(model_cfg, ranks)
    if problem:
        return DevLayout("gather", _GATHERED, problem)
    node = DevLayout("node", _NODE_LOCAL, f"tensor-parallel over {ranks} rank{'s' * (ranks > 1)} a node, {nodes} "
                             f"node{'s' * (nodes > 1)}")
    if setting == "node":
        return node
    if topology.world == 1:
        return DevLayout("gather", "the model as trained", "one process: the model is whole, nothing to gather")
    if free_bytes is None:
        return node
    rows = -(-len(prompt_lengths) // nodes)  # the largest share: conversations n, n + nodes, ...
    positions = min(model_cfg.max_seq_len, max(prompt_lengths, default=1) + cfg.sampling.max_new_tokens)
    dtype = cfg.param_dtype
    need = copy_bytes(model_cfg, ranks, dtype) + cache_bytes(model_cfg, ranks, rows, positions, dtype)
    room = f"{need / 2**30:.1f} GiB a rank, {free_bytes / 2**30:.1f} GiB free beside the train state"
    if need > free_bytes:
        return DevLayout("gather", _GATHERED, f"the node-local copy and its KV cache do not fit: {room}")
    return DevLayout("node", _NODE_LOCAL, f"{node.reason}; the copy and its KV cache fit: {room}")


def free_memory(device: torch.device, comm: Collectives) -> int | None:
    """The least memory free on any rank's GPU (what the caching allocator holds unused counts as
    free; one all-reduce over the world), or None on the CPU and for one process (where "auto"
    asks nothing of the memory)."""
    if device.type != "cuda" or comm.topology.world == 1:
        return None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    least = torch.tensor(free, dtype=torch.int64, device=device)
    comm.all_reduce(least, "world", op=dist.ReduceOp.MIN)
    return int(least)
