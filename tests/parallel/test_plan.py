"""The plan against measurement on the tiny model on CPU: per-rank parameter, gradient and
optimizer bytes equal what the ranks hold (1 and 2 ranks; 4 in the slow suite), and the
activation estimate is within 20% of the measured peak of a training step's activation memory
for each checkpointing policy, at three shapes (two widths), two sequence lengths and two compute
dtypes. The byte formulas and the time model against small cases worked by hand (what a run
counts is tests/parallel/test_plan_bytes.py), the node copy and the KV cache against what the
model and the cache allocate, and the README's recipes against what the planner prints."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, torchrun
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lima_core.model.llama import Llama
from lima_core.model.shapes import PRESETS, ModelConfig
from lima_core.parallel.checkpointing import apply_checkpointing
from lima_core.parallel.planning.cli import main
from lima_core.parallel.planning.cluster import Cluster
from lima_core.parallel.planning.memory import (
    UnitShape,
    fsdp_units,
    kv_cache_bytes,
    node_copy_params,
    plan,
    two_level_bytes,
)
from lima_core.parallel.planning.report import recommend
from lima_core.parallel.planning.run import lima_plan
from lima_core.parallel.planning.timing import Job, bus_gbs, busiest
from lima_core.parallel.planning.traffic import Traffic, dev_loss, export, gather_decode, node_decode, train_step

# Activation shapes: the tiny model, one four times wider, and one with tied embeddings,
# multi-query attention and head_dim != dim / n_heads (so q-sized and dim-sized terms differ).
SHAPES = {"tiny": TINY,
          "wide": dict(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, ffn_dim=512, vocab_size=1024),
          "odd-tied": dict(dim=36, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=12, ffn_dim=61, vocab_size=97,
                           tie_embeddings=True)}


def check_held_bytes(tmp_path, n: int):
    """Train n ranks (tests/parallel/dist_worker.py) and compare each rank's held bytes with the plan."""
    cfg = ModelConfig(**TINY)
    torchrun(n, "tests/parallel/dist_worker.py", str(tmp_path / f"ranks-{n}"), "ours")
    p = plan(cfg, n, param_dtype="fp32")
    print(f"\n{'ranks':>5} {'rank':>4} | held params  grads  optimizer | plan params  grads  optimizer")
    for rank in range(n):
        held = json.loads((tmp_path / f"ranks-{n}" / f"bytes-{rank}.json").read_text())
        print(f"{n:>5} {rank:>4} | {held['params']:>11} {held['grads']:>6} {held['optimizer']:>10} | "
              f"{p.params:>11} {p.grads:>6} {p.optimizer:>10}")
        assert (held["params"], held["grads"], held["optimizer"]) == (p.params, p.grads, p.optimizer)


@pytest.mark.parametrize("n", [1, 2])
def test_shard_bytes_equal_what_the_ranks_hold(tmp_path, n):
    check_held_bytes(tmp_path, n)


@pytest.mark.slow
def test_shard_bytes_equal_what_four_ranks_hold(tmp_path):
    check_held_bytes(tmp_path, 4)


class LiveStorages(TorchDispatchMode):
    """Records every tensor storage an aten op outputs while the mode is on, and when it dies.

    Each op's outputs are looked at right after it ran (its inputs are still alive then), and a
    storage is counted once however many views share it: its untyped_storage().nbytes() from the
    op that first output it until a weak reference to it reports it freed, which is checked at
    every later op. Storages passed as `before` (parameters, buffers, inputs: what exists before
    the step) are never counted. The mode sees every op of forward and backward, including those
    torch.utils.checkpoint runs to recompute a Block and the selective policy's cached outputs,
    unlike saved_tensors_hooks, which see only what is saved outside checkpointed regions. Not
    seen: scratch memory a kernel allocates and frees inside one op.
    """

    def __init__(self, before):
        super().__init__()
        self.before = {StorageWeakRef(t.untyped_storage()).cdata for t in before}
        self.live = {}  # storage address -> (weak reference, allocation number)
        self.events = []  # (allocation number, bytes) when allocated, (allocation number, None) when freed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.events.append((self.live.pop(key)[1], None))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.before and ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, len(self.events))
                    self.events.append((len(self.events), t.untyped_storage().nbytes()))
        return out

    def peak(self, excluded: list[torch.Tensor]) -> int:
        """Largest sum of live counted bytes, leaving out the (still live) storages of `excluded`."""
        skip = {self.live[StorageWeakRef(t.untyped_storage()).cdata][1] for t in excluded}
        live, now, peak = {}, 0, 0
        for number, nbytes in self.events:
            if number in skip:
                continue
            if nbytes is None:
                now -= live.pop(number)
            else:
                live[number] = nbytes
                now += nbytes
                peak = max(peak, now)
        return peak


