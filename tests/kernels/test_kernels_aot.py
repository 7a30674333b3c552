"""Compiled for GPUs without a GPU: `python bench/aot.py --reduced` compiles every
Triton kernel of lima_kernels/ops (every variant, hidden 4096 / vocab 32000, bf16) and
csrc/*.cu (when nvcc exists) for sm_80 and sm_90, with no error and no spill; and the
occupancy arithmetic the persistent launchers size their grids with (_utils.blocks_per_sm),
checked by hand and against CUDA's own occupancy calculator (cuda_occupancy.h), for the
A100 and H100 limits the report uses."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lima_kernels import _utils
from lima_kernels._utils import KiB, blocks_per_sm, occupancy_limits

AOT = Path(__file__).resolve().parents[2] / "bench" / "aot.py"  # a script of the checkout, in no package


def _load_aot():
    """bench/aot.py as the module `aot` (its dataclasses look their module up in sys.modules)."""
    spec = importlib.util.spec_from_file_location("aot", AOT)
    module = sys.modules["aot"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARCH_LIMITS = _load_aot().ARCH_LIMITS
A100, H100 = ARCH_LIMITS[80], ARCH_LIMITS[90]


def test_occupancy_closed_form():
    """Cases worked by hand from the limits (65536 registers in 4 sub-partitions of 16384,
    allocated per warp in units of 256; 2048 threads; 32 blocks; shared memory per SM
    164 / 228 KiB, per block 163 / 227 KiB, plus 1 KiB the driver reserves per block, in
    units of 128 B)."""
    # The fused-norm backward at hidden 8192 on sm_90: 16 warps, 128 registers, 16 KiB of
    # Triton's shared memory + 1 KiB static. A warp takes 128 * 32 = 4096 registers, a
    # sub-partition holds 16384 / 4096 = 4 warps, the SM 16: one 16-warp block. Shared
    # memory alone would allow 228 KiB // (16 + 1 + 1 KiB) = 12, threads 2048 / 512 = 4.
    assert occupancy_limits(128, 17 * KiB, 16, H100) == {"blocks": 32, "threads": 4, "regs": 1, "smem": 12}
    assert blocks_per_sm(128, 17 * KiB, 16, H100) == 1
    # 64 registers: 2048 a warp, 8 warps a sub-partition, 32 an SM: two 16-warp blocks.
    assert blocks_per_sm(64, 17 * KiB, 16, H100) == 2
    # Registers round up per warp: 33 * 32 = 1056 -> 1280, 16384 // 1280 = 12 warps a
    # sub-partition, 48 an SM: six 8-warp blocks (as 40 registers would give).
    assert blocks_per_sm(33, 0, 8, A100) == blocks_per_sm(40, 0, 8, A100) == 6
    # Sub-partitions, not the whole file: 104 * 32 = 3328 registers a warp; 65536 // 3328
    # would be 19 warps, but 16384 // 3328 = 4 per sub-partition: 16 one-warp blocks.
    assert occupancy_limits(104, 0, 1, A100)["regs"] == 16
    # Shared memory: 100 KiB + 1 KiB reserved = 103424 B a block; 167936 // 103424 = 1 on
    # sm_80, 233472 // 103424 = 2 on sm_90.
    assert occupancy_limits(32, 100 * KiB, 4, A100)["smem"] == 1
    assert occupancy_limits(32, 100 * KiB, 4, H100)["smem"] == 2
    # What cannot run: 163 KiB fits an sm_80 block, a byte more does not; 255 registers x
    # 16 warps = 16 x 8192 > 65536; more than 255 registers a thread.
    assert blocks_per_sm(32, 163 * KiB, 4, A100) == 1
    assert blocks_per_sm(32, 163 * KiB + 1, 4, A100) == 0
    assert blocks_per_sm(255, 0, 16, H100) == 0
    assert blocks_per_sm(256, 0, 1, H100) == 0
    # Tiny blocks stop at 32 per SM.
    assert blocks_per_sm(16, 0, 1, A100) == 32


class _Compiled:
    """What kernel.warmup returns on a GPU, as far as num_programs_persistent reads it."""

    def __init__(self, n_regs):
        self.n_regs, self.kernel, self.name = n_regs, b"", "kernel"
        self.metadata = type("Metadata", (), {"shared": 16 * KiB, "num_warps": 16})

    def _init_handles(self):
        pass


class _Kernel:
    def __init__(self, n_regs):
        self.n_regs, self.warmed_with = n_regs, []

    def warmup(self, *args, grid, **meta):
        self.warmed_with.append((args, meta))
        return _Compiled(self.n_regs)


@pytest.mark.parametrize("n_regs, work, programs", [(128, 10_000, 132), (64, 10_000, 264), (64, 100, 100)])
def test_persistent_grid_from_compiled_kernel(monkeypatch, n_regs, work, programs):
    """On CUDA the persistent grid is SMs x blocks_per_sm of the compiled kernel (an H100's
    132 SMs here; 16 warps, 16 KiB + 1 KiB shared: 128 registers fit one block, 64 two),
    at most `work`; the kernel is warmed up with the arguments of one program per SM."""
    monkeypatch.setattr(_utils, "interpreting", lambda: False)
    monkeypatch.setattr(_utils, "device_limits", lambda index: ARCH_LIMITS[90])
    monkeypatch.setattr(_utils, "static_shared_bytes", lambda cubin, name: 1 * KiB)
    kernel = _Kernel(n_regs)
    got = _utils.num_programs_persistent(kernel, torch.device("cuda", 0), work, lambda p: (p,), {"BLOCK": 1})
    assert got == programs
    assert kernel.warmed_with == [((min(132, work),), {"BLOCK": 1})]


def test_persistent_grid_on_cpu_is_small():
    """Under the interpreter (or off CUDA) nothing is compiled: at most 4 programs."""
    kernel = _Kernel(32)
    assert _utils.num_programs_persistent(kernel, torch.device("cpu"), 1000, lambda p: (p,), {}) == 4
    assert _utils.num_programs_persistent(kernel, torch.device("cpu"), 3, lambda p: (p,), {}) == 3
    assert kernel.warmed_with == []


OCC_PROGRAM = r"""
#include <cstdio>
#include "cuda_occupancy.h"

