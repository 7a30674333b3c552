// Fused AdamW: the per-element math, rounding and random bits shared by the CPU loop
// (adamw_cpu_loop.cpp) and the CUDA kernel (adamw_cuda.cu); no torch headers.
//
// Reference: torch.optim.AdamW (torch/optim/adam.py, _single_tensor_adam, non-amsgrad,
// non-maximize). The update below performs that loop's fp32 tensor ops in the same order,
// with scalars rounded to fp32 where ATen rounds them (Python floats are doubles):
//   param      = param * (1 - lr*wd)                                          (mul_)
//   exp_avg    = fma(w, grad - exp_avg, exp_avg),     w = 1 - beta1 < 0.5       (lerp_)
//              = fma(w - 1, grad - exp_avg, grad)     otherwise
//   exp_avg_sq = fma((1 - beta2) * grad, grad, exp_avg_sq * beta2)     (mul_, addcmul_)
//   denom      = sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps          (sqrt, div, add_)
//   param      = param + (-(lr / (1 - beta1^step)) * exp_avg) / denom            (addcdiv_)
// The two fmas are where torch's own CPU kernels (vectorized lerp; GCC-contracted addcmul)
// and CUDA kernels (nvcc contracts by default) fuse; everything else is built without FMA
// contraction (-ffp-contract=off, nvcc --fmad=false), so the CPU and CUDA kernels give the
// same bits, and on an x86-64 CPU with FMA the moments equal torch's bit for bit. (torch's
// CPU sqrt is not correctly rounded; ours is, so param may differ from torch's by an ulp of
// the update.) Known limit: on a CPU without FMA the default loop calls a software fmaf and
// runs about 4x slower.
//
// Rounding to 16 bits: round to nearest even, or stochastic rounding (SR) driven by a
// counter-based hash of (seed, step, stream, element index), so a result is reproducible
// and independent of threading, launch shape and backend. Known limit: SR to fp16 of values
// in fp16's subnormal range (|x| < 2^-14) uses 24 random bits, so its probabilities are
// exact to 2^-24 (an error below 2^-24 of an ulp); everywhere else SR is exactly unbiased.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LIMA_HD __host__ __device__ __forceinline__
#else
#define LIMA_HD inline __attribute__((always_inline))
#endif