def measured_activation_peak(shape: dict, seq: int, policy: str, dtype: torch.dtype) -> int:
    """Peak activation bytes of one forward and backward of one row of `seq` tokens, on CPU.

    Counted: every storage the step allocates (saved activations, recomputed ones, the selective
    policy's cached outputs, gradients of activations, temporaries), at the op where their sum is
    largest. Not counted: parameters, buffers and the input (they exist before the step) and the
    parameters' gradients (the plan's `grads` and `in_flight`; they are the storages the backward
    leaves in .grad, excluded over their whole life). The model runs in `dtype` on the plain-torch
    path, as FSDP with that param_dtype computes; checkpointing is applied as parallelize does.
    """
    cfg = ModelConfig(**shape)
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    model.to(dtype)
    apply_checkpointing(model.layers, policy)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    with LiveStorages(params + list(model.buffers()) + [tokens]) as mode:
        loss_sum, n = model(tokens, tokens)
        (loss_sum / n).backward()
    assert all(p.grad is not None for p in params)
    return mode.peak(excluded=[p.grad for p in params])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("policy", ["none", "block", "selective"])
def test_activation_estimate_is_within_20_percent_of_the_measured_peak(policy, dtype):
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    for name, shape in SHAPES.items():
        for seq in (64, 256):
            measured = measured_activation_peak(shape, seq, policy, torch_dtype)
            estimate = plan(ModelConfig(**shape), 1, seq=seq, checkpointing=policy, param_dtype=dtype).activations
            error = (estimate - measured) / measured
            print(f"\n{policy:>9} {dtype} {name:>8} (dim {shape['dim']:>3}) seq {seq:>3}: measured peak "
                  f"{measured:>9} B, plan {estimate:>9} B ({error:+.3%})")
            assert abs(error) < 0.2  # the stated tolerance


def test_bf16_moments_halve_the_optimizer_bytes_the_plan_predicts():
    """The native op's bf16 moments, measured after a real step of the trainer's optimizer."""
    from lima_core.parallel.parallelize import parallelize
    from lima_core.train.optim import adamw

    cfg = ModelConfig(**{**TINY, "n_layers": 2})
    model = Llama(cfg)
    model.init_weights(torch.Generator().manual_seed(0))
    sharded = parallelize(model, checkpointing="none")
    opt = adamw(sharded.param_groups(0.1), 1e-3, (0.9, 0.95), moment_dtype=torch.bfloat16)
    loss, n = model(torch.randint(0, 101, (1, 16)), torch.randint(0, 101, (1, 16)))
    (loss / n).backward()
    opt.step()
    held = sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values() if t.ndim > 0)
    assert all(state["exp_avg"].dtype == torch.bfloat16 for state in opt.state.values())
    assert held == plan(cfg, 1, moment_dtype="bf16").optimizer == plan(cfg, 1).optimizer // 2


def test_the_plan_counts_the_bf16_shard_copy_the_gathers_send():
    from lima_core.parallel.parallelize import parallelize

    cfg = ModelConfig(**{**TINY, "n_layers": 2})
    sharded = parallelize(Llama(cfg), checkpointing="none", param_dtype=torch.bfloat16)
    held = sum(u.shard.numel() * 4 + u.copy.numel() * 2 for u in sharded.units)
    assert held == plan(cfg, 1, param_dtype="bf16").params == plan(cfg, 1, param_dtype="fp32").params * 6 // 4


# ---- the byte formulas and the time model, against cases worked by hand -------------------------

# Three units as LLaMA's list has them: an untied embedding (freed after forward, not regathered),
# a Block (regathered for backward) and the head (kept from forward to backward). Over 4 ranks
# their flat buffers pad to 12, 8 and 8 values.
UNITS = [UnitShape(10, kept=False, regathered=False), UnitShape(7, kept=False, regathered=True),
         UnitShape(5, kept=True, regathered=False)]
TWO_BY_TWO = Cluster(4, gpus_per_node=2)


def test_the_units_are_the_trainers_list():
    untied = fsdp_units(ModelConfig(**TINY))
    assert [(u.kept, u.regathered) for u in untied] == [(False, False)] + [(False, True)] * 3 + [(True, False)]
    tied = fsdp_units(ModelConfig(**{**TINY, "tie_embeddings": True}))
    assert [(u.kept, u.regathered) for u in tied] == [(True, False)] + [(False, True)] * 3
    assert sum(u.numel for u in untied) == ModelConfig(**TINY).num_params()


