"""LIMA's residual dropout on the CPU: what it adds to a training step.

One training step (forward and backward of the packed rows of one global batch, no optimizer)
of the `tiny` preset on the bundled data, as `make train` runs it (configs/tiny.toml: 8
conversations a step; the bundled tokenizer; encode_conversation + pack, max_len 2048; the
first batch of epoch 0), three ways in the same run:

- `dropout-0`: no residual dropout;
- `dropout-0.2`: LIMA's ramp with p_top = 0.2, masks drawn by the native Philox op
  (lima_core.native.philox_uniform.uniform -> torch.ops.lima.philox_uniform);
- `dropout-0.2-emulated`: the same masks (bit for bit) drawn by the plain-torch emulation
  (lima_kernels.philox.philox_uniform), the CPU path before the native op.

Target: dropout-0.2 <= 1.10 x dropout-0. Then the step's uniforms alone (`draw-*`: the same
count, one call), native against emulated. Each row's `extra_info` holds its median; the
last row writes the medians, the ratios and the machine (CPU model, cores, threads, torch, the
op's ISA, the load average before the run) to `bench/results/<date>-cpu-<n>core-dropout.json`.
CPU only (the CUDA path runs the Triton kernels, bench/test_bench_kernels.py).
"""

import json
import os
import platform
import statistics
import time
import tomllib
from datetime import date
from pathlib import Path

import pytest
import torch

from lima_core import native
from lima_core.data.encode import encode_conversation
from lima_core.data.formats import read_conversations
from lima_core.data.packing import epoch_batches, pack
from lima_core.data.tokenizer import Tokenizer
from lima_core.model import dispatch as ops
from lima_core.model.llama import Llama
from lima_core.model.shapes import ModelConfig
from lima_core.native import philox_uniform as philox
from lima_kernels.philox import philox_uniform

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "lima_core" / "assets"
RESULTS = Path(__file__).resolve().parent / "results"
TRAIN = tomllib.loads((ROOT / "configs" / "tiny.toml").read_text())["train"]
MAX_LEN = 2048  # TrainConfig.max_len's default; configs/tiny.toml keeps it
DATA_SEED = 1234  # TrainConfig.seed's default: the epoch order and the dropout seeds
P_TOP = 0.2
TARGET = 1.10
# (p_top, stream) per row, run in this order: the ratios need dropout-0 first.
STEPS = {"dropout-0": (0.0, None), "dropout-0.2": (P_TOP, "native"), "dropout-0.2-emulated": (P_TOP, "emulated")}
ROUNDS = {"dropout-0": (9, 2), "dropout-0.2": (9, 2), "dropout-0.2-emulated": (3, 1)}  # (rounds, warmup)
_MEDIAN_S: dict[str, float] = {}
_INFO: dict = {}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU benchmark (the GPU runs the Triton kernels)")


@pytest.fixture(scope="module")
def setup():
    """(model, packed rows of one global batch, uniforms the dropout of one step draws)."""
    tokenizer = Tokenizer(ASSETS / "tokenizer.model")
    examples = [encode_conversation(tokenizer, turns, MAX_LEN) for turns in read_conversations(ASSETS / "train.jsonl")]
    batch = epoch_batches(examples, TRAIN["batch_size"], epoch=0, seed=DATA_SEED)[0]
    rows = pack(batch, MAX_LEN)
    cfg = ModelConfig.from_name(TRAIN["model"], vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id,
                                eos_id=tokenizer.eos_id)
    model = Llama(cfg)  # CPU tensors: ops take the plain-torch path, whose masks philox.uniform draws
    model.init_weights(torch.Generator().manual_seed(DATA_SEED))
    model.train()
    model.set_residual_dropout(P_TOP)
    dropped_layers = sum(block.dropout > 0 for block in model.layers)
    tokens = sum(r.tokens.numel() for r in rows)
    _INFO.update(conversations=len(batch), rows=len(rows), tokens=tokens, model=TRAIN["model"],
                 uniforms_per_step=2 * dropped_layers * tokens * cfg.dim)
    return model, rows, _INFO["uniforms_per_step"]


def _step(model, rows, p_top: float):
    """Forward and backward of every row (train.loop.forward_backward's work for one rank)."""
    model.set_residual_dropout(p_top)
    n_targets = sum(r.num_targets for r in rows)

    def step():
        model.zero_grad(set_to_none=True)
        for micro, row in enumerate(rows):
            seed = ops.mix_seed(ops.mix_seed(DATA_SEED, 0), micro) if p_top else None  # (seed, step), row
            loss_sum, _ = model(row.tokens, row.labels, positions=row.positions, cu_seqlens=row.cu_seqlens,
                                max_seqlen=row.max_seqlen, dropout_seed=seed)
            (loss_sum / n_targets).backward()
    return step


