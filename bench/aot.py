"""lima-core's compile report: every Triton kernel of lima_kernels (and the CUDA kernels of
csrc/) compiled for sm_80 and sm_90 without a GPU, and what each compiled kernel costs an SM.

    python bench/aot.py [--arch 80 90] [--reduced] [--json FILE]      # in a lima-core checkout

Why: a kernel that fails to compile, spills registers or fits fewer blocks per SM than its
launcher assumes shows up here, on a CPU-only machine, before any GPU run.

Why here, in the repository and in no wheel: specializing a kernel as a launch does, without
a GPU, takes Triton's private argument binder (create_function_from_signature, _pack_args,
make_backend, MockTensor), which holds for the triton that requirements.lock pins, not for
every triton >= 3.6 that lima-kernels accepts; and csrc/*.cu ships in neither lima-kernels
nor lima-core's wheel. So the report is a check of this checkout, beside the benchmarks that
run its whole matrix (test_bench_aot.py) and keep its results (results/<date>-aot.json), and
the lima-kernels wheel holds only what its ops run. The A100 and H100 limits below are the
report's alone; the occupancy arithmetic is lima_kernels' own, the one its persistent
launchers use on a GPU.

How: each Triton kernel is specialized exactly as a launch specializes it (Triton's own
argument binder over the values a launcher passes; tensors as 16-byte aligned pointers of
their dtype, as torch allocates them), with the BLOCK sizes, num_warps and constexpr flags
of the launchers' config functions (row_config, rotary_config, dropout_add_config; the
cross-entropy launcher, whose config is inline, is called on meta tensors and its launch
recorded), at LLaMA shapes (hidden 4096 and 8192, head_dim 128, vocab 32000 and 128256, bf16
and fp32, 16384 tokens), and compiled by triton.compile for GPUTarget("cuda", arch, 32).
Registers and local memory per thread come from the cubin (cuobjdump); ptxas puts spilled
registers in the stack frame and these kernels have no local arrays, so local memory means
spills. Shared memory is Triton's (metadata.shared) plus the cubin's static section.
Occupancy is lima_kernels._utils.occupancy_limits, whose minimum (blocks_per_sm) the
persistent launchers size their grids with on a GPU. csrc/*.cu is compiled with nvcc, when
there is one on PATH, for the same archs, while Triton compiles.

Exit status 1 on any compile error, on a kernel that cannot run (0 blocks per SM), or on any
spill at hidden <= 8192. The RMSNorm kernels are also compiled at hidden 16384, where a spill
is reported but allowed. --reduced compiles one shape and dtype per kernel (every variant,
both archs): the test suite's run (tests/kernels/test_kernels_aot.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature

from lima_kernels import ops
from lima_kernels._utils import KiB, SMLimits, interpreting, occupancy_limits, row_config, static_shared_bytes
from lima_kernels.ops import dropout_add, linear_cross_entropy, rms_norm, rotary

TOKENS = 16384  # rows per launch: 8 sequences of 2048 tokens (a multiple of 16, as batches are)
HEAD_DIM = 128
KV_HEADS = 8  # grouped-query attention's k heads (LLaMA-2 70B, LLaMA-3)
SEED = 0x5DEECE66D2545F49  # a 63-bit seed as lima_core.model.dispatch.mix_seed makes them: an i64 argument
MAX_HIDDEN_WITHOUT_SPILLS = 8192
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
CSRC = Path(__file__).resolve().parents[1] / "csrc"  # lima-core's native ops

ARCH_LIMITS = {  # the parts the report compiles for
    80: SMLimits(sms=108, smem=164 * KiB, smem_per_block=163 * KiB),  # A100 SXM4
    90: SMLimits(sms=132, smem=228 * KiB, smem_per_block=227 * KiB),  # H100 SXM5
}


@dataclass
class Launch:
    """One kernel launch as a launcher makes it: every argument by name (tensors as
    MockTensor of their dtype) and num_warps."""

    kernel: object  # triton JITFunction
    variant: str
    dtype: str
    size: str  # the shape that sets the config, e.g. "hidden 4096"
    hidden: int | None  # spills are errors up to MAX_HIDDEN_WITHOUT_SPILLS
    args: dict
    num_warps: int
    persistent: bool = False  # grid = SMs x blocks per SM


@dataclass
class Row:
    """One compiled kernel: what it costs an SM."""

    kernel: str
    variant: str
    arch: int
    dtype: str
    size: str
    num_warps: int
    regs: int | None = None  # 32-bit registers per thread
    local_bytes: int | None = None  # local memory per thread: ptxas' stack frame, i.e. spills
    shared: int | None = None  # bytes per block, static + dynamic
    blocks_per_sm: int | None = None
    limited_by: str = ""
    persistent: bool = False
    spill_allowed: bool = False
    error: str | None = None

    def problems(self) -> list[str]:
        """Why this row fails the run: an error, a spill not allowed, or no room on an SM."""
        if self.error:
            return [self.error]
        out = []
        if self.local_bytes and not self.spill_allowed:
            out.append(f"spills: {self.local_bytes} B of local memory per thread at {self.size}")
        if self.blocks_per_sm == 0:
            out.append(f"does not fit an SM (limited by {self.limited_by})")
        return out


# ----------------------------------------------------------------------------------------
# The launches: each kernel at the configs its launcher picks on CUDA
# ----------------------------------------------------------------------------------------


def rms_norm_launches(hidden: int, dtype: str, arch: int):
    """RMSNorm forward (plain, + residual, + residual dropout) and backward (plain, and the
    fused op's with/without dropout, with/without a gradient arriving on the residual)."""
    block_m, block_n, num_warps = row_config(hidden)
    t, f32 = MockTensor(DTYPES[dtype]), MockTensor(torch.float32)
    shape = dict(M=TOKENS, N=hidden)
    size = f"hidden {hidden}"
    for residual, dropout in ((False, False), (True, False), (True, True)):
        p = 0.1 if dropout else 0.0
        args = dict(
            X=t, R=t, W=t, Z=t, Y=t, RSTD=f32, **shape, **strides(rms_norm._rms_norm_fwd_kernel, hidden),
            eps=1e-6, p=p, scale=1 / (1 - p), seed=SEED if dropout else 0, offset=0,
            HAS_RESIDUAL=residual, HAS_DROPOUT=dropout, BLOCK_M=block_m, BLOCK_N=block_n,
        )
        variant = "fwd " + flags(residual=residual, dropout=dropout)
        yield Launch(rms_norm._rms_norm_fwd_kernel, variant, dtype, size, hidden, args, num_warps)
    # rows_per_program as rms_norm_bwd warms the kernel up: one program per SM (reference part).
    programs = min(ARCH_LIMITS[arch].sms, triton.cdiv(TOKENS, block_m))
    for has_dz, residual, dropout in (
        (False, False, False), (False, True, False), (True, True, False), (False, True, True), (True, True, True)
    ):
        p = 0.1 if dropout else 0.0
        args = dict(
            DY=t, DZ=t, Z=t, W=t, RSTD=f32, DX=t, DR=t, DW_PARTIAL=f32, **shape,
            **strides(rms_norm._rms_norm_bwd_kernel, hidden), rows_per_program=triton.cdiv(TOKENS, programs),
            p=p, scale=1 / (1 - p), seed=SEED if dropout else 0, offset=0,
            HAS_DZ=has_dz, HAS_RESIDUAL=residual, HAS_DROPOUT=dropout, BLOCK_M=block_m, BLOCK_N=block_n,
        )
        variant = "bwd " + flags(dz=has_dz, residual=residual, dropout=dropout)
        yield Launch(rms_norm._rms_norm_bwd_kernel, variant, dtype, size, hidden, args, num_warps, persistent=True)


def dropout_add_launches(hidden: int, dtype: str, arch: int):
    """Residual dropout + add forward, and its backward (no residual)."""
    block, num_warps = dropout_add.dropout_add_config()
    t = MockTensor(DTYPES[dtype])
    for variant, residual in (("fwd", True), ("bwd", False)):
        args = dict(
            X=t, R=t, Y=t, numel=TOKENS * hidden, p=0.1, scale=1 / 0.9, seed=SEED, offset=0,
            HAS_RESIDUAL=residual, BLOCK=block,
        )
        yield Launch(dropout_add._dropout_add_kernel, variant, dtype, f"hidden {hidden}", hidden, args, num_warps)


def rotary_launches(hidden: int, dtype: str, arch: int):
    """RoPE forward and backward on q (hidden / 128 heads) and k (8 heads) of [1, T, H, 128]."""
    t = MockTensor(DTYPES[dtype])
    for name, heads in (("q", hidden // HEAD_DIM), ("k", KV_HEADS)):
        block_t, block_h, block_half, num_warps = rotary.rotary_config(heads, HEAD_DIM)
        x_strides = dict(stride_xb=TOKENS * heads * HEAD_DIM, stride_xs=heads * HEAD_DIM, stride_xh=HEAD_DIM)
        cos_strides = dict(  # cos/sin [1, T, 128]
            stride_cb=TOKENS * HEAD_DIM, stride_cs=HEAD_DIM, stride_sb=TOKENS * HEAD_DIM, stride_ss=HEAD_DIM
        )
        y_strides = {k.replace("_x", "_y"): v for k, v in x_strides.items()}
        for backward in (False, True):
            args = dict(
                X=t, COS=t, SIN=t, Y=t, n_tokens=TOKENS, seq_len=TOKENS, n_heads=heads, half=HEAD_DIM // 2,
                **x_strides, **cos_strides, **y_strides,
                BACKWARD=backward, BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_HALF=block_half,
            )
            variant = f"{'bwd' if backward else 'fwd'} {name} ({heads} heads)"
            yield Launch(rotary._rotary_kernel, variant, dtype, f"hidden {hidden}", hidden, args, num_warps)


def cross_entropy_launches(vocab: int, dtype: str, arch: int):
    """Cross-entropy rows of one logits chunk: the loss alone (evaluation), and the loss and
    its gradient (over the fp32 logits, or into a buffer of the bf16 weight's dtype)."""
    chunk = linear_cross_entropy.default_chunk_size(TOKENS, 4096, vocab)
    logits = torch.empty((chunk, vocab), dtype=torch.float32, device="meta")
    labels = torch.empty((chunk,), dtype=torch.int64, device="meta")
    loss = torch.empty((chunk,), dtype=torch.float32, device="meta")
    grad = logits if dtype == "fp32" else torch.empty_like(logits, dtype=DTYPES[dtype])
    for variant, g in (("loss", None), ("loss+grad", grad)):
        kernel, args, num_warps = recorded_launch(
            linear_cross_entropy, "_cross_entropy_kernel", linear_cross_entropy.cross_entropy_rows,
            logits, labels, -100, loss, g,
        )
        yield Launch(kernel, variant, dtype, f"vocab {vocab}", None, args, num_warps)


def recorded_launch(module, kernel_name: str, launcher, *launcher_args):
    """(kernel, its arguments by name, num_warps) as `launcher(*launcher_args)` launches
    module.<kernel_name> on CUDA: a stand-in takes the kernel's place for the call and
    records it (meta tensors: nothing runs). For launchers whose config is written inline."""
    kernel, calls = getattr(module, kernel_name), []

    class StandIn:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((args, kwargs))

    setattr(module, kernel_name, StandIn())
    try:
        launcher(*launcher_args)
    finally:
        setattr(module, kernel_name, kernel)
    ((args, kwargs),) = calls
    num_warps = kwargs.pop("num_warps")
    named = dict(zip(kernel.arg_names, args), **kwargs)
    return kernel, {k: MockTensor(v.dtype) if isinstance(v, torch.Tensor) else v for k, v in named.items()}, num_warps


def strides(kernel, value: int) -> dict:
    """Every stride_* argument of `kernel` set to `value` (rows of contiguous [M, N] tensors)."""
    return {name: value for name in kernel.arg_names if name.startswith("stride")}


def flags(**on) -> str:
    return "+".join(name for name, value in on.items() if value) or "plain"


def launches(reduced: bool, arch: int):
    """Every launch of the matrix for one arch (reduced: hidden 4096, vocab 32000, bf16)."""
    dtypes = ["bf16"] if reduced else list(DTYPES)
    hiddens = [4096] if reduced else [4096, 8192]
    vocabs = [32000] if reduced else [32000, 128256]
    for dtype in dtypes:
        for hidden in hiddens + ([] if reduced else [16384]):  # 16384: the known spill, reported
            yield from rms_norm_launches(hidden, dtype, arch)
        for hidden in hiddens:
            yield from dropout_add_launches(hidden, dtype, arch)
            yield from rotary_launches(hidden, dtype, arch)
        for vocab in vocabs:
            yield from cross_entropy_launches(vocab, dtype, arch)


def ops_kernels() -> set[str]:
    """Names of every Triton kernel defined in lima_kernels/ops/*.py: each must be in the matrix."""
    names = set()
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"{ops.__name__}.{info.name}")
        names.update(
            name for name, obj in vars(module).items()
            if isinstance(obj, JITFunction) and obj.__module__ == module.__name__  # defined there, not imported
        )
    return names


# ----------------------------------------------------------------------------------------
# Compiling and measuring
# ----------------------------------------------------------------------------------------


def compile_launch(launch: Launch, arch: int):
    """triton.compile of the kernel specialized as `kernel[grid](**launch.args)` would be."""
    kernel = launch.kernel
    missing, extra = set(kernel.arg_names) - set(launch.args), set(launch.args) - set(kernel.arg_names)
    if missing or extra:
        raise TypeError(f"{kernel.__name__}: arguments missing {sorted(missing)}, unknown {sorted(extra)}")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.args, num_warps=launch.num_warps)
    bound, specialization, options = bind(**kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(binary: bytes) -> dict[tuple[str, str], dict[str, int]]:
    """(arch, function) -> {"REG", "STACK", "SHARED", "LOCAL", ...} of every function in a
    cubin or fatbin, as cuobjdump reads them."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(binary)
        f.flush()
        text = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    usage, arch, function = {}, "", None
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"Function (\S+):", line):
            function = m.group(1)
        elif function and line.startswith("REG:"):
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            function = None
    return usage


def measure(launch: Launch, arch: int) -> Row:
    row = Row(
        launch.kernel.__name__, launch.variant, arch, launch.dtype, launch.size, launch.num_warps,
        persistent=launch.persistent,
        spill_allowed=launch.hidden is not None and launch.hidden > MAX_HIDDEN_WITHOUT_SPILLS,
    )
    try:
        compiled = compile_launch(launch, arch)
    except Exception as err:  # every failure is a row of the report
        row.error = f"{type(err).__name__}: {err}".splitlines()[0]
        return row
    (usage,) = resource_usage(compiled.asm["cubin"]).values()
    static = static_shared_bytes(compiled.asm["cubin"], compiled.name)
    if static != usage["SHARED"]:  # the ELF reader the launchers use at run time, checked
        row.error = f"static shared memory: ELF section {static} B, cuobjdump {usage['SHARED']} B"
    fill(row, usage, compiled.metadata.shared + static, compiled.metadata.num_warps)
    return row


def fill(row: Row, usage: dict[str, int], shared: int, num_warps: int) -> None:
    """Registers, local memory, shared memory and occupancy of a compiled kernel into its row."""
    regs = usage["REG"]
    limits = occupancy_limits(regs, shared, num_warps, ARCH_LIMITS[row.arch])
    row.regs, row.local_bytes, row.shared, row.num_warps = regs, usage["STACK"] + usage["LOCAL"], shared, num_warps
    row.blocks_per_sm = min(limits.values())
    row.limited_by = "/".join(name for name, blocks in limits.items() if blocks == row.blocks_per_sm)


# ----------------------------------------------------------------------------------------
# csrc/*.cu with nvcc
# ----------------------------------------------------------------------------------------


def start_nvcc(archs: list[int], workdir: Path):
    """Start nvcc on csrc/*.cu for `archs` (one fatbin per source; the device code only, with
    torch's include dirs and nvcc flags and CMakeLists.txt's --fmad=false). Returns
    ([(source, fatbin, process)], notes), or None where there is no nvcc or no csrc/."""
    nvcc = shutil.which("nvcc")
    sources = sorted(CSRC.glob("*.cu"))
    if nvcc is None or not sources:
        return None
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    includes, notes = include_paths(), []
    # torch's CPU wheels ship c10/cuda's headers but not the header CMake generates for them:
    # stand in the one line it holds in the CUDA wheels.
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(d) / generated).exists() for d in includes):
        shim = workdir / "include"
        (shim / generated).parent.mkdir(parents=True)
        (shim / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes = [str(shim), *includes]
        notes.append(f"torch {torch.__version__} lacks {generated}; compiled with a one-line stand-in")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    procs = []
    for src in sources:
        out = workdir / f"{src.stem}.fatbin"
        cmd = [nvcc, "-fatbin", "-std=c++20", "--fmad=false", *COMMON_NVCC_FLAGS, *gencode,
               *[f"-I{d}" for d in includes], f"-I{CSRC}", str(src), "-o", str(out)]
        procs.append((src, out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    return procs, notes


def finish_nvcc(procs) -> list[Row]:
    """Rows of every kernel nvcc compiled (threads per block: the source's kThreads)."""
    rows = []
    for src, out, proc in procs:
        log = proc.communicate()[0]
        if proc.returncode != 0:
            tail = " | ".join(line for line in log.splitlines() if "error" in line)[:500]
            rows.append(Row(src.name, "nvcc", 0, "-", "-", 0, error=f"nvcc failed ({proc.returncode}): {tail}"))
            continue
        threads = re.search(r"constexpr int kThreads = (\d+);", src.read_text())
        for (arch, name), usage in resource_usage(out.read_bytes()).items():
            kernel, variant = demangle(name)
            row = Row(kernel, variant, int(arch.removeprefix("sm_")), "-", src.name, 0)
            if threads is None:
                row.error = f"{src.name}: no `constexpr int kThreads = N;` to size its blocks"
            else:
                fill(row, usage, usage["SHARED"], int(threads.group(1)) // 32)
            rows.append(row)
    return rows


def demangle(name: str) -> tuple[str, str]:
    """("adamw_kernel", "Grad 0, Moments 1, Copy 0, false") from a mangled template kernel
    (enum template arguments by value)."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt:
        name = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip()
    m = re.search(r"(\w+)<(.*)>\(", name)
    if not m:
        return name, "-"
    template = re.sub(r"\((?:\w+::)*(\w+)\)", r"\1 ", m.group(2))  # "(lima::Grad)0" -> "Grad 0"
    return m.group(1), template


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

COLUMNS = [  # (header, field, width)
    ("kernel", "kernel", 22), ("variant", "variant", 33), ("arch", "arch", 5), ("dtype", "dtype", 5),
    ("size", "size", 17), ("warps", "num_warps", 5), ("regs", "regs", 4), ("local B", "local_bytes", 7),
    ("smem B", "shared", 6), ("blocks/SM", "blocks_per_sm", 9), ("limited by", "limited_by", 14),
]


def print_table(rows: list[Row]) -> None:
    print("  ".join(f"{h:<{w}}" for h, _, w in COLUMNS))
    for row in rows:
        cells = []
        for _, field, width in COLUMNS:
            value = getattr(row, field)
            cells.append(f"{'-' if value is None else value:<{width}}")
        line = "  ".join(cells).rstrip()
        print(line + (f"  ERROR {row.error}" if row.error else ""))


def print_limits(archs: list[int]) -> None:
    for arch in archs:
        lim = ARCH_LIMITS[arch]
        print(
            f"sm_{arch}: {lim.regs} registers/SM in {lim.sub_partitions} sub-partitions, allocated per warp in units "
            f"of {lim.reg_unit} (max {lim.max_regs_per_thread}/thread); {lim.threads} threads and {lim.blocks} "
            f"blocks/SM; shared memory {lim.smem // 1024} KiB/SM, {lim.smem_per_block // 1024} KiB/block, "
            f"+{lim.smem_reserved} B reserved per block, in units of {lim.smem_unit} B; {lim.sms} SMs"
        )


def print_summary(rows: list[Row], nvcc_note: str) -> list[str]:
    problems = [f"{r.kernel} {r.variant} sm_{r.arch} {r.dtype} {r.size}: {p}" for r in rows for p in r.problems()]
    allowed = [r for r in rows if r.local_bytes and r.spill_allowed]
    print(f"\n{len(rows)} kernels; {len(problems)} problems")
    for r in allowed:
        print(f"spill allowed (hidden > {MAX_HIDDEN_WITHOUT_SPILLS}): {r.kernel} {r.variant} sm_{r.arch} {r.dtype} "
              f"{r.size}: {r.regs} regs + {r.local_bytes} B of local memory per thread")
    grids = {}  # persistent kernels: programs = SMs x blocks per SM
    for r in rows:
        if r.persistent and not r.error:
            key = f"{r.kernel} sm_{r.arch} ({ARCH_LIMITS[r.arch].sms} SMs) {r.dtype} {r.size}"
            grids.setdefault(key, []).append(f"{r.variant} {r.blocks_per_sm}/SM")
    for key, variants in grids.items():
        print(f"persistent grid {key}: {', '.join(variants)}")
    print(f"nvcc: {nvcc_note}")
    for p in problems:
        print(f"PROBLEM {p}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/aot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(ARCH_LIMITS), choices=sorted(ARCH_LIMITS))
    parser.add_argument("--reduced", action="store_true", help="one shape and dtype per kernel (the test suite's)")
    parser.add_argument("--json", type=Path, help="also write the rows and limits to this file")
    opts = parser.parse_args(argv)
    if interpreting():
        print("bench/aot.py compiles real kernels: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        nvcc = start_nvcc(opts.arch, Path(workdir))  # runs while Triton compiles
        rows = [measure(launch, arch) for arch in opts.arch for launch in launches(opts.reduced, arch)]
        for arch in opts.arch:  # a kernel without a launch in the matrix is an error too
            for name in sorted(ops_kernels() - {r.kernel for r in rows if r.arch == arch}):
                rows.append(Row(name, "-", arch, "-", "-", 0, error="no launch of it in bench/aot.py"))
        if nvcc is None:
            nvcc_note = "skipped (no nvcc on PATH, or no csrc/*.cu)"
        else:
            procs, notes = nvcc
            nvcc_rows = finish_nvcc(procs)
            rows += nvcc_rows
            compiled = sorted({r.kernel for r in nvcc_rows if not r.error})
            nvcc_note = "; ".join([f"{len(nvcc_rows)} kernels of {', '.join(s.name for s, _, _ in procs)} "
                                   f"({', '.join(compiled)})", *notes])
    print_limits(opts.arch)
    print_table(rows)
    problems = print_summary(rows, nvcc_note)
    print(f"compiled in {time.perf_counter() - start:.1f} s")
    if opts.json:
        limits = {arch: asdict(ARCH_LIMITS[arch]) for arch in opts.arch}
        report = dict(rows=[asdict(r) for r in rows], limits=limits, nvcc=nvcc_note, problems=problems)
        opts.json.write_text(json.dumps(report, indent=1))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
