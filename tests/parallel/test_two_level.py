"""Two-level sharding (lima_core.parallel.fsdp) on 2 nodes x 2 gloo ranks, against today's flat
FSDP on the same ranks and against one process; the collectives one step counts in each mode,
against the formulas the planner uses (fsdp's module docstring); and train states that move
between the two layouts and rank counts and still end where the uninterrupted run ends.

One torchrun launch (tests/parallel/dist_worker.py layouts) trains, counts and reduces for every
comparison of the first part; the resume tests run the trainer itself, as
tests/checkpoint/test_state.py does.
"""

import json
import math
import shutil

import pytest
import torch
from dist_worker import COUNTED, train_reference
from helpers import ASSETS, run_entry, tiny_model, torchrun
from safetensors.torch import load_file

from lima_core.parallel.fsdp import resolve_sharding
from lima_core.parallel.parallelize import llama_units, parallelize, unit_numels
from lima_core.parallel.topology import Topology

WORLD, NODE_SIZE = 4, 2
SHARDINGS = ("flat", "two-level")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    torchrun(WORLD, "tests/parallel/dist_worker.py", str(out), "layouts", str(NODE_SIZE))
    return out


@pytest.fixture(scope="module")
def reference():
    model = tiny_model()
    losses = train_reference(model)
    return losses, {n: p.detach() for n, p in model.named_parameters()}


def trained(layouts, sharding: str):
    return (json.loads((layouts / sharding / "losses.json").read_text()),
            load_file(layouts / sharding / "weights.safetensors"))


def errors(result, reference) -> tuple[float, float]:
    """(worst relative loss error, worst absolute weight error)."""
    (losses, weights), (ref_losses, ref_weights) = result, reference
    return (max(abs(a - b) / b for a, b in zip(losses, ref_losses, strict=True)),
            max(float((weights[k] - ref_weights[k]).abs().max()) for k in ref_weights))


def test_two_level_training_equals_flat_and_one_process(layouts, reference):
    flat, two_level = trained(layouts, "flat"), trained(layouts, "two-level")
    for label, result, against in (("flat 2 x 2 vs one process", flat, reference),
                                   ("two-level 2 x 2 vs one process", two_level, reference),
                                   ("two-level vs flat, 2 x 2", two_level, flat)):
        loss_err, weight_err = errors(result, against)
        print(f"\n{label}: worst relative loss error {loss_err:.2e}, worst absolute weight error {weight_err:.2e}")
        # Only the order of the gradient sums differs (node then cross, or one ring): fp32 rounding.
        assert loss_err < 1e-6
        # Weights are O(0.02-1); a few fp32 ulps of the clip coefficient move an update by ~1e-7.
        assert weight_err < 1e-6
    assert all(json.loads((layouts / f"counts-untied-fp32-{s}-{r}.json").read_text())["sharding"] == s
               for s in SHARDINGS for r in range(WORLD))  # two-level really ran (2 nodes of 2)


