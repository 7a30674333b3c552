"""Fully sharded data parallel, hand-written on lima-core's collectives (gloo, NCCL).

`fully_shard(root, units, comm=...)` shards whatever list of units it is given (a `UnitSpec`: a
name, the modules whose parameters it holds in forward order, and two flags) and names nothing
of the model; lima_core.parallel.parallelize builds LLaMA's list. A unit's parameters are laid end to end
in one logical flat vector (weight-decayed matrices first, then vectors), padded to a multiple
of the world size W and split evenly: rank r keeps elements [r * c, (r + 1) * c), c = padded / W,
as its fp32 master shard, in both shardings, so a train state is the same whatever the sharding.
The optimizer steps only shards. A parameter shared by two modules of a unit (a tied LM head)
has one slot; both modules see the same gathered view.

Per unit and step: all-gather the shard into a full flat buffer just before the unit's first
module runs, prefetching the next unit on CUDA (an async all-gather on a side stream; on CPU
collectives run one at a time: overlapping gloo collectives gains nothing on a few cores), free
the buffer's storage after the unit's last module when `reshard_after_forward`, gather it again
when the gradient reaches what that module returned (when `gather_for_backward`), and
reduce-scatter the gradient (`reduce_dtype`) into an fp32 shard gradient as soon as autograd
has accumulated it. Gathers move `param_dtype`: with bf16, each rank keeps a bf16 copy of its
shard that the optimizer writes in the pass of its update (`FSDP.param_copies`), so a gather
sends that copy as it is, with no cast per gather.

Two shardings (`sharding`), over the levels of lima_core.parallel.topology (N nodes of L ranks,
W = N * L; rank r is local rank l = r % L of node n = r // L):
- "flat": every collective over "world".
- "two-level" (ZeRO++'s secondary partition, FSDP2's reshard_after_forward=L): after a unit's
  forward, rank (n, l) keeps partition l of L of the gathered unit (padded / L values, in
  param_dtype) instead of nothing, so the backward gather runs inside the node; the gradient
  [padded] is viewed as [N, L, c], permuted to [L, N, c] (a copy), reduce-scattered over "node"
  (local rank l gets the node's sum of chunks n' * L + l, [N, c]) and then over "cross" (rank
  (n, l) gets chunk n * L + l = r summed over every rank: the flat shard gradient, summed in
  another order). Units kept gathered from forward to backward (reshard_after_forward=False)
  are sharded as in flat, gradient included. On one node, or nodes of one rank, two-level is
  flat: there is no second level (`FSDP.sharding` says which ran).

Collectives (through `Collectives`, so a ByteCounter sees each; the planner's formulas,
lima_core.parallel.planning.traffic, follow this list). p, g: bytes of param_dtype and reduce_dtype; a
buffer is a unit's padded flat vector; "freed units" are those with reshard_after_forward, and
of them "regathered" those with gather_for_backward (LLaMA: the Blocks; the untied embedding is
freed but its backward reads no weight; the head, and the tied embedding unit, stay gathered).
Per micro-batch (one forward and backward of a row):
                           flat                               two-level
  forward                  all_gather world, every unit,      the same
                           buffer padded * p
  backward gather          all_gather world, each             all_gather node, each regathered
                           regathered unit, padded * p        unit, padded * p
  gradient, freed units    reduce_scatter world, padded * g   reduce_scatter node, padded * g, then
                                                              reduce_scatter cross, padded / L * g
  gradient, kept units     reduce_scatter world, padded * g   the same
Per step: `clip_grad_norm_` all-reduces one float64 scalar (8 bytes) over "world".
A forward without grad (dev loss, generation): the forward gathers only. Export and every
`full_tensors`: one all_gather over "world" of each unit, padded * bytes of the export dtype.
A level of one rank is a copy and issues nothing.

The model stays pure: FSDP removes the unit's nn.Parameters from the modules and sets plain
attributes of the same names that are views into the gathered buffer; forward hooks and a
gradient hook on what the unit's last module returns drive the collectives.

Public interface for saving, loading and exporting (lima_core.checkpoint.state and lima_core.checkpoint.hf use only
this): `FSDP.units`, `.group`, `.rank`, `.world`; a `Unit`'s `name`, `numel`, `slots` (each
parameter's state-dict name, shape and offset in the flat vector), `local_range`, `shard`,
`pieces` (optimizer parameters with their offset in the shard) and `write_range` (load part of
the flat vector); `FSDP.full_tensors(unit)` (one unit's whole tensors, collective).

Known limits: one unit is in flight ahead of the current one; no CPU offload; a module must not
read a unit's parameters outside the forward of that unit's modules.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from lima_core.parallel.topology import Collectives, Topology

SHARDINGS = ("flat", "two-level")


@dataclass
class UnitSpec:
    """What to shard as one unit, and when its parameters must be present."""

    name: str
    modules: list[nn.Module]
    """Modules whose parameters the unit holds, in the order the forward calls them."""
    reshard_after_forward: bool = True
    """Free the gathered parameters after the last module's forward (False: keep them for a
    backward that follows at once, or for a later module that reads them again)."""
    gather_for_backward: bool = True
    """Gather again for backward (False when no module reads its parameters there: an embedding)."""


@dataclass
class Slot:
    """One parameter's place in its unit's flat vector, and the attributes that show it."""

    name: str  # qualified name in the root module's state dict
    holders: list[tuple[nn.Module, str]]  # (module, attribute name); several when shared
    shape: torch.Size
    offset: int
    decay: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Piece:
    """A part of a rank's shard the optimizer steps: a Parameter aliasing shard[offset:offset + numel]."""

    param: nn.Parameter
    offset: int
    decay: bool


