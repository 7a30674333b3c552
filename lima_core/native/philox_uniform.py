"""Philox uniforms for the CPU path's dropout: the native op `torch.ops.lima.philox_uniform`
(csrc/philox_op.cpp, built into lima_core/_C.so) and `uniform`, which calls it for CPU tensors.

`uniform(seed, offset, n, device)` has the signature of `lima_kernels.philox.philox_uniform`
and gives the same float32 bits: Triton's `tl.rand(seed, offset + arange(n))` (Philox-4x32-10,
then uint_to_uniform_float; csrc/philox.h). The emulation computes it in about 60 int64 torch
ops an element; the native op runs the rounds in 32-bit vector lanes on every thread, about
250x faster on a 2-core CPU, so LIMA's residual dropout adds 3-4% to a CPU training step
instead of more than doubling it (bench/test_bench_dropout.py).

Limits: seeds in [0, 2**63), counters offset + i in [0, 2**63) (ValueError otherwise). The
native op is CPU only: other devices, and a build without lima_core/_C.so
(`native.unavailable_reason()`), get the emulation, which gives the same bits.
"""

from __future__ import annotations

import torch

from lima_core import native
from lima_kernels.philox import check_stream, philox_uniform

if native.available():

    @torch.library.register_fake("lima::philox_uniform")
    def _philox_uniform_fake(seed, offset, n):
        """Shape and dtype only: float32 [n] on the CPU."""
        torch._check(n >= 0, lambda: f"philox_uniform: n must be >= 0, got {n}")
        return torch.empty(n, dtype=torch.float32, device="cpu")


def uniform(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """n float32 uniforms in [0, 1), element i from counter offset + i: equal bit for bit to
    `lima_kernels.philox.philox_uniform(seed, offset, n, device)` (and to Triton's `tl.rand`).
    The native op draws them for a CPU device (None: torch's default device) when the library
    is built; anything else gets the emulation."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type != "cpu" or not native.available():
        return philox_uniform(seed, offset, n, device)
    seed, offset = check_stream(seed, offset, n)  # the emulation's checks, so both paths fail alike
    return torch.ops.lima.philox_uniform(seed, offset, n)  # [n] float32