def _time(benchmark, fn, rounds: int, warmup: int) -> float:
    """Median wall seconds of fn over `rounds` (after `warmup`)."""
    times = []

    def run():
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return statistics.median(times[warmup:])


def _machine() -> dict:
    """The CPU as /proc/cpuinfo names it (model name, family/model/stepping), cores, versions."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not key.strip():
                    break  # the first processor's block only
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name") or platform.processor() or "unknown"
    ident = "/".join(fields.get(k, "?") for k in ("cpu family", "model", "stepping"))
    return {"cpu": cpu, "cpu_family_model_stepping": ident, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "philox_cpu_isa": torch.ops.lima.philox_uniform_cpu_isa() if native.available() else None,
            "load_average_before": _INFO.get("load_average_before")}


@pytest.mark.parametrize("impl", list(STEPS))
def test_dropout_step(benchmark, setup, monkeypatch, impl):
    model, rows, _ = setup
    p_top, stream = STEPS[impl]
    assert stream != "native" or native.available(), native.unavailable_reason()
    if stream == "emulated":
        monkeypatch.setattr(philox, "uniform", philox_uniform)  # ops looks it up at each call
    _INFO.setdefault("load_average_before", os.getloadavg())
    benchmark.group = f"train step, {TRAIN['model']}, {_INFO['tokens']} tokens, dropout on the CPU"
    median = _time(benchmark, _step(model, rows, p_top), *ROUNDS[impl])
    _MEDIAN_S[impl] = median
    info = dict(impl=impl, p_top=p_top, stream=stream, median_s=median, **_INFO)
    if impl != "dropout-0" and "dropout-0" in _MEDIAN_S:
        info["ratio_vs_dropout_0"] = median / _MEDIAN_S["dropout-0"]
    benchmark.extra_info.update(info)
    print(f"\n{impl}: median step {median * 1e3:.0f} ms" +
          (f", {info['ratio_vs_dropout_0']:.3f}x dropout-0" if "ratio_vs_dropout_0" in info else ""))


@pytest.mark.parametrize("impl", ["draw-native", "draw-emulated"])
def test_draw(benchmark, setup, impl):
    """One step's uniforms in one call: the op alone."""
    _, _, n = setup
    assert impl != "draw-native" or native.available(), native.unavailable_reason()
    draw = (lambda: torch.ops.lima.philox_uniform(DATA_SEED, 0, n)) if impl == "draw-native" else (
        lambda: philox_uniform(DATA_SEED, 0, n))
    benchmark.group = f"{n} Philox uniforms on the CPU"
    median = _time(benchmark, draw, *((9, 2) if impl == "draw-native" else (3, 1)))
    _MEDIAN_S[impl] = median
    benchmark.extra_info.update(impl=impl, uniforms=n, median_s=median, ns_per_uniform=median / n * 1e9)
    if impl == "draw-emulated" and "draw-native" in _MEDIAN_S:
        benchmark.extra_info["native_speedup"] = median / _MEDIAN_S["draw-native"]
    _write_results()


def _write_results():
    """bench/results/<date>-cpu-<cores>core-dropout.json, once every row has run."""
    if not all(k in _MEDIAN_S for k in (*STEPS, "draw-native", "draw-emulated")):
        return
    base = _MEDIAN_S["dropout-0"]
    ratio = _MEDIAN_S["dropout-0.2"] / base
    results = {
        "benchmark": "bench/test_bench_dropout.py",
        "date": date.today().isoformat(),
        "machine": _machine(),
        "workload": {k: _INFO[k] for k in ("model", "conversations", "rows", "tokens", "uniforms_per_step")}
        | {"p_top": P_TOP, "max_len": MAX_LEN, "step": "forward + backward of every packed row, no optimizer"},
        "median_step_s": {k: _MEDIAN_S[k] for k in STEPS},
        "rounds": {k: ROUNDS[k][0] for k in STEPS},
        "ratio_dropout_0.2_vs_dropout_0": ratio,
        "ratio_dropout_0.2_emulated_vs_dropout_0": _MEDIAN_S["dropout-0.2-emulated"] / base,
        "target": f"dropout-0.2 <= {TARGET:.2f}x dropout-0",
        "target_met": ratio <= TARGET,
        "draw_one_step_s": {"native": _MEDIAN_S["draw-native"], "emulated": _MEDIAN_S["draw-emulated"]},
        "native_draw_speedup": _MEDIAN_S["draw-emulated"] / _MEDIAN_S["draw-native"],
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{results['date']}-cpu-{os.cpu_count()}core-dropout.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\ndropout-0.2 step / dropout-0 step = {ratio:.3f} (target <= {TARGET:.2f}); "
          f"emulated: {results['ratio_dropout_0.2_emulated_vs_dropout_0']:.2f}; written to {path}")
