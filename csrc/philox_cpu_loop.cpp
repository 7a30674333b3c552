// Philox uniforms: the CPU inner loop over elements [begin, end) (see philox.h).
//
// This file includes no torch header: CMake compiles it once per instruction set, with
// LIMA_CPU_NS naming the namespace (cpu_default: the baseline ISA; cpu_avx2: -mavx2 -mfma on
// x86-64), and philox_op.cpp picks one at run time. Integer math and one fp32 multiply: the
// ISA changes the speed, never the bits.
//
// Baseline: a plain loop over 32-bit counters that the compiler vectorizes (the ten rounds
// unrolled into its body). AVX2: eight elements at a time with intrinsics, each 32-bit word in
// the low half of a 64-bit lane, so every 32 x 32 -> 64 multiply is one vpmuludq whose high
// half is the next word (GCC's own vectorization of the plain loop spends more shuffles
// repacking words than multiplying and runs ~2.5x slower).
#include <algorithm>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "philox.h"
#include "cpu_isa.h"

namespace lima {
namespace LIMA_CPU_NS {
namespace {

#if defined(__AVX2__)

// Elements j in [0, n) of a block: counters (c0_first + j, c1).
void block(float* out, uint32_t n, uint32_t k0, uint32_t k1, uint32_t c0_first, uint32_t c1) {
  // The round keys, broadcast once (round r uses key + r * (kKeyA, kKeyB)).
  __m256i key0[philox::kRounds], key1[philox::kRounds];
  for (int r = 0; r < philox::kRounds; ++r) {
    key0[r] = _mm256_set1_epi64x(k0 + uint32_t(r) * philox::kKeyA);
    key1[r] = _mm256_set1_epi64x(k1 + uint32_t(r) * philox::kKeyB);
  }
  const __m256i round_a = _mm256_set1_epi64x(philox::kRoundA);
  const __m256i round_b = _mm256_set1_epi64x(philox::kRoundB);
  const __m256i high = _mm256_set1_epi64x(c1);
  // Elements 0, 2, 4, 6 in one register, 1, 3, 5, 7 in the other (one per 64-bit lane).
  const __m256i iota[2] = {_mm256_setr_epi64x(0, 2, 4, 6), _mm256_setr_epi64x(1, 3, 5, 7)};
  const __m256 scale = _mm256_set1_ps(philox::kScale);
  uint32_t j = 0;
  for (; j + 8 <= n; j += 8) {
    // Only the low half of each lane is meaningful: vpmuludq reads the low halves, and the
    // xors leave garbage in the high halves, which nothing reads.
    const __m256i first = _mm256_set1_epi64x(c0_first + j);  // no wrap: see philox_uniform_range
    __m256i c0[2], c1w[2], c2[2], c3[2];
    for (int h = 0; h < 2; ++h) {
      c0[h] = _mm256_add_epi32(first, iota[h]);
      c1w[h] = high;
      c2[h] = _mm256_setzero_si256();
      c3[h] = _mm256_setzero_si256();
    }
#pragma GCC unroll 10
    for (int r = 0; r < philox::kRounds; ++r) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256i pb = _mm256_mul_epu32(c2[h], round_b);  // 64-bit products: hi, lo
        const __m256i pa = _mm256_mul_epu32(c0[h], round_a);
        c0[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1w[h]), key0[r]);
        c2[h] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[h]), key1[r]);
        c1w[h] = pb;  // low halves: the low words of the products
        c3[h] = pa;
      }
    }
    // Words back in element order: even elements' words stay in the low halves, odd ones
    // move into the high halves.
    const __m256i word = _mm256_blend_epi32(c0[0], _mm256_slli_epi64(c0[1], 32), 0xAA);
    // uint_to_uniform_float: word >= 2^31 (negative as int32) -> ~word, then int32 -> fp32.
    const __m256i x = _mm256_xor_si256(word, _mm256_srai_epi32(word, 31));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(x), scale));
  }
  for (; j < n; ++j) out[j] = philox::to_uniform(philox::c0_word(k0, k1, c0_first + j, c1));
}

#else

// Elements j in [0, n) of a block: counters (c0_first + j, c1). `out` is a parameter (not a
// local) because GCC honours __restrict on parameters only.
void block(float* __restrict out, uint32_t n, uint32_t k0, uint32_t k1, uint32_t c0_first,
           uint32_t c1) {
  for (uint32_t j = 0; j < n; ++j)
    out[j] = philox::to_uniform(philox::c0_word(k0, k1, c0_first + j, c1));
}

#endif

}  // namespace

void philox_uniform_range(uint64_t seed, int64_t offset, float* out, int64_t begin, int64_t end) {
  const uint32_t k0 = uint32_t(seed);
  const uint32_t k1 = uint32_t(seed >> 32);
  for (int64_t i = begin; i < end;) {
    const uint64_t c = uint64_t(offset) + uint64_t(i);  // < 2^63
    // Blocks end at the next multiple of 2^32 of the counter, so the high counter word is
    // constant inside a block and the low one never wraps, and hold at most 2^30 elements,
    // so their length fits a 32-bit count.
    const int64_t stop = std::min<int64_t>(
        {end, i + (int64_t(1) << 30), i + int64_t((c | 0xFFFFFFFFull) + 1 - c)});
    block(out + i, uint32_t(stop - i), k0, k1, uint32_t(c), uint32_t(c >> 32));
    i = stop;
  }
}

}  // namespace LIMA_CPU_NS
}  // namespace lima