namespace lima {

// ---- element kinds ------------------------------------------------------------------
enum class Grad : int { F32 = 0, BF16 = 1 };
enum class Moments : int { F32 = 0, BF16 = 1 };  // bf16 moments are always stored with SR
enum class Copy : int { None = 0, BF16 = 1, F16 = 2, BF16_SR = 3, F16_SR = 4 };

// fp32 constants of one step, computed once on the host (make_scalars in adamw_op.cpp).
struct Scalars {
  float decay;          // 1 - lr*wd
  float lerp_coef;      // w = 1 - beta1 if w < 0.5, else w - 1
  uint32_t lerp_self_mask;  // all ones if w < 0.5 (the lerp starts from exp_avg), zero if
                            // it starts from grad
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  uint32_t key_copy;    // SR stream keys, from (seed, step)
  uint32_t key_exp_avg;
  uint32_t key_exp_avg_sq;
};

// Everything one launch needs; tensors are flat and contiguous with `numel` elements.
struct Args {
  float* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* copy;  // nullptr when Copy::None
  int64_t numel;
  Grad grad_kind;
  Moments moment_kind;
  Copy copy_kind;
  Scalars s;
};

// ---- bit casts ----------------------------------------------------------------------
LIMA_HD uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

LIMA_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

LIMA_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

// ---- fp32 -> 16-bit rounding ------------------------------------------------------------
// bf16 is the top half of fp32: round the low 16 bits away. NaN -> 0x7FC0, as c10 does.
LIMA_HD uint16_t f32_to_bf16_rne(float x) {
  const uint32_t b = f32_bits(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// SR: add 16 random bits below bf16's last bit and truncate; the carry happens with
// probability (distance to the lower neighbour) / ulp. Finite values never carry past inf.
LIMA_HD uint16_t f32_to_bf16_sr(float x, uint32_t r) {
  const uint32_t b = f32_bits(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return uint16_t((b + (r & 0xFFFFu)) >> 16);
}

// fp16 (1-5-10). Normal range: re-bias the exponent (127 -> 15) in place and round away
// the low 13 mantissa bits. Subnormal range: |x| + 0.5 puts round(|x| / 2^-24) (to nearest
// even, by the FPU) into the low mantissa bits of a number in [0.5, 1).
LIMA_HD uint16_t f32_to_f16_rne(float x) {
  const uint32_t b = f32_bits(x);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7FFFFFFFu;
  // Every case is computed and one is selected, so the CPU loop stays branch-free.
  const uint32_t r = a - (112u << 23);
  const uint32_t normal = (r + 0x0FFFu + ((r >> 13) & 1u)) >> 13;
  const uint32_t subnormal = f32_bits(f32_from_bits(a) + 0.5f) - 0x3F000000u;  // 0x400: 2^-14
  uint32_t h = a >= 0x38800000u ? normal : subnormal;  // 2^-14: smallest normal
  h = a >= 0x477FF000u ? 0x7C00u : h;                  // >= 65520 rounds to inf
  h = a > 0x7F800000u ? 0x7E00u : h;                   // NaN
  return uint16_t(sign | h);
}

LIMA_HD uint16_t f32_to_f16_sr(float x, uint32_t r) {
  const uint32_t b = f32_bits(x);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7FFFFFFFu;
  // Normal range: 13 random bits below fp16's last bit, then truncate.
  const uint32_t t = (a + (r & 0x1FFFu)) & ~0x1FFFu;
  const uint32_t normal = (t - (112u << 23)) >> 13;
  // Subnormal range: q = |x| / 2^-24 in [0, 1024) (exact); round up with probability
  // frac(q), drawn with 24 random bits.
  const float q = f32_from_bits(a) * 16777216.0f;
  const int32_t floor_q = int32_t(q < 1024.0f ? q : 0.0f);  // (normal x gives q >= 1024)
  const float u = float(int32_t(r >> 8)) * 5.9604644775390625e-08f;  // [0, 1)
  const uint32_t subnormal = uint32_t(floor_q) + (u < q - float(floor_q) ? 1u : 0u);
  uint32_t h = a >= 0x38800000u ? normal : subnormal;
  h = (a >= 0x38800000u && t >= 0x47800000u) ? 0x7C00u : h;  // >= 65536: inf
  h = a > 0x7F800000u ? 0x7E00u : h;                          // NaN
  return uint16_t(sign | h);
}

// ---- random bits ------------------------------------------------------------------------
// A 32-bit integer hash (xorshift-multiply, two rounds), applied to the element index mixed
// with a per-stream key. The high index word is folded into the key first, so the CPU loop
// can hoist it out of blocks that do not cross a multiple of 2^32.
LIMA_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  x ^= x >> 15;
  return x;
}

LIMA_HD uint32_t block_key(uint32_t key, int64_t i) {
  return mix32(key ^ uint32_t(uint64_t(i) >> 32));
}

LIMA_HD uint32_t random_bits(uint32_t block_key, uint32_t index_low) {
  return mix32(index_low ^ block_key);
}

// ---- the update -------------------------------------------------------------------------
// One element in fp32: param p, gradient g, moments m and v (all updated in place).
LIMA_HD void adamw_element(float& p, float g, float& m, float& v, const Scalars& s) {
  p = p * s.decay;
  // ATen's lerp: m + w*(g - m) for w < 0.5, else g - (1 - w)*(g - m). The base is picked
  // with a bit mask rather than a branch on a scalar, which GCC does not vectorize.
  const float base =
      f32_from_bits((f32_bits(m) & s.lerp_self_mask) | (f32_bits(g) & ~s.lerp_self_mask));
  m = fmaf(s.lerp_coef, g - m, base);
  v = fmaf(s.one_minus_beta2 * g, g, v * s.beta2);
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  p = p + s.neg_step_size * m / denom;
}

// ---- host entry points --------------------------------------------------------------------
// Defined in adamw_cpu_loop.cpp (one copy per instruction set): elements [begin, end).
namespace cpu_default {
void adamw_range(const Args& args, int64_t begin, int64_t end);
}
namespace cpu_avx2 {
void adamw_range(const Args& args, int64_t begin, int64_t end);
}

}  // namespace lima