def test_a_flat_step_by_hand():
    # 3 micro-batches, bf16 gathers (2 bytes), fp32 gradients (4 bytes).
    counts = train_step(UNITS, TWO_BY_TWO, micro_batches=3, p=2, g=4, sharding="flat").as_counts()
    assert counts == {
        # forward: 3 x (12 + 8 + 8) x 2 = 168 bytes in 9 calls; backward: the Block, 3 x 8 x 2 = 48 in 3
        "train/all_gather/world": {"calls": 12, "buffer_bytes": 216, "sent_bytes": 162.0},
        "train/reduce_scatter/world": {"calls": 9, "buffer_bytes": 336, "sent_bytes": 252.0},  # 3 x 28 x 4
        "train/all_reduce/world": {"calls": 1, "buffer_bytes": 8, "sent_bytes": 12.0},  # the float64 norm
    }


def test_a_two_level_step_by_hand():
    counts = train_step(UNITS, TWO_BY_TWO, micro_batches=3, p=2, g=4, sharding="two-level").as_counts()
    assert counts == {
        "train/all_gather/world": {"calls": 9, "buffer_bytes": 168, "sent_bytes": 126.0},  # forward only
        "train/all_gather/node": {"calls": 3, "buffer_bytes": 48, "sent_bytes": 24.0},  # the Block, from partitions
        # the embedding's and the Block's gradients: 3 x (12 + 8) x 4 inside the node, a half of it across
        "train/reduce_scatter/node": {"calls": 6, "buffer_bytes": 240, "sent_bytes": 120.0},
        "train/reduce_scatter/cross": {"calls": 6, "buffer_bytes": 120, "sent_bytes": 60.0},
        "train/reduce_scatter/world": {"calls": 3, "buffer_bytes": 96, "sent_bytes": 72.0},  # the kept head, flat
        "train/all_reduce/world": {"calls": 1, "buffer_bytes": 8, "sent_bytes": 12.0},
    }


def test_two_level_on_one_node_is_flat():
    one_node = Cluster(4, gpus_per_node=8)
    assert (train_step(UNITS, one_node, micro_batches=2, p=2, g=4, sharding="two-level").as_counts()
            == train_step(UNITS, one_node, micro_batches=2, p=2, g=4, sharding="flat").as_counts())


def test_dev_loss_gather_decode_and_export_by_hand():
    assert dev_loss(UNITS, TWO_BY_TWO, rows=5, p=4).as_counts() == {  # ceil(5 / 4) = 2 forwards a rank
        "dev_loss/all_gather/world": {"calls": 6, "buffer_bytes": 224, "sent_bytes": 168.0}}
    assert export(UNITS, TWO_BY_TWO, e=2).as_counts() == {
        "export/all_gather/world": {"calls": 3, "buffer_bytes": 56, "sent_bytes": 42.0}}
    assert gather_decode(UNITS, TWO_BY_TWO, steps=4, p=2).as_counts() == {
        "dev_generation/all_gather/world": {"calls": 12, "buffer_bytes": 224, "sent_bytes": 168.0},
        # the longest prompt (8 bytes) once, the flag (4 bytes) each step: 24 bytes, sent twice over
        "dev_generation/all_reduce/world": {"calls": 5, "buffer_bytes": 24, "sent_bytes": 36.0}}


def test_node_decode_by_hand():
    cfg = ModelConfig(dim=8, n_layers=2, n_heads=2, ffn_dim=16, vocab_size=11)
    counts = node_decode(UNITS, cfg, TWO_BY_TWO, rows=3, prompt_tokens=5, steps=4, p=4).as_counts()
    assert counts == {
        "dev_generation/all_gather/world": {"calls": 3, "buffer_bytes": 112, "sent_bytes": 84.0},  # the copy, once
        # 2 Blocks x 2 sublayers: the prompts' [3, 5, 8] fp32 (480 bytes) 4 times, then 3 steps of [3, 1, 8]
        # (96 bytes) 4 times; the longest prompt once (8) and the flag each of the 4 steps (16)
        "dev_generation/all_reduce/node": {"calls": 21, "buffer_bytes": 4 * 480 + 12 * 96 + 8 + 16,
                                           "sent_bytes": float(4 * 480 + 12 * 96 + 8 + 16)},
    }


def test_levels_of_one_rank_move_nothing():
    assert train_step(UNITS, Cluster(1), micro_batches=2, p=2, g=4, sharding="two-level").as_counts() == {}
    nodes_of_one = train_step(UNITS, Cluster(4, gpus_per_node=1), micro_batches=1, p=2, g=4, sharding="two-level")
    assert {key.split("/")[2] for key in nodes_of_one.as_counts()} == {"world"}


