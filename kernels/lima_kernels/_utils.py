"""Small helpers shared by the kernel files: launch configuration, device, layout and
argument checks, and occupancy (blocks per SM of a compiled kernel), which sizes the grids
of persistent kernels on a GPU and lima-core's compile report (bench/aot.py) without one.

Under `TRITON_INTERPRET=1` (the CPU test path) kernels run in Triton's numpy
interpreter, whose cost grows with the number of programs, and `@triton.autotune`
with several configs fails; launchers therefore pick one small config there and
GPU-sized configs otherwise.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

import torch
import triton


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors unless the interpreter runs them on CPU."""
    if interpreting():
        return
    for t in tensors:
        if t.device.type != "cuda":
            raise RuntimeError(
                f"lima_kernels Triton ops need CUDA tensors (got {t.device}); on CPU use "
                "lima_kernels.reference, or set TRITON_INTERPRET=1 before importing triton"
            )


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """t itself if its last dim is contiguous (row-wise kernels take a row stride), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_dropout_args(p: float, seed, offset) -> None:
    """Dropout rate in [0, 1); Philox seed in [0, 2**63) and counter offset >= 0, checked
    when they are Python ints."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if isinstance(seed, int) and not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if isinstance(offset, int) and offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")


def check_same_shape(x: torch.Tensor, residual: torch.Tensor) -> None:
    """The residual ops take x and residual of one shape (no broadcasting)."""
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have the same shape")


# ----------------------------------------------------------------------------------------
# Occupancy: how many blocks of one compiled kernel an SM holds at once
# ----------------------------------------------------------------------------------------

KiB = 1024


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of an NVIDIA GPU (sm_80 and newer), as cuda_occupancy.h models them.

    Registers are allocated per warp in units of `reg_unit` from `sub_partitions` equal
    register files; shared memory per block in units of `smem_unit`, plus `smem_reserved`
    bytes the driver keeps per block. `sms`: the SM count."""

    sms: int
    smem: int  # shared memory per SM, bytes (the largest carveout)
    smem_per_block: int  # opt-in maximum a block may use, bytes
    regs: int = 65536  # 32-bit registers per SM
    threads: int = 2048
    blocks: int = 32
    max_regs_per_thread: int = 255
    reg_unit: int = 256
    sub_partitions: int = 4
    smem_unit: int = 128
    smem_reserved: int = 1 * KiB
    warp_size: int = 32


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy_limits(regs_per_thread: int, shared_bytes: int, num_warps: int, limits: SMLimits) -> dict[str, int]:
    """Blocks per SM allowed by each resource for a kernel using `regs_per_thread`
    registers, `shared_bytes` of shared memory (static + dynamic) and `num_warps` warps a
    block; 0 where one block alone does not fit. The occupancy is the smallest value."""
    warps_per_sm = limits.threads // limits.warp_size
    regs_per_warp = _round_up(regs_per_thread * limits.warp_size, limits.reg_unit)
    regs_fit = (
        regs_per_thread <= limits.max_regs_per_thread
        # the hardware checks a block's registers as if its warps filled every sub-partition
        and regs_per_warp * _round_up(num_warps, limits.sub_partitions) <= limits.regs
    )
    warps_per_partition = (limits.regs // limits.sub_partitions) // max(regs_per_warp, 1)
    smem_per_block = _round_up(shared_bytes + limits.smem_reserved, limits.smem_unit)
    smem_fits = smem_per_block <= limits.smem_per_block + limits.smem_reserved
    return {
        "blocks": limits.blocks,
        "threads": warps_per_sm // num_warps,
        "regs": warps_per_partition * limits.sub_partitions // num_warps if regs_fit else 0,
        "smem": limits.smem // smem_per_block if smem_fits else 0,
    }


def blocks_per_sm(regs_per_thread: int, shared_bytes: int, num_warps: int, limits: SMLimits) -> int:
    """How many blocks of the kernel one SM runs at once (0: it cannot run)."""
    return min(occupancy_limits(regs_per_thread, shared_bytes, num_warps, limits).values())


def static_shared_bytes(cubin: bytes, name: str) -> int:
    """Static shared memory of kernel `name` in a cubin: the size of its ELF section
    `.nv.shared.<name>` (Triton's own shared memory is dynamic: metadata.shared)."""
    (shoff,) = struct.unpack_from("<Q", cubin, 0x28)  # ELF64 header: section table offset
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def section(i):  # (name offset, file offset, size)
        name_at, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize)
        return name_at, offset, size

    names_at = section(shstrndx)[1]
    wanted = f".nv.shared.{name}".encode()
    for i in range(shnum):
        name_at, _offset, size = section(i)
        start = names_at + name_at
        if cubin[start:cubin.index(b"\0", start)] == wanted:
            return size
    return 0


