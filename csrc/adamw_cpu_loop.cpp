// Fused AdamW: the CPU inner loop over elements [begin, end) of one flat shard.
//
// Plain loops over raw pointers that the compiler vectorizes (one instantiation per
// grad / moment / copy kind, so the loop body has no branches on them). This file includes
// no torch header: CMake compiles it once per instruction set, with LIMA_CPU_NS naming the
// namespace (cpu_default: the baseline ISA; cpu_avx2: -mavx2 -mfma on x86-64), and
// adamw_op.cpp picks one at run time. Both are built with -ffp-contract=off, so the ISA
// changes the speed, never the bits.
#include <algorithm>
#include <type_traits>

#include "adamw.h"
#include "cpu_isa.h"

namespace lima {
namespace LIMA_CPU_NS {
namespace {

// One block of n elements starting at element `lo`; the pointers are already offset to it.
// They are parameters (not locals) because GCC honours __restrict on parameters only, and
// without it the loop needs more run-time alias checks than it is willing to emit.
template <Grad G, Moments M, Copy C>
void block(float* __restrict p, const void* __restrict grad, void* __restrict exp_avg,
           void* __restrict exp_avg_sq, uint16_t* __restrict out, uint32_t n, int64_t lo,
           const Scalars& s_) {
  using GradT = std::conditional_t<G == Grad::F32, float, uint16_t>;
  using MomentT = std::conditional_t<M == Moments::F32, float, uint16_t>;
  const GradT* __restrict g = static_cast<const GradT*>(grad);
  MomentT* __restrict m = static_cast<MomentT*>(exp_avg);
  MomentT* __restrict v = static_cast<MomentT*>(exp_avg_sq);
  const Scalars s = s_;
  const uint32_t lo32 = uint32_t(lo);
  const uint32_t kc = block_key(s.key_copy, lo);
  const uint32_t km = block_key(s.key_exp_avg, lo);
  const uint32_t kv = block_key(s.key_exp_avg_sq, lo);
  for (uint32_t j = 0; j < n; ++j) {
    const uint32_t i32 = lo32 + j;  // low word of the element index, for the random bits
    float pj = p[j];
    float gj, mj, vj;
    if constexpr (G == Grad::F32) gj = g[j]; else gj = bf16_to_f32(g[j]);
    if constexpr (M == Moments::F32) {
      mj = m[j];
      vj = v[j];
    } else {
      mj = bf16_to_f32(m[j]);
      vj = bf16_to_f32(v[j]);
    }

    adamw_element(pj, gj, mj, vj, s);

    p[j] = pj;
    if constexpr (M == Moments::F32) {
      m[j] = mj;
      v[j] = vj;
    } else {
      m[j] = f32_to_bf16_sr(mj, random_bits(km, i32));
      v[j] = f32_to_bf16_sr(vj, random_bits(kv, i32));
    }
    if constexpr (C == Copy::BF16) out[j] = f32_to_bf16_rne(pj);
    if constexpr (C == Copy::F16) out[j] = f32_to_f16_rne(pj);
    if constexpr (C == Copy::BF16_SR) out[j] = f32_to_bf16_sr(pj, random_bits(kc, i32));
    if constexpr (C == Copy::F16_SR) out[j] = f32_to_f16_sr(pj, random_bits(kc, i32));
  }
}

template <Grad G, Moments M, Copy C>
void loop(const Args& a, int64_t begin, int64_t end) {
  const int64_t gsize = G == Grad::F32 ? 4 : 2;
  const int64_t msize = M == Moments::F32 ? 4 : 2;
  // Blocks never cross a multiple of 2^32 elements, so the high word of the index (and
  // with it each stream's block key) is constant inside a block, and the vectorized inner
  // loop counts in 32 bits.
  for (int64_t lo = begin; lo < end;) {
    const int64_t hi =
        std::min<int64_t>({end, lo + (int64_t(1) << 30), (lo | int64_t(0xFFFFFFFF)) + 1});
    block<G, M, C>(a.param + lo, static_cast<const char*>(a.grad) + lo * gsize,
                   static_cast<char*>(a.exp_avg) + lo * msize,
                   static_cast<char*>(a.exp_avg_sq) + lo * msize,
                   a.copy ? static_cast<uint16_t*>(a.copy) + lo : nullptr, uint32_t(hi - lo), lo,
                   a.s);
    lo = hi;
  }
}

template <Grad G, Moments M>
void with_copy(const Args& a, int64_t begin, int64_t end) {
  switch (a.copy_kind) {
    case Copy::None: return loop<G, M, Copy::None>(a, begin, end);
    case Copy::BF16: return loop<G, M, Copy::BF16>(a, begin, end);
    case Copy::F16: return loop<G, M, Copy::F16>(a, begin, end);
    case Copy::BF16_SR: return loop<G, M, Copy::BF16_SR>(a, begin, end);
    case Copy::F16_SR: return loop<G, M, Copy::F16_SR>(a, begin, end);
  }
}

}  // namespace

void adamw_range(const Args& a, int64_t begin, int64_t end) {
  const bool g16 = a.grad_kind == Grad::BF16;
  const bool m16 = a.moment_kind == Moments::BF16;
  if (!g16 && !m16) return with_copy<Grad::F32, Moments::F32>(a, begin, end);
  if (!g16 && m16) return with_copy<Grad::F32, Moments::BF16>(a, begin, end);
  if (g16 && !m16) return with_copy<Grad::BF16, Moments::F32>(a, begin, end);
  return with_copy<Grad::BF16, Moments::BF16>(a, begin, end);
}

}  // namespace LIMA_CPU_NS
}  // namespace lima