// stdin: "major regs_per_sm threads_per_sm smem_per_sm smem_per_block_optin" once, then
// "regs warps shared" per case; stdout: blocks per SM of each case.
int main() {
    cudaOccDeviceProp prop;
    size_t smem_sm, smem_optin;
    if (scanf("%d %d %d %zu %zu", &prop.computeMajor, &prop.regsPerMultiprocessor,
              &prop.maxThreadsPerMultiprocessor, &smem_sm, &smem_optin) != 5) return 1;
    prop.computeMinor = 0;
    prop.maxThreadsPerBlock = 1024;
    prop.regsPerBlock = 65536;
    prop.warpSize = 32;
    prop.sharedMemPerBlock = 48 * 1024;
    prop.sharedMemPerMultiprocessor = smem_sm;
    prop.sharedMemPerBlockOptin = smem_optin;
    prop.reservedSharedMemPerBlock = 1024;
    prop.numSms = 1;
    int regs, warps;
    size_t shared;
    while (scanf("%d %d %zu", &regs, &warps, &shared) == 3) {
        cudaOccFuncAttributes attr;  // Triton opts every kernel into the large dynamic limit
        attr.maxThreadsPerBlock = 1024;
        attr.numRegs = regs;
        attr.shmemLimitConfig = FUNC_SHMEM_LIMIT_OPTIN;
        attr.maxDynamicSharedSizeBytes = smem_optin;
        attr.numBlockBarriers = 1;  // __syncthreads
        cudaOccDeviceState state;
        cudaOccResult result;
        if (cudaOccMaxActiveBlocksPerMultiprocessor(&result, &prop, &attr, &state, warps * 32, shared)
            != CUDA_OCC_SUCCESS) return 2;
        printf("%d\n", result.activeBlocksPerMultiprocessor);
    }
    return 0;
}
"""


def _cuda_include() -> Path | None:
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_occupancy.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.parametrize("arch", sorted(ARCH_LIMITS))
def test_occupancy_matches_cuda_occupancy_calculator(arch, tmp_path):
    """blocks_per_sm equals cudaOccMaxActiveBlocksPerMultiprocessor (CUDA's header-only
    calculator, given the same device limits) over registers x warps x shared memory. The
    project's machines carry the CUDA toolkit (aot compiles csrc/ with its nvcc): a missing one
    is a failure, not a skipped check."""
    assert _cuda_include() is not None and shutil.which("g++"), \
        "needs CUDA's include/cuda_occupancy.h (under $CUDA_HOME or /usr/local/cuda) and g++"
    src, exe = tmp_path / "occ.cpp", tmp_path / "occ"
    src.write_text(OCC_PROGRAM)
    subprocess.run(["g++", "-O1", f"-I{_cuda_include()}", str(src), "-o", str(exe)], check=True)
    lim = ARCH_LIMITS[arch]
    cases = [
        (regs, warps, shared)
        for regs in (16, 24, 32, 33, 40, 48, 56, 64, 72, 96, 104, 128, 168, 200, 255)
        for warps in (1, 2, 4, 8, 16, 32)
        for shared in (0, 32, 1 * KiB, 9 * KiB, 17 * KiB, 48 * KiB, 100 * KiB, lim.smem_per_block,
                       lim.smem_per_block + 1)
    ]
    lines = [f"{arch // 10} {lim.regs} {lim.threads} {lim.smem} {lim.smem_per_block}"]
    lines += [f"{r} {w} {s}" for r, w, s in cases]
    out = subprocess.run([str(exe)], input="\n".join(lines), capture_output=True, text=True, check=True).stdout
    expected = [int(v) for v in out.split()]
    ours = [blocks_per_sm(r, s, w, lim) for r, w, s in cases]
    mismatches = [(case, e, o) for case, e, o in zip(cases, expected, ours) if e != o]
    print(f"sm_{arch}: {len(cases)} cases, {len(mismatches)} mismatches")
    assert not mismatches, mismatches[:10]


def test_aot_reduced_matrix_compiles_without_spills(tmp_path):
    """The reduced matrix on both archs: no compile error, no spill, every kernel fits an
    SM; every Triton kernel of lima_kernels/ops is in it (aot checks that itself)."""
    report = tmp_path / "aot.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # tests/conftest.py sets it
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(AOT), "--reduced", "--json", str(report)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    wall = time.perf_counter() - start
    summary = proc.stdout[proc.stdout.find("\n\n"):]
    print(f"{summary}\naot --reduced: {wall:.1f} s wall")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    rows = result["rows"]
    assert result["problems"] == []
    assert all(r["error"] is None and r["local_bytes"] == 0 and r["blocks_per_sm"] >= 1 for r in rows)
    triton_rows = [r for r in rows if r["kernel"].startswith("_")]
    for arch in ARCH_LIMITS:
        kernels = {r["kernel"] for r in triton_rows if r["arch"] == arch}
        assert {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_dropout_add_kernel", "_rotary_kernel",
                "_cross_entropy_kernel"} <= kernels
    if shutil.which("nvcc"):  # csrc/*.cu, device code for both archs
        assert {r["arch"] for r in rows if r["kernel"] == "adamw_kernel"} == set(ARCH_LIMITS), result["nvcc"]


SPILLING_BACKWARD = r"""
import json, re, subprocess, sys, tempfile
from triton import knobs
sys.path.insert(0, sys.argv[1])  # bench/, the folder of aot.py
import aot
(launch,) = [l for l in aot.rms_norm_launches(16384, "bf16", 80) if l.variant == "bwd dz+residual+dropout"]
row = aot.measure(launch, 80)
with tempfile.TemporaryDirectory() as d:
    ptx, cubin = f"{d}/k.ptx", f"{d}/k.cubin"
    open(ptx, "w").write(aot.compile_launch(launch, 80).asm["ptx"])
    log = subprocess.run([knobs.nvidia.ptxas.path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_80", ptx, "-o", cubin],
                         capture_output=True, text=True, check=True).stderr
spill_stores = int(re.search(r"(\d+) bytes spill stores", log).group(1))
print(json.dumps(dict(local_bytes=row.local_bytes, regs=row.regs, problems=row.problems(), spill_stores=spill_stores)))
"""


def test_aot_sees_the_known_spill_at_hidden_16384():
    """The fused-norm backward at hidden 16384 (16 warps: at most 128 registers a thread)
    spills on sm_80: aot reports local memory where ptxas -v reports spill stores, and
    allows it above hidden 8192."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SPILLING_BACKWARD, str(AOT.parent)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print(got)
    assert got["spill_stores"] > 0 and got["local_bytes"] > 0
    assert got["regs"] == 128 and got["problems"] == []
