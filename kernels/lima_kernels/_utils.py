"""Small helpers shared by the kernel files: launch configuration, device, layout and
argument checks.

Under `TRITON_INTERPRET=1` (the CPU test path) kernels run in Triton's numpy
interpreter, whose cost grows with the number of programs, and `@triton.autotune`
with several configs fails; launchers therefore pick one small config there and
GPU-sized configs otherwise.
"""

from __future__ import annotations

import functools
import os

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


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_programs_persistent(device: torch.device, per_sm: int = 2) -> int:
    """How many programs a persistent (grid-stride) kernel launches on `device`."""
    if interpreting() or device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index) * per_sm


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