# Blocks per SM by compute capability (CUDA C Programming Guide, technical specifications;
# 16, the fewest of sm_75 and newer, elsewhere); torch's device properties give the rest.
_MAX_BLOCKS_PER_SM = {80: 32, 86: 16, 87: 16, 89: 24, 90: 32}


@functools.lru_cache(maxsize=None)
def device_limits(index: int) -> SMLimits:
    """SMLimits of CUDA device `index`, from its properties."""
    props = torch.cuda.get_device_properties(index)
    return SMLimits(
        sms=props.multi_processor_count,
        smem=props.shared_memory_per_multiprocessor,
        smem_per_block=getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block),
        regs=props.regs_per_multiprocessor,
        threads=props.max_threads_per_multi_processor,
        blocks=_MAX_BLOCKS_PER_SM.get(props.major * 10 + props.minor, 16),
        warp_size=props.warp_size,
    )


def num_programs_persistent(kernel, device: torch.device, work: int, args_for, meta: dict) -> int:
    """How many programs a persistent (grid-stride) kernel launches on `device`: as many as
    the GPU runs at once (SMs x the blocks per SM that the compiled kernel's registers and
    shared memory allow), at most `work`. The launch is `kernel[(programs,)](*args_for(programs),
    **meta)`; args_for may give pointers not allocated yet as their torch dtype."""
    if interpreting() or device.type != "cuda":
        return max(1, min(4, work))  # the interpreter pays per program
    limits = device_limits(device.index if device.index is not None else torch.cuda.current_device())
    # Compile (or find) the kernel as launched with one program per SM. Integer arguments that
    # depend on the grid may specialize differently in the real launch (divisible by 16 or
    # not); for the RMSNorm backward that leaves the registers unchanged (every variant,
    # hidden 4096 and 8192, sm_80 and sm_90, compiled by lima-core's bench/aot.py).
    compiled = kernel.warmup(*args_for(min(limits.sms, work)), grid=(1,), **meta)
    compiled._init_handles()  # loads it: the driver reports n_regs
    shared = compiled.metadata.shared + static_shared_bytes(compiled.kernel, compiled.name)
    per_sm = blocks_per_sm(compiled.n_regs, shared, compiled.metadata.num_warps, limits)
    return max(1, min(limits.sms * per_sm, work))


# ----------------------------------------------------------------------------------------
# Launch configs of the row-wise kernels
# ----------------------------------------------------------------------------------------

MAX_ROW = 65536  # row-wise kernels hold a whole row in one block


def row_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for row-wise kernels over rows of length n."""
    if n > MAX_ROW:
        raise ValueError(f"lima_kernels row-wise ops support rows of at most {MAX_ROW} elements, got {n}")
    block_n = triton.next_power_of_2(n)
    if interpreting():
        return 16, block_n, 1  # few, wide programs: the interpreter pays per program
    block_m = max(1, min(16, 1024 // block_n))
    return block_m, block_n, row_num_warps(block_m * block_n)


def row_num_warps(block_elems: int) -> int:
    """num_warps for a row-wise kernel holding `block_elems` elements per program."""
    return max(1, min(16, block_elems // 512))
