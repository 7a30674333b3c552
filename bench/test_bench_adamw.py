"""Fused AdamW benchmarks: the native op (lima_core.native.adamw.FusedAdamW) against
torch.optim.AdamW with foreach=True and with fused=True, one step over one flat fp32 tensor of
16M and of 64M parameters (LIMA's hyperparameters), in the same run; and the trainer's real
step, which also writes the bf16 copy for the next all-gather: lima in one pass against torch's
fused step followed by a cast (`copy.copy_(param)`).

Bytes moved are the minimum traffic of a step, the same for every implementation: read param,
grad, exp_avg, exp_avg_sq and write param, exp_avg, exp_avg_sq (28 bytes per parameter in
fp32), plus 2 for the rows that also write a bf16 copy. Each benchmark's `extra_info` holds the
median step time, bytes moved, GB/s, the fraction of the copy bandwidth measured in this run
(bench_ceilings.py), and for lima's rows the speedups over their torch counterparts (torch's
rows of the same group run first). CPU rows always run (2 threads on the CI machine); the same
rows on CUDA are marked `gpu` (`pytest bench/test_bench_adamw.py -m gpu`).
"""

import statistics
import time

import pytest
import torch

from lima_core.native import adamw as fused_adamw

SIZES = {"16M": 16 << 20, "64M": 64 << 20}
# torch first: lima's ratios need them.
IMPLS = ["torch-foreach", "torch-fused", "torch-fused+cast", "lima", "lima-bf16-copy"]
BASELINES = {"lima": ("torch-foreach", "torch-fused"), "lima-bf16-copy": ("torch-fused+cast",)}
HYPER = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
_MEDIAN_MS: dict[tuple[str, str], dict[str, float]] = {}  # (device, size) -> {impl: median ms}


def _step(impl: str, n: int, device: str):
    """(one optimizer step over one flat fp32 parameter with its grad set, bytes it must move)."""
    param = torch.nn.Parameter(torch.randn(n, device=device))
    param.grad = torch.randn(n, device=device)
    copy = torch.empty(n, device=device, dtype=torch.bfloat16)
    if impl.startswith("torch"):
        fused = impl != "torch-foreach"
        optimizer = torch.optim.AdamW([param], fused=fused, foreach=not fused, **HYPER)
        if impl == "torch-fused+cast":
            def step():
                optimizer.step()
                copy.copy_(param.detach())
            return step, 30 * n
        return optimizer.step, 28 * n
    if not fused_adamw.available():
        pytest.skip(fused_adamw.unavailable_reason())
    copies = {param: copy} if impl == "lima-bf16-copy" else {}
    return fused_adamw.FusedAdamW([param], copies=copies, **HYPER).step, (30 if copies else 28) * n


def _time(benchmark, step, device: str, rounds: int, warmup: int) -> float:
    """Median ms of `step` over `rounds` (CUDA events on a GPU, wall clock on CPU)."""
    times = []

    def run():
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)

    benchmark.pedantic(run, rounds=rounds, warmup_rounds=warmup, iterations=1)
    return statistics.median(times[warmup:])


def _bench(benchmark, ceilings, device: str, size: str, impl: str):
    n = SIZES[size]
    step, nbytes = _step(impl, n, device)
    benchmark.group = f"fused_adamw {device} {size}"
    rounds, warmup = (20, 3) if device == "cuda" else ((10, 2) if n <= SIZES["16M"] else (5, 1))
    median_ms = _time(benchmark, step, device, rounds, warmup)
    gbps = nbytes / (median_ms * 1e-3) / 1e9
    info = dict(op="fused_adamw", shape=[n], mode="step", impl=impl, median_ms=median_ms, bytes_moved=nbytes,
                GBps=gbps, fraction_of_copy_bandwidth=gbps / ceilings["copy_bandwidth_GBps"])
    if impl.startswith("lima"):
        info["cpu_isa"] = torch.ops.lima.fused_adamw_cpu_isa()
    done = _MEDIAN_MS.setdefault((device, size), {})
    done[impl] = median_ms
    for base in BASELINES.get(impl, ()):
        if base in done:
            info[f"speedup_vs_{base.replace('-', '_').replace('+', '_')}"] = done[base] / median_ms
    benchmark.extra_info.update(info)


CASES = [(size, impl) for size in SIZES for impl in IMPLS]


@pytest.mark.parametrize("size,impl", CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_adamw_cpu(benchmark, ceilings, device, size, impl):
    if device != "cpu":  # bench/conftest.py measures the ceilings of one device per run
        pytest.skip("the CPU rows run where the run's device is the CPU")
    _bench(benchmark, ceilings, "cpu", size, impl)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("size,impl", CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_adamw_cuda(benchmark, ceilings, size, impl):
    _bench(benchmark, ceilings, "cuda", size, impl)