def test_links_split_a_world_collective_as_nccls_hierarchy():
    # 2 nodes x 2: a world all-gather of 64 bytes sends 3/4 of them, 48; each node imports 1/2 of
    # the buffer over its 2 NICs (16 bytes a NIC), and 1/2 goes over NVLink (32 bytes).
    t = Traffic(TWO_BY_TWO)
    t.add("train", "all_gather", "world", 64)
    assert t.link_bytes() == (32.0, 16.0) and sum(t.link_bytes()) == t.sent_bytes(("train", "all_gather", "world"))
    t.add("train", "all_reduce", "world", 8)  # twice over: 2 x 1/2 x 8 on NVLink, 2 x 1/2 x 8 / 2 on the NIC
    t.add("train", "reduce_scatter", "node", 40)  # 20 over NVLink
    t.add("train", "reduce_scatter", "cross", 20)  # 10 over the NIC
    assert t.link_bytes() == (32.0 + 8 + 20, 16.0 + 4 + 10)


def test_a_part_lasts_as_long_as_its_busiest_resource():
    # 2 nodes x 8 at 450 GB/s NVLink and 400 Gbit/s NICs: a world all-gather of 16 GB puts
    # 1/2 x 16 / 8 = 1 GB on each NIC (20 ms at 50 GB/s) and 7/8 x 16 = 14 GB on NVLink (31.1 ms).
    cluster = Cluster(16)
    t = Traffic(cluster)
    t.add("train", "all_gather", "world", 16 * 10**9)
    cost = busiest(t)
    assert (cost.bound, cost.nvlink_bytes, cost.nic_bytes) == ("NVLink", 14e9, 1e9)
    assert cost.seconds == pytest.approx(14 / 450)
    assert busiest(t, compute=0.05).bound == "compute"
    assert busiest(t, hbm_bytes=3350e9 * 0.04).bound == "HBM"
    slow = Cluster(16, nic_gbps=100)  # 12.5 GB/s: 80 ms on the NIC
    assert busiest(Traffic(slow, t.flows)).bound == "NIC"
    assert busiest(Traffic(slow, t.flows)).seconds == pytest.approx(0.08)


def test_the_bus_bandwidth_of_eight_nodes_of_eight_at_line_rate():
    # 7/8 of the buffer into a node over 8 NICs at 50 GB/s: an algorithm bandwidth of 64/7 x 50,
    # a bus bandwidth of 63/64 of that.
    assert bus_gbs(Cluster(64)) == pytest.approx(450.0)


def test_two_level_memory_by_hand():
    # The Block's partition (8 / 2 values x 2 bytes), and the largest freed unit's gradient copies
    # between the levels: [L, N, c] (12 x 4 bytes) and the node's sum [N, c] (6 x 4 bytes).
    assert two_level_bytes(UNITS, 4, 2, p=2, g=4) == 8 + 48 + 24
    assert two_level_bytes(UNITS, 4, 4, p=2, g=4) == 0  # one node: flat


