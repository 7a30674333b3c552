// Fused AdamW: the CUDA kernel (registered for the CUDA dispatch key).
//
// A grid-stride elementwise loop; each thread takes kVec = 4 consecutive elements per
// iteration and loads/stores them as one vector (16 bytes of fp32, 8 of bf16/fp16) when
// every tensor's base address is aligned to that, else element by element. The math, the
// rounding and the random bits are adamw.h's, compiled with --fmad=false (CMakeLists.txt),
// so the result is bitwise the CPU kernel's. Compiled only when torch has CUDA.
#include <type_traits>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adamw_op.h"

namespace lima {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Loads `count` (<= N) elements at ptr + i: one vector load when the pack is full and the
// caller has checked alignment (kAligned), else scalar loads.
template <bool kAligned, typename T, int N>
__device__ __forceinline__ Pack<T, N> load(const T* ptr, int64_t i, int count) {
  Pack<T, N> p{};
  if (kAligned && count == N) {
    p = *reinterpret_cast<const Pack<T, N>*>(ptr + i);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < count) p.v[j] = ptr[i + j];
  }
  return p;
}

template <bool kAligned, typename T, int N>
__device__ __forceinline__ void store(T* ptr, int64_t i, int count, const Pack<T, N>& p) {
  if (kAligned && count == N) {
    *reinterpret_cast<Pack<T, N>*>(ptr + i) = p;
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (j < count) ptr[i + j] = p.v[j];
  }
}

template <Grad G, Moments M, Copy C, bool kAligned>
__global__ void __launch_bounds__(kThreads) adamw_kernel(Args a) {
  using GradT = std::conditional_t<G == Grad::F32, float, uint16_t>;
  using MomentT = std::conditional_t<M == Moments::F32, float, uint16_t>;
  const Scalars s = a.s;
  const GradT* grad = static_cast<const GradT*>(a.grad);
  MomentT* exp_avg = static_cast<MomentT*>(a.exp_avg);
  MomentT* exp_avg_sq = static_cast<MomentT*>(a.exp_avg_sq);
  uint16_t* out = static_cast<uint16_t*>(a.copy);

  const int64_t stride = int64_t(gridDim.x) * blockDim.x * kVec;
  for (int64_t i = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; i < a.numel;
       i += stride) {
    const int count = a.numel - i < kVec ? int(a.numel - i) : kVec;
    Pack<float, kVec> p = load<kAligned, float, kVec>(a.param, i, count);
    const Pack<GradT, kVec> g = load<kAligned, GradT, kVec>(grad, i, count);
    Pack<MomentT, kVec> m = load<kAligned, MomentT, kVec>(exp_avg, i, count);
    Pack<MomentT, kVec> v = load<kAligned, MomentT, kVec>(exp_avg_sq, i, count);
    Pack<uint16_t, kVec> o{};
    // Stream keys for this element's high index word (constant within the pack: i is a
    // multiple of kVec, and 2^32 is too).
    const uint32_t kc = block_key(s.key_copy, i);
    const uint32_t km = block_key(s.key_exp_avg, i);
    const uint32_t kv = block_key(s.key_exp_avg_sq, i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const uint32_t i32 = uint32_t(i + j);
      float gj, mj, vj;
      if constexpr (G == Grad::F32) gj = g.v[j]; else gj = bf16_to_f32(g.v[j]);
      if constexpr (M == Moments::F32) {
        mj = m.v[j];
        vj = v.v[j];
      } else {
        mj = bf16_to_f32(m.v[j]);
        vj = bf16_to_f32(v.v[j]);
      }
      adamw_element(p.v[j], gj, mj, vj, s);
      if constexpr (M == Moments::F32) {
        m.v[j] = mj;
        v.v[j] = vj;
      } else {
        m.v[j] = f32_to_bf16_sr(mj, random_bits(km, i32));
        v.v[j] = f32_to_bf16_sr(vj, random_bits(kv, i32));
      }
      if constexpr (C == Copy::BF16) o.v[j] = f32_to_bf16_rne(p.v[j]);
      if constexpr (C == Copy::F16) o.v[j] = f32_to_f16_rne(p.v[j]);
      if constexpr (C == Copy::BF16_SR) o.v[j] = f32_to_bf16_sr(p.v[j], random_bits(kc, i32));
      if constexpr (C == Copy::F16_SR) o.v[j] = f32_to_f16_sr(p.v[j], random_bits(kc, i32));
    }
    store<kAligned, float, kVec>(a.param, i, count, p);
    store<kAligned, MomentT, kVec>(exp_avg, i, count, m);
    store<kAligned, MomentT, kVec>(exp_avg_sq, i, count, v);
    if constexpr (C != Copy::None) store<kAligned, uint16_t, kVec>(out, i, count, o);
  }
}

