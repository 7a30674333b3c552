// Philox uniforms: the op's schema, argument checks and the CPU implementation.
//
//   torch.ops.lima.philox_uniform(seed, offset, n) -> Tensor   (float32 [n], on the CPU)
//
// Element i equals Triton's `tl.rand(seed, offset + i)` bit for bit (philox.h), so the CPU
// path's dropout drops exactly the elements the Triton kernels drop. Threaded over elements
// (at::parallel_for); each element depends only on (seed, offset + i), so the bits do not
// depend on the number of threads. The fake (meta) implementation is registered in Python:
// lima_core/native/philox_uniform.py.
//
// The op has no tensor argument, so the dispatcher has no device to dispatch on: the kernel is
// registered for CompositeExplicitAutograd (the slot such ops use) and always returns a CPU
// tensor. Known limit: seeds in [0, 2^63) and counters offset + i in [0, 2^63), as in the
// emulation (lima_kernels.philox).
#include "philox.h"

#include <limits>
#include <string>
#include <utility>

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace lima {
namespace {

using RangeFn = void (*)(uint64_t, int64_t, float*, int64_t, int64_t);

// The widest loop this CPU runs; both give the same bits (philox_cpu_loop.cpp).
std::pair<RangeFn, const char*> cpu_loop() {
#if defined(LIMA_HAVE_AVX2_LOOP)
  if (__builtin_cpu_supports("avx2")) return {&cpu_avx2::philox_uniform_range, "avx2"};
#endif
  return {&cpu_default::philox_uniform_range, "default"};
}

at::Tensor philox_uniform_cpu(int64_t seed, int64_t offset, int64_t n) {
  TORCH_CHECK(seed >= 0, "philox_uniform: seed must be in [0, 2**63), got ", seed);
  TORCH_CHECK(offset >= 0, "philox_uniform: offset must be >= 0, got ", offset);
  TORCH_CHECK(n >= 0, "philox_uniform: n must be >= 0, got ", n);
  // offset + n <= 2^63, written without overflow: the last counter, offset + n - 1, fits int64.
  TORCH_CHECK(n == 0 || offset <= std::numeric_limits<int64_t>::max() - (n - 1),
              "philox_uniform: counters offset..offset+n must lie in [0, 2**63), got offset=",
              offset, ", n=", n);
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(at::kFloat).device(at::kCPU));
  float* data = out.mutable_data_ptr<float>();
  static const RangeFn range = cpu_loop().first;
  constexpr int64_t kGrain = 1 << 15;  // elements (~0.1 ms): below this one thread draws them all
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    range(uint64_t(seed), offset, data, begin, end);
  });
  return out;
}

std::string cpu_isa() { return cpu_loop().second; }

}  // namespace
}  // namespace lima

// A fragment: the library itself (TORCH_LIBRARY(lima, ...)) is opened in adamw_op.cpp.
TORCH_LIBRARY_FRAGMENT(lima, m) {
  m.set_python_module("lima_core.native.philox_uniform");
  m.def("philox_uniform(int seed, int offset, int n) -> Tensor");
  // Which CPU loop philox_uniform runs here ("avx2" or "default"), for benchmark reports.
  m.def("philox_uniform_cpu_isa() -> str", &lima::cpu_isa);
}

TORCH_LIBRARY_IMPL(lima, CompositeExplicitAutograd, m) {
  m.impl("philox_uniform", &lima::philox_uniform_cpu);
}