@pytest.mark.parametrize("shape", ["tiny", "odd-tied", "llama-3-70b"])
def test_the_node_copy_and_its_cache_are_what_the_layout_builds(shape):
    from lima_core.model.kv_cache import KVCache
    from lima_core.parallel.decode_layout import cache_bytes, copy_bytes, local_config

    cfg = ModelConfig.from_name(shape) if shape in PRESETS else ModelConfig(**SHAPES[shape])
    parts = math.gcd(cfg.n_heads, cfg.n_kv_heads, 8)
    largest = max(local_config(cfg, parts, part).num_params() for part in range(parts))
    assert node_copy_params(cfg, parts) == largest and node_copy_params(cfg, parts) * 2 == copy_bytes(
        cfg, parts, torch.bfloat16)
    assert kv_cache_bytes(cfg, 3, 50, cfg.n_kv_heads // parts, 2) == cache_bytes(cfg, parts, 3, 50, torch.bfloat16)
    if shape == "tiny":  # what the cache allocates for the copy's local shapes
        kv = KVCache(local_config(cfg, parts, 0), 3, 50, "cpu", torch.bfloat16)
        assert kv_cache_bytes(cfg, 3, 50, cfg.n_kv_heads // parts, 2) == sum(
            t.numel() * t.element_size() for t in kv.k + kv.v)


def test_the_gather_layout_cache_is_what_the_kv_cache_allocates():
    from lima_core.model.kv_cache import KVCache

    cfg = ModelConfig(**TINY)
    run = lima_plan(cfg, Cluster(4), Job(dev_prompts=10, dev_prompt_tokens=30, max_new_tokens=20, param_dtype="bf16"))
    kv = KVCache(cfg, 3, 50, "cpu", torch.bfloat16)  # ceil(10 / 4) rows of 30 + 20 positions
    assert run.generation["gather"].kv_cache == sum(t.numel() * t.element_size() for t in kv.k + kv.v)


def test_node_decoding_is_hbm_and_latency_bound_by_hand():
    # One node of 8 H100 decoding 8 prompts: llama-65b's share a GPU read once a token, the KV
    # cache half full on average, and 2 all-reduces per Block plus the flag at 5 us each.
    cfg = ModelConfig.from_name("llama-65b")
    job = Job(dev_prompts=8, dev_prompt_tokens=512, max_new_tokens=2048)
    g = lima_plan(cfg, Cluster(8), job).generation["node"]
    weights = 2 * (node_copy_params(cfg, 8) - cfg.vocab_size * cfg.dim)  # the embedding: its rows only
    cache = 2 * 80 * 8 * (512 + 1024) * 8 * 128 * 2  # 8 rows, 8 of the 64 kv heads a GPU, 128 wide
    all_reduces = 161 * 5e-6 + 2 * 7 / 8 * (160 * 8 * 8192 * 2 + 4) / 450e9  # [8, 1, 8192] bf16, and the flag
    assert g.per_token == pytest.approx((weights + cache) / 3350e9 + all_reduces)
    assert g.rows == 8 and g.epoch.nic_bytes == 0


def test_the_planner_recommends_two_level_and_the_node_layout_at_65b_on_64():
    run = lima_plan(ModelConfig.from_name("llama-65b"), Cluster(64), Job())
    sharding, _, dev_decode, _ = recommend(run, 80 * 2**30)
    assert (sharding, dev_decode) == ("two-level", "node")
    assert run.run_seconds("two-level", "node") < 45 * 60 < run.run_seconds("flat", "gather")


def test_link_gbps_is_nic_gbps(capsys):
    main(["--model", "llama-65b", "--gpus", "16", "--link-gbps", "200"])
    old = capsys.readouterr().out
    main(["--model", "llama-65b", "--gpus", "16", "--nic-gbps", "200"])
    assert capsys.readouterr().out == old and "NIC 200 Gbit/s a GPU" in old


def test_gpus_that_do_not_make_whole_nodes_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["--gpus", "12"])
    assert "--gpus 12 do not make whole nodes of 8" in capsys.readouterr().err


def test_the_command_line_prints_a_plan():
    out = subprocess.run([sys.executable, "-m", "lima_core.plan", "--model", "llama-65b", "--gpus", "64",
                          "--gpu-memory", "80"], capture_output=True, text=True, check=True).stdout
    assert "smallest cluster that fits" in out and "LIMA run in all" in out and "recommended: --sharding" in out


def test_the_readme_recipes_are_what_the_planner_says(capsys):
    """Each multi-GPU recipe in the README quotes the plan for its model and GPU count: the
    memory total, the recommended dev-generation layout's memory, and the run's hours with the
    recommended layout and with flat and gather. The planner must still print those figures,
    and say that they fit."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    quoted = re.findall(r"#   (\S+), (\d+) GPUs: +total ([\d.]+) GiB of 80 GiB: fits; dev generation on the "
                        r"(\w+) layout ([\d.]+) GiB in all: fits\n#   LIMA run in all: ([\d.]+) h with --sharding "
                        r"(\S+) --dev-decode (\w+) \(recommended\); ([\d.]+) h with flat and gather", readme)
    assert {(m, int(g)) for m, g, *_ in quoted} >= {("llama-2-7b", 8), ("llama-3-8b", 8), ("llama-65b", 32),
                                                   ("llama-3-70b", 32)}
    for model, gpus, total, layout, during, hours, sharding, dev_decode, baseline in quoted:
        main(["--model", model, "--gpus", gpus, "--gpu-memory", "80"])
        out = capsys.readouterr().out
        assert re.search(rf"total\s+{re.escape(total)} GiB of 80 GiB: fits", out), (model, gpus)
        assert re.search(rf"\n  {layout} .*, {re.escape(during)} GiB in all: fits", out), (model, gpus)
        assert (f"LIMA run in all: {hours} h with --sharding {sharding} --dev-decode {dev_decode} (recommended); "
                f"{baseline} h with flat and gather") in out, (model, gpus)
        assert layout == dev_decode, (model, gpus)