class Unit:
    """The flat, sharded parameters of a group of modules and the collectives that move them."""

    def __init__(self, spec: UnitSpec, params: list[tuple[str, list[tuple[nn.Module, str]], torch.Size]],
                 comm: Collectives, sharding: str, device: torch.device, param_dtype: torch.dtype,
                 reduce_dtype: torch.dtype):
        topology = comm.topology
        self.name, self.comm, self.rank, self.world = spec.name, comm, topology.rank, topology.world
        self.group = topology.group("world")
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.free_after_forward = spec.reshard_after_forward and self.world > 1
        self.gather_for_backward = spec.gather_for_backward or not self.free_after_forward
        # Two-level moves what a unit freed after forward sends; a kept unit is sharded as in flat.
        self.two_level = sharding == "two-level" and self.free_after_forward
        # Matrices first, so the weight-decayed part of every shard is one contiguous piece.
        ordered = sorted(params, key=lambda p: len(p[2]) < 2)
        self.slots, offset = [], 0
        for qualified, holders, shape in ordered:
            self.slots.append(Slot(qualified, holders, shape, offset, len(shape) >= 2))
            offset += math.prod(shape)
        self.numel = offset
        self.shard_numel = math.ceil(offset / self.world)
        self.decay_numel = sum(s.numel for s in self.slots if s.decay)
        self.shard = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        # The shard in the compute dtype: what the all-gather sends; None when that is fp32.
        self.copy = None if param_dtype == torch.float32 else torch.zeros_like(self.shard, dtype=param_dtype)
        self._versions = self._current_versions()  # when the copy last matched the shard
        self.grad = torch.zeros(self.shard_numel, dtype=torch.float32, device=device)
        self.pieces = self._pieces()
        if self.world == 1 and param_dtype == torch.float32:
            self.full = self.shard.data.requires_grad_()  # one rank, fp32: compute on the master itself
        else:
            self.full = torch.zeros(self.shard_numel * self.world, dtype=param_dtype, device=device).requires_grad_()
        self.full.register_post_accumulate_grad_hook(lambda full: self.reduce_grad())
        self._pending = None  # (work handle, send buffer, stream) of an all-gather in flight
        self.partition = None  # two-level: this rank's part of the node's copy, from forward to backward
        self.gathered = True

    # ---- layout ------------------------------------------------------------------------
    @property
    def local_range(self) -> tuple[int, int]:
        """This rank's [start, end) in the unit's padded flat vector."""
        return self.rank * self.shard_numel, (self.rank + 1) * self.shard_numel

    @property
    def partition_range(self) -> tuple[int, int]:
        """Two-level: the [start, end) of the padded vector this rank keeps between forward and
        backward, partition `local_rank` of node_size (padded / L elements)."""
        topology = self.comm.topology
        size = self.full.numel() // topology.node_size
        return topology.local_rank * size, (topology.local_rank + 1) * size

    def _pieces(self) -> list[Piece]:
        """The shard cut at the decay boundary: Parameters that alias the shard (optimizer targets)."""
        lo, hi = self.local_range
        cut = min(max(self.decay_numel - lo, 0), self.shard_numel)
        pieces = []
        for a, b, decay in ((0, cut, True), (cut, self.shard_numel, False)):
            if b > a:
                p = nn.Parameter(self.shard[a:b])
                p.grad = self.grad[a:b]
                pieces.append(Piece(p, a, decay))
        return pieces

    @torch.no_grad()
    def write_range(self, start: int, values: torch.Tensor):
        """Copy `values`, the logical flat vector's elements from `start` on, into what this rank holds."""
        lo, hi = self.local_range
        a, b = max(lo, start), min(hi, start + values.numel())
        if b > a:
            self.shard[a - lo:b - lo].copy_(values.reshape(-1)[a - start:b - start])
            if self.copy is not None:
                self.copy[a - lo:b - lo].copy_(self.shard[a - lo:b - lo])

    def _current_versions(self) -> tuple[int, int]:
        return (self.shard._version, self.copy._version) if self.copy is not None else (0, 0)

    @torch.no_grad()
    def _synced_copy(self) -> torch.Tensor:
        """The copy, rounded again from the shard if the shard changed and the copy did not (an
        optimizer that does not write the copies): a tensor's version counts its in-place writes,
        and the native AdamW counts both of its writes."""
        shard_version, copy_version = self._versions
        if self.shard._version != shard_version and self.copy._version == copy_version:
            self.copy.copy_(self.shard)
        self._versions = self._current_versions()
        return self.copy

    @torch.no_grad()
    def refresh_copy(self):
        """Round the whole master shard into the compute-dtype copy (after writing the shard
        other than through write_range or an optimizer that writes the copies)."""
        if self.copy is not None:
            self.copy.copy_(self.shard)

    # ---- parameters in and out -----------------------------------------------------------
    def gather(self, async_op: bool = False, stream=None):
        """Fill the full buffer (no-op when already there or in flight): from the partitions of
        the node when a two-level forward left one (backward), else from every rank's shard."""
        if self.gathered or self._pending is not None:
            if not async_op:
                self.wait()
            return
        storage = self.full.untyped_storage()
        storage.resize_(self.full.numel() * self.full.element_size())
        if self.partition is not None:
            send, level, self.partition = self.partition, "node", None
        else:
            send, level = (self.shard if self.copy is None else self._synced_copy()), "world"
        if self.world == 1:
            with torch.no_grad():
                self.full.data.copy_(send)
            self.gathered = True
            return
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())  # the optimizer (or forward) wrote `send` there
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            work = self.comm.all_gather(self.full.data, send, level, async_op=True)
        self._pending = (work, send, stream)
        if not async_op:
            self.wait()

    def wait(self):
        if self._pending is not None:
            work, send, stream = self._pending
            work.wait()
            if stream is not None:
                torch.cuda.current_stream().wait_stream(stream)
                send.record_stream(torch.cuda.current_stream())
            self._pending = None
            self.gathered = True

    def bind(self):
        """Point the modules' parameter names at fresh views of the full buffer (in forward,
        with grad enabled, so the views link to the buffer in autograd)."""
        for s in self.slots:
            view = self.full[s.offset:s.offset + s.numel].view(s.shape)
            for module, attr in s.holders:
                setattr(module, attr, view)

    def free(self, backward_follows: bool = False):
        """Release the full buffer's storage; a two-level unit whose backward will read its
        parameters first keeps its partition of them."""
        if self.world == 1 and self.param_dtype == torch.float32:
            return
        self.wait()
        if backward_follows and self.two_level and self.gather_for_backward:
            lo, hi = self.partition_range
            self.partition = self.full.detach()[lo:hi].clone()
        self.full.untyped_storage().resize_(0)
        self.gathered = False

    # ---- gradients -----------------------------------------------------------------------
    @torch.no_grad()
    def reduce_grad(self):
        """Reduce-scatter the accumulated full gradient into this rank's fp32 shard gradient."""
        full_grad = self.full.grad
        self.full.grad = None
        if self.world == 1:
            self.grad.add_(full_grad)
        else:
            send = full_grad.to(self.reduce_dtype)
            recv = torch.empty(self.shard_numel, dtype=self.reduce_dtype, device=send.device)
            if self.two_level:
                self._reduce_in_two_levels(recv, send)
            else:
                self.comm.reduce_scatter(recv, send, "world")
            self.grad.add_(recv)
        self.partition = None  # (a backward that never gathered: nothing of it is read again)
        self.free()  # until the next forward

    def _reduce_in_two_levels(self, recv: torch.Tensor, send: torch.Tensor):
        """recv [c] <- chunk r of the sum over every rank of send [padded]: inside the node, then across."""
        topology = self.comm.topology
        nodes, size = topology.nodes, topology.node_size
        by_local = send.view(nodes, size, self.shard_numel).transpose(0, 1).contiguous()  # [N, L, c] -> [L, N, c]
        node_sum = torch.empty(nodes * self.shard_numel, dtype=send.dtype, device=send.device)  # [N * c]
        self.comm.reduce_scatter(node_sum, by_local.view(-1), "node")  # [L * N * c] -> [N * c], chunks n * L + l
        self.comm.reduce_scatter(recv, node_sum, "cross")  # [N * c] -> [c], chunk n * L + l of every rank


