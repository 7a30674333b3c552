"""The plan against measurement on the tiny model on CPU: per-rank parameter, gradient and
optimizer bytes equal what the ranks hold (1 and 2 ranks; 4 in the slow suite), and the
activation estimate is within 20% of the measured peak of a training step's activation memory
for each checkpointing policy, at three shapes (two widths), two sequence lengths and two compute
dtypes."""

import json
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
from lima_core.model.shapes import ModelConfig
from lima_core.parallel.checkpointing import apply_checkpointing
from lima_core.parallel.plan import plan

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


def test_the_command_line_prints_a_plan():
    out = subprocess.run([sys.executable, "-m", "lima_core.plan", "--model", "llama-65b", "--gpus", "64",
                          "--gpu-memory", "80"], capture_output=True, text=True, check=True).stdout
    assert "smallest cluster that fits" in out and "LIMA" in out


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


def test_dev_generation_cache_is_what_the_kv_cache_allocates():
    from lima_core.model.kv_cache import KVCache
    from lima_core.parallel.plan import dev_generation

    cfg = ModelConfig(**TINY)
    p = plan(cfg, 4)
    seconds, cache = dev_generation(cfg, p, prompts=10, prompt_tokens=30, new_tokens=20, link_gbps=8,
                                    param_dtype="bf16")
    kv = KVCache(cfg, 3, 50, "cpu", torch.bfloat16)  # ceil(10 / 4) rows of 30 + 20 positions
    assert cache == sum(t.numel() * t.element_size() for t in kv.k + kv.v)
    # 20 decode steps, each receiving 3/4 of the bf16 parameters at 1 GB/s.
    assert seconds == pytest.approx(20 * 0.75 * cfg.num_params() * 2 / 1e9)


def test_the_readme_recipes_are_what_the_planner_says(capsys):
    """Each multi-GPU recipe in the README quotes the plan for its model and GPU count; the
    planner must still print those figures, and say that training and dev generation fit."""
    import re

    from lima_core.parallel.plan import main

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    quoted = re.findall(r"#   (\S+), (\d+) GPUs: +total ([\d.]+) GiB of 80 GiB: fits", readme)
    assert {(m, int(g)) for m, g, _ in quoted} >= {("llama-2-7b", 8), ("llama-3-8b", 8), ("llama-65b", 32),
                                                  ("llama-3-70b", 32)}
    for model, gpus, total in quoted:
        main(["--model", model, "--gpus", gpus, "--gpu-memory", "80"])
        out = capsys.readouterr().out
        assert re.search(rf"total\s+{re.escape(total)} GiB of 80 GiB: fits", out), (model, gpus)
        assert re.search(r"dev generation: .* in all: fits", out), (model, gpus)
