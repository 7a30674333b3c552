"""Triton's Philox random numbers (`tl.rand`), reproduced bit for bit in plain torch.

`philox_uniform(seed, offset, n)` equals `tl.rand(seed, offset + tl.arange(0, n))`: Philox-4x32-10
(triton.language.random: randint -> uint_to_uniform_float) computed in int64 torch arithmetic,
so the plain-torch path drops exactly the elements the kernels drop. It is the oracle for every
other implementation of the same stream (lima-core's native CPU op is tested against it).

Limits: seeds are ints in [0, 2**63); counters offset + i must be < 2**63 (split into two 32-bit
words exactly as Triton does for int64 counters). Slow: about 60 int64 tensor ops per element.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_ROUNDS = 10
# Triton's scale for an int32 in [0, 2**31): the largest float with MAX_INT * scale < 1.
_UINT_TO_FLOAT_SCALE = 4.6566127342e-10


def _umulhi32(const: int, x: torch.Tensor) -> torch.Tensor:
    """High 32 bits of const * x for const, x in [0, 2**32), in int64 without overflow."""
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    # const * x = const * x_hi * 2**16 + const * x_lo; every partial product is < 2**48.
    return (const * x_hi + ((const * x_lo) >> 16)) >> 16


def _mullo32(const: int, x: torch.Tensor) -> torch.Tensor:
    """Low 32 bits of const * x for const, x in [0, 2**32), in int64 without overflow."""
    x_lo = x & 0xFFFF
    x_hi = x >> 16
    return (const * x_lo + (((const * x_hi) & 0xFFFF) << 16)) & _M32


def _philox_c0(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """First output word of Philox-4x32-10 for key = seed and counter = (lo, hi, 0, 0).

    Triton: `randint4x` sets c0 = low 32 bits of the counter, c1 = its high 32 bits (0
    for int32 counters), c2 = c3 = 0; `philox` splits the 64-bit seed into
    k0 = seed & 0xFFFFFFFF and k1 = seed >> 32. `randint` returns c0.
    """
    k0 = seed & _M32
    k1 = (seed >> 32) & _M32
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_PHILOX_ROUNDS):
        prev_c0, prev_c2 = c0, c2
        c0 = _umulhi32(_PHILOX_ROUND_B, prev_c2) ^ c1 ^ k0
        c2 = _umulhi32(_PHILOX_ROUND_A, prev_c0) ^ c3 ^ k1
        c1 = _mullo32(_PHILOX_ROUND_B, prev_c2)
        c3 = _mullo32(_PHILOX_ROUND_A, prev_c0)
        k0 = (k0 + _PHILOX_KEY_A) & _M32
        k1 = (k1 + _PHILOX_KEY_B) & _M32
    return c0


def check_stream(seed: int, offset: int, n: int) -> tuple[int, int]:
    """(seed, offset) as ints, or ValueError when the stream would leave [0, 2**63)."""
    seed, offset = int(seed), int(offset)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if offset < 0 or n < 0 or offset + n > 2**63:
        raise ValueError(f"counters offset..offset+n must lie in [0, 2**63), got offset={offset}, n={n}")
    return seed, offset


def philox_uniform(seed: int, offset: int, n: int, device=None) -> torch.Tensor:
    """n float32 uniforms in [0, 1), equal bit for bit to Triton's
    `tl.rand(seed, offset + tl.arange(0, n))` (element i uses counter offset + i)."""
    seed, offset = check_stream(seed, offset, n)
    counter = torch.arange(n, dtype=torch.int64, device=device) + offset  # [n]
    word = _philox_c0(seed, counter)  # [n] int64 in [0, 2**32)
    # uint_to_uniform_float: bitcast to int32, x < 0 -> ~x (= 2**32 - 1 - word), then
    # int32 -> fp32 (round to nearest) times the fp32 scale, in fp32.
    x = torch.where(word >= 2**31, _M32 - word, word)  # [n] in [0, 2**31)
    scale = torch.tensor(_UINT_TO_FLOAT_SCALE, dtype=torch.float32, device=device)
    return x.to(torch.float32) * scale
