// Philox uniforms: Triton's `tl.rand(seed, offset + arange(n))`, bit for bit, on the CPU.
//
// Reference: triton.language.random (philox -> randint -> uint_to_uniform_float) and its
// plain-torch emulation, kernels/lima_kernels/philox.py (philox_uniform, the test oracle).
// Element i uses counter c = offset + i:
//   key     (k0, k1)         = (seed & 0xFFFFFFFF, seed >> 32)
//   counter (c0, c1, c2, c3) = (c & 0xFFFFFFFF, c >> 32, 0, 0)
//   10 Philox-4x32 rounds, the key bumped by (0x9E3779B9, 0xBB67AE85) after each
//   word    = c0 of the result
//   u       = float(int32(word >= 2^31 ? ~word : word)) * float(4.6566127342e-10)   in [0, 1)
// (~word is 2^32 - 1 - word: Triton's "x < 0 -> -x - 1" on the word read as int32.) The int32
// -> fp32 conversion rounds to nearest, as torch's int64 -> fp32 does for values below 2^31,
// and the product is one fp32 multiply, so every implementation gives the same bits. This file
// includes no torch header (philox_cpu_loop.cpp is compiled once per instruction set).
// Limits: seeds in [0, 2^63), counters in [0, 2^63), as in the emulation (philox_op.cpp checks).
#pragma once

#include <cstdint>

#define LIMA_PHILOX_INLINE inline __attribute__((always_inline))

namespace lima {
namespace philox {

constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr int kRounds = 10;
// Triton's scale, a Python float (double) rounded to fp32, as the emulation's fp32 tensor is.
constexpr float kScale = static_cast<float>(4.6566127342e-10);

// The first output word of Philox-4x32-10 for key (k0, k1) and counter (c0, c1, 0, 0).
LIMA_PHILOX_INLINE uint32_t c0_word(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1) {
  uint32_t c2 = 0, c3 = 0;
#pragma GCC unroll 10
  for (int r = 0; r < kRounds; ++r) {
    const uint64_t pb = uint64_t(kRoundB) * c2;  // 32 x 32 -> 64: hi and lo words
    const uint64_t pa = uint64_t(kRoundA) * c0;
    const uint32_t n0 = uint32_t(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = uint32_t(pa >> 32) ^ c3 ^ k1;
    c1 = uint32_t(pb);
    c3 = uint32_t(pa);
    c0 = n0;
    c2 = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c0;
}

// Triton's uint_to_uniform_float for one 32-bit word.
LIMA_PHILOX_INLINE float to_uniform(uint32_t word) {
  const uint32_t x = word >= 0x80000000u ? ~word : word;  // [0, 2^31)
  return float(int32_t(x)) * kScale;
}

}  // namespace philox

// ---- host entry points --------------------------------------------------------------------
// Defined in philox_cpu_loop.cpp (one copy per instruction set): writes out[i] for i in
// [begin, end), element i using counter offset + i (offset + end <= 2^63).
namespace cpu_default {
void philox_uniform_range(uint64_t seed, int64_t offset, float* out, int64_t begin, int64_t end);
}
namespace cpu_avx2 {
void philox_uniform_range(uint64_t seed, int64_t offset, float* out, int64_t begin, int64_t end);
}

}  // namespace lima