bool aligned(const void* ptr, int64_t elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % (elem_size * kVec) == 0;
}

// As many blocks as the SMs hold at once (the compiled instance's occupancy: 4 to 6 blocks of
// 256 threads on sm_80/sm_90 by `python bench/aot.py`), at most one per kVec x kThreads
// elements; then the grid-stride loop.
template <typename Kernel>
void launch_resident(Kernel kernel, const Args& a, int sms, cudaStream_t stream) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
  const int64_t needed = (a.numel + int64_t(kThreads) * kVec - 1) / (int64_t(kThreads) * kVec);
  const int blocks = int(std::min<int64_t>(needed, int64_t(sms) * std::max(per_sm, 1)));
  kernel<<<blocks, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <Grad G, Moments M, Copy C>
void launch(const Args& a, int sms, cudaStream_t stream) {
  const int64_t gsize = G == Grad::F32 ? 4 : 2;
  const int64_t msize = M == Moments::F32 ? 4 : 2;
  const bool vec = aligned(a.param, 4) && aligned(a.grad, gsize) && aligned(a.exp_avg, msize) &&
                   aligned(a.exp_avg_sq, msize) && (a.copy == nullptr || aligned(a.copy, 2));
  if (vec)
    launch_resident(adamw_kernel<G, M, C, true>, a, sms, stream);
  else
    launch_resident(adamw_kernel<G, M, C, false>, a, sms, stream);
}

template <Grad G, Moments M>
void launch_copy(const Args& a, int sms, cudaStream_t stream) {
  switch (a.copy_kind) {
    case Copy::None: return launch<G, M, Copy::None>(a, sms, stream);
    case Copy::BF16: return launch<G, M, Copy::BF16>(a, sms, stream);
    case Copy::F16: return launch<G, M, Copy::F16>(a, sms, stream);
    case Copy::BF16_SR: return launch<G, M, Copy::BF16_SR>(a, sms, stream);
    case Copy::F16_SR: return launch<G, M, Copy::F16_SR>(a, sms, stream);
  }
}

void fused_adamw_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_copy,
                      double lr, double beta1, double beta2, double eps, double weight_decay,
                      int64_t step, std::optional<int64_t> seed) {
  const Args a = prepare_adamw(param, grad, exp_avg, exp_avg_sq, param_copy, lr, beta1, beta2,
                               eps, weight_decay, step, seed, c10::DeviceType::CUDA);
  if (a.numel == 0) return;
  const c10::cuda::CUDAGuard guard(param.device());
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, param.get_device()));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool g16 = a.grad_kind == Grad::BF16;
  const bool m16 = a.moment_kind == Moments::BF16;
  if (!g16 && !m16) return launch_copy<Grad::F32, Moments::F32>(a, sms, stream);
  if (!g16 && m16) return launch_copy<Grad::F32, Moments::BF16>(a, sms, stream);
  if (g16 && !m16) return launch_copy<Grad::BF16, Moments::F32>(a, sms, stream);
  return launch_copy<Grad::BF16, Moments::BF16>(a, sms, stream);
}

}  // namespace
}  // namespace lima

TORCH_LIBRARY_IMPL(lima, CUDA, m) { m.impl("fused_adamw_", &lima::fused_adamw_cuda); }