class FSDP:
    """The sharded form of a model: its units, hooks, and the helpers a training loop needs.

    Build with `fully_shard`. Every method that says "collective" must be called by all ranks.
    """

    def __init__(self, model: nn.Module, units: list[Unit], comm: Collectives, sharding: str):
        self.model, self.units, self.comm, self.sharding = model, units, comm, sharding

    @property
    def group(self):
        """The world's process group (None: one process): barriers and file striping use it."""
        return self.comm.topology.group("world")

    @property
    def world(self) -> int:
        return self.units[0].world

    @property
    def rank(self) -> int:
        return self.units[0].rank

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups over the shard pieces: decay on matrices, none on norms."""
        pieces = [piece for u in self.units for piece in u.pieces]
        return [{"params": [p.param for p in pieces if p.decay], "weight_decay": weight_decay},
                {"params": [p.param for p in pieces if not p.decay], "weight_decay": 0.0}]

    def param_copies(self) -> dict[nn.Parameter, torch.Tensor]:
        """{optimizer parameter: its compute-dtype copy} for an optimizer that writes the copy in
        the same pass as the update (lima_core.native.adamw); empty when gathering in fp32."""
        return {p.param: u.copy[p.offset:p.offset + p.param.numel()]
                for u in self.units if u.copy is not None for p in u.pieces}

    def zero_grad(self):
        for u in self.units:
            u.grad.zero_()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients so their global 2-norm is at most max_norm (collective); returns the norm."""
        sq = torch.stack([u.grad.double().square().sum() for u in self.units]).sum()
        self.comm.all_reduce(sq, "world")
        total = sq.sqrt().float()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for u in self.units:
            u.grad.mul_(coef)
        return total

    @torch.no_grad()
    def full_tensors(self, unit: Unit, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """One unit's parameters as whole tensors in `dtype` (rounded from the fp32 masters), by
        state-dict name (collective)."""
        send = unit.shard.to(dtype)
        if self.world == 1:
            flat = send
        else:
            flat = torch.empty(unit.shard_numel * unit.world, dtype=dtype, device=unit.shard.device)
            self.comm.all_gather(flat, send, "world")
        return {s.name: flat[s.offset:s.offset + s.numel].view(s.shape).clone() for s in unit.slots}


def resolve_sharding(sharding: str, topology: Topology) -> str:
    """The sharding that runs: two-level on one node, or on nodes of one rank, is flat (one of
    its levels has a single rank, so the two schemes move the same bytes over the same links)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"--sharding {sharding!r}: choose {' or '.join(SHARDINGS)}")
    if sharding == "two-level" and (topology.node_size == 1 or topology.nodes == 1):
        return "flat"
    return sharding


def fully_shard(root: nn.Module, units: list[UnitSpec], group=None, *, comm: Collectives | None = None,
                sharding: str = "flat", device: torch.device | str | None = None,
                param_dtype: torch.dtype = torch.float32, reduce_dtype: torch.dtype = torch.float32) -> FSDP:
    """Shard the parameters of `units` (every parameter of `root`, each in one unit) over the
    ranks of `comm` (or of `group`, as one node; both None: a single process, no collectives),
    `sharding` "flat" or "two-level" (see the module docstring), in place.

    The model may live on the meta device: shards are then zero until filled (Unit.write_range,
    hf.load_sharded). Otherwise each rank copies its slice of the current parameters.
    """
    for name, dtype in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dtype}")
    comm = comm if comm is not None else _world_collectives(group)
    sharding = resolve_sharding(sharding, comm.topology)
    first = next(root.parameters())
    device = torch.device(device) if device is not None else (torch.device("cpu") if first.is_meta else first.device)
    stream = torch.cuda.Stream(device) if device.type == "cuda" and comm.topology.world > 1 else None
    names = {id(p): n for n, p in root.named_parameters()}
    sharded = []
    for spec in units:
        params = _unit_params(spec, names)
        unit = Unit(spec, [(n, holders, p.shape) for n, (p, holders) in params.items()], comm, sharding,
                    device, param_dtype, reduce_dtype)
        for slot in unit.slots:
            original = params[slot.name][0]
            if not original.is_meta:
                unit.write_range(slot.offset, original.detach().to(device, torch.float32))
            for module, attr in slot.holders:
                del module._parameters[attr]
        unit.bind()  # the names exist (shape, device, dtype) before the first forward
        unit.free()
        sharded.append(unit)
    missing = set(names.values()) - {s.name for u in sharded for s in u.slots}
    if missing:
        raise ValueError(f"fully_shard: parameters in no unit: {', '.join(sorted(missing))}")
    _install_hooks(units, sharded, stream)
    root.register_forward_hook(_root_post_forward(sharded))
    return FSDP(root, sharded, comm, sharding)


def _world_collectives(group) -> Collectives:
    """Collectives over `group` alone, its ranks taken as one node (flat sharding only)."""
    if group is None:
        return Collectives(Topology(0, 1, 1))
    world = dist.get_world_size(group)
    return Collectives(Topology(dist.get_rank(group), world, world, {"world": group}))


def _unit_params(spec: UnitSpec, names: dict[int, str]) -> dict[str, tuple[nn.Parameter, list]]:
    """state-dict name -> (Parameter, [(module, attribute), ...]) of a unit, shared ones once."""
    params: dict[str, tuple[nn.Parameter, list]] = {}
    for top in spec.modules:
        for module in top.modules():
            for attr, p in module.named_parameters(recurse=False):
                params.setdefault(names[id(p)], (p, []))[1].append((module, attr))
    return params


def _install_hooks(specs: list[UnitSpec], units: list[Unit], stream):
    for i, (spec, unit) in enumerate(zip(specs, units)):
        nxt = units[i + 1] if i + 1 < len(units) else None
        prev = units[i - 1] if i > 0 else None
        for module in spec.modules:
            module.register_forward_pre_hook(_pre_forward(unit, nxt, stream, first=module is spec.modules[0]))
        spec.modules[-1].register_forward_hook(_post_forward(unit, prev, stream))


def _pre_forward(unit: Unit, nxt: Unit | None, stream, first: bool):
    def hook(module, args):
        if first:
            unit.partition = None  # a forward whose backward never ran (its graph dropped): stale
        if first or not unit.gathered:
            unit.gather()
            unit.bind()
        if first and nxt is not None and stream is not None:
            nxt.partition = None
            nxt.gather(async_op=True, stream=stream)
    return hook


def _post_forward(unit: Unit, prev: Unit | None, stream):
    def hook(module, args, result):
        first = result[0] if isinstance(result, tuple) else result
        backward_follows = torch.is_grad_enabled() and isinstance(first, torch.Tensor) and first.requires_grad
        if unit.free_after_forward:
            unit.free(backward_follows)
        if backward_follows:
            first.register_hook(_before_backward(unit, prev, stream))
    return hook


def _before_backward(unit: Unit, prev: Unit | None, stream):
    """Runs when the gradient reaches what the unit returned, before its backward (and recompute)."""
    def hook(grad):
        if unit.gather_for_backward:
            unit.gather()
        if prev is not None and prev.gather_for_backward and stream is not None:
            prev.gather(async_op=True, stream=stream)
        return grad
    return hook


def _root_post_forward(units: list[Unit]):
    """Without a backward to come, units kept for it are freed now."""
    def hook(module, args, result):
        first = result[0] if isinstance(result, tuple) else result
        if not (torch.is_grad_enabled() and first.requires_grad):
            for u in units:
                if u.gathered and not u.free_after_forward:
                    u.free()
    return hook