def expected_counts(setting: str, sharding: str, micro_batches: int) -> dict[str, dict]:
    """The collectives of one step by the brief's formulas (fsdp's module docstring), from the
    unit list alone: per micro-batch, per step (the clip) and per export."""
    tied, param_dtype, reduce_dtype = COUNTED[setting]
    p, g = param_dtype.itemsize, reduce_dtype.itemsize
    specs = llama_units(tiny_model(tie_embeddings=tied))
    padded = [math.ceil(n / WORLD) * WORLD for n in unit_numels(specs)]
    freed = [n for n, s in zip(padded, specs) if s.reshard_after_forward]
    kept = [n for n, s in zip(padded, specs) if not s.reshard_after_forward]
    regathered = [n for n, s in zip(padded, specs) if s.reshard_after_forward and s.gather_for_backward]
    rows = {("train", "all_gather", "world"): [(n * p, micro_batches) for n in padded]}  # forward
    if sharding == "flat":
        rows["train", "all_gather", "world"] += [(n * p, micro_batches) for n in regathered]
        rows["train", "reduce_scatter", "world"] = [(n * g, micro_batches) for n in padded]
    else:
        rows["train", "all_gather", "node"] = [(n * p, micro_batches) for n in regathered]
        rows["train", "reduce_scatter", "node"] = [(n * g, micro_batches) for n in freed]
        rows["train", "reduce_scatter", "cross"] = [(n // NODE_SIZE * g, micro_batches) for n in freed]
        rows["train", "reduce_scatter", "world"] = [(n * g, micro_batches) for n in kept]
    rows["train", "all_reduce", "world"] = [(8, 1)]  # the clip's float64 squared norm
    rows["export", "all_gather", "world"] = [(n * 4, 1) for n in padded]  # full_tensors in fp32
    ranks = {"world": WORLD, "node": NODE_SIZE, "cross": WORLD // NODE_SIZE}
    counts = {}
    for (phase, collective, level), buffers in rows.items():
        if not buffers:
            continue
        share = (ranks[level] - 1) / ranks[level] * (2 if collective == "all_reduce" else 1)
        total = sum(size * times for size, times in buffers)
        counts[f"{phase}/{collective}/{level}"] = {"calls": sum(times for _, times in buffers),
                                                   "buffer_bytes": total, "sent_bytes": pytest.approx(share * total)}
    return counts


@pytest.mark.parametrize("sharding", SHARDINGS)
@pytest.mark.parametrize("setting", COUNTED)
def test_one_step_counts_the_listed_collectives(layouts, setting, sharding):
    """What a ByteCounter saw of one step (2 micro-batches a rank, the clip) and an export equals
    the list in fsdp's docstring, on every rank: the reference for the planner's formulas."""
    for rank in range(WORLD):
        counted = json.loads((layouts / f"counts-{setting}-{sharding}-{rank}.json").read_text())
        assert counted["micro_batches"] == 2  # the per-micro-batch terms are multiplied, not one-off
        assert counted["counts"] == expected_counts(setting, sharding, counted["micro_batches"]), (setting, rank)
    print(f"\n{setting}, {sharding}, per step of 2 micro-batches a rank (rank 0):")
    for key, count in counted["counts"].items():
        print(f"  {key:28} {count['calls']:3} calls, buffers {count['buffer_bytes']:8} B, "
              f"sent {count['sent_bytes']:10.0f} B")


def shard_grads(layouts, setting: str, sharding: str) -> torch.Tensor:
    """Every rank's shard gradients of the counted step, end to end (rank order)."""
    return torch.cat([torch.cat(list(load_file(layouts / f"grads-{setting}-{sharding}-{r}.safetensors").values()))
                      for r in range(WORLD)]).double()


def test_bf16_reduction_accumulates_shard_gradients_in_fp32(layouts):
    """With reduce_dtype bf16 each level reduces in bf16 and the shard gradient adds it in fp32
    (2 micro-batches); two-level's error against fp32 reduction is flat's, give or take."""
    exact = shard_grads(layouts, "untied-fp32", "flat")
    fp32_two_level = float((shard_grads(layouts, "untied-fp32", "two-level") - exact).norm() / exact.norm())
    flat = float((shard_grads(layouts, "untied-bf16-reduce", "flat") - exact).norm() / exact.norm())
    two_level = float((shard_grads(layouts, "untied-bf16-reduce", "two-level") - exact).norm() / exact.norm())
    grads = load_file(layouts / "grads-untied-bf16-reduce-two-level-0.safetensors")
    print(f"\nshard gradients against fp32 flat reduction: fp32 two-level {fp32_two_level:.2e}, "
          f"bf16 flat {flat:.2e}, bf16 two-level {two_level:.2e}")
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert fp32_two_level < 1e-6  # fp32 sums in another order
    # bf16 keeps 8 bits (2^-9 relative per rounding); two-level rounds once per level, flat once
    # per ring step: about the same (measured: 2.7e-3 each), far below a wrong chunk (~100%) or a
    # lost micro-batch (~50%).
    assert 1e-4 < two_level < 2 * flat + 1e-3


def test_two_level_on_one_node_or_nodes_of_one_rank_is_flat(tmp_path):
    """No second level: the sharding that runs is flat, and the trainer says so."""
    assert resolve_sharding("two-level", Topology(0, 4, 2)) == "two-level"
    assert resolve_sharding("two-level", Topology(0, 4, 4)) == "flat"  # one node
    assert resolve_sharding("two-level", Topology(0, 4, 1)) == "flat"  # nodes of one rank
    with pytest.raises(ValueError, match="--sharding 'ring': choose flat or two-level"):
        resolve_sharding("ring", Topology(0, 4, 2))
    assert parallelize(tiny_model(), sharding="two-level").sharding == "flat"
    from lima_core.train import loop

    data = tmp_path / "train.jsonl"
    data.write_text("".join(line + "\n" for line in (ASSETS / "train.jsonl").read_text().splitlines()[:4]))
    outcome = run_entry(loop.main, ["--data", str(data), "--dev-data", "", "--out-dir", str(tmp_path / "runs"),
                                    "--epochs", "1", "--batch-size", "4", "--plot", "false",
                                    "--sharding", "two-level"], tmp_path)
    assert outcome.status == 0, outcome.err
    assert ("lima-core: --sharding two-level on one node or nodes of one rank is flat sharding (no second level)"
            in outcome.err)


# ---- train states across layouts and rank counts (the trainer, as tests/checkpoint/test_state.py) ----


LAYOUTS = {"two-level 2 x 2": (4, "--node-size", "2", "--sharding", "two-level"),
           "flat on 2 ranks": (2, "--sharding", "flat")}


def launch(tmp, layout: str, name: str, *extra: str):
    """test_state.py's run (12 conversations, 3 epochs of 3 steps, a state every 2) on `layout`."""
    data = tmp / "train.jsonl"
    if not data.exists():
        data.write_text("".join(line + "\n" for line in (ASSETS / "train.jsonl").read_text().splitlines()[:12]))
    ranks, *flags = LAYOUTS[layout]
    torchrun(ranks, "-m", "lima_core.train", "--data", str(data), "--dev-data", "", "--out-dir", str(tmp / "runs"),
             "--name", name, "--epochs", "3", "--batch-size", "4", "--max-len", "160", "--lr", "1e-3",
             "--save-every", "2", "--plot", "false", *flags, *extra)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The 9-step run of each layout, saving every 2 steps."""
    tmp = tmp_path_factory.mktemp("resume")
    for layout in LAYOUTS:
        launch(tmp, layout, layout.replace(" ", "-"))
    return tmp


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def resume(tmp, saved_by: str, resumed_on: str) -> tuple[float, float, int]:
    """Continue `saved_by`'s step-6 state (of 9 steps) on `resumed_on`; (worst relative loss
    error, worst weight error of the last export, steps) against the uninterrupted `saved_by` run."""
    whole = tmp / "runs" / saved_by.replace(" ", "-")
    name = f"{saved_by}-then-{resumed_on}".replace(" ", "-")
    shutil.copytree(whole / "state" / "step-6", tmp / "runs" / name / "state" / "step-6")
    launch(tmp, resumed_on, name, "--resume", "auto")
    ours, ref = losses(tmp / "runs" / name), losses(whole)
    assert len(ours) == len(ref)
    a = load_file(tmp / "runs" / name / "epoch-3" / "model.safetensors")
    b = load_file(whole / "epoch-3" / "model.safetensors")
    loss_err = max(abs(x - y) / y for x, y in zip(ours, ref))
    weight_err = max(float((a[k] - b[k]).abs().max()) for k in b)
    print(f"\n{saved_by} -> {resumed_on} from step 6: worst relative loss error {loss_err:.2e}, "
          f"worst weight error {weight_err:.2e}")
    return loss_err, weight_err, len(ours)


def test_a_two_level_state_resumes_bit_exact_on_its_own_layout(uninterrupted):
    loss_err, weight_err, _ = resume(uninterrupted, "two-level 2 x 2", "two-level 2 x 2")
    assert loss_err == 0 and weight_err == 0  # same ranks, same order of every sum


@pytest.mark.parametrize("saved_by, resumed_on", [("two-level 2 x 2", "flat on 2 ranks"),
                                                  ("flat on 2 ranks", "two-level 2 x 2")])
def test_a_state_resumes_across_layouts_and_rank_counts(uninterrupted, saved_by, resumed_on):
    loss_err, weight_err, _ = resume(uninterrupted, saved_by, resumed_on)
    # Another layout sums gradients in another order: fp32 rounding, amplified a little by Adam
    # (the bound of test_state.py's resume on another world size).
    assert loss_err < 1e-5 and weight_err < 1e-5
