// Fused AdamW: the op's schema, argument checks and the CPU implementation.
//
//   torch.ops.lima.fused_adamw_(param, grad, exp_avg, exp_avg_sq, param_copy, *, lr, beta1,
//                               beta2, eps, weight_decay, step, seed=None)
//
// One AdamW step (torch.optim.AdamW's formula, see adamw.h) over a flat contiguous fp32
// shard, in place on param and both moments, optionally writing a bf16/fp16 copy of the new
// param in the same pass. grad: fp32 or bf16. Moments: both fp32, or both bf16 (stored with
// stochastic rounding, fp32 math inside). The copy is rounded to nearest even, or
// stochastically when `seed` is given. Random bits come from (seed, step, element index),
// seed 0 when None, so a step is reproducible whatever the threading or the device.
// The fake (meta) implementation is registered in Python: lima_core/native/adamw.py.
#include "adamw_op.h"

#include <cmath>
#include <utility>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace lima {
namespace {

uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The fp32 constants, rounded from double exactly where torch's Python loop rounds them
// (Python floats are doubles; ATen casts a scalar to fp32 when it meets an fp32 tensor).
Scalars make_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                     int64_t step, int64_t seed) {
  Scalars s;
  s.decay = float(1.0 - lr * weight_decay);
  const float w = float(1.0 - beta1);
  const bool small = std::abs(w) < 0.5f;  // ATen's is_lerp_weight_small
  s.lerp_coef = small ? w : w - 1.0f;
  s.lerp_self_mask = small ? 0xFFFFFFFFu : 0u;
  s.beta2 = float(beta2);
  s.one_minus_beta2 = float(1.0 - beta2);
  const double bias_correction1 = 1.0 - std::pow(beta1, double(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, double(step));
  s.bc2_sqrt = float(std::pow(bias_correction2, 0.5));
  s.eps = float(eps);
  s.neg_step_size = float(-(lr / bias_correction1));
  const uint64_t base = splitmix64(splitmix64(uint64_t(seed)) ^ uint64_t(step));
  s.key_copy = uint32_t(splitmix64(base + 1));
  s.key_exp_avg = uint32_t(splitmix64(base + 2));
  s.key_exp_avg_sq = uint32_t(splitmix64(base + 3));
  return s;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& param,
                  c10::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type && t.device() == param.device(),
              "fused_adamw_: ", name, " is on ", t.device(), " but param is on ", param.device(),
              " (this is the ", c10::DeviceTypeName(device_type), " implementation)");
  TORCH_CHECK(t.numel() == param.numel(), "fused_adamw_: ", name, " has ", t.numel(),
              " elements, param has ", param.numel());
  TORCH_CHECK(t.is_contiguous(), "fused_adamw_: ", name, " must be contiguous");
}

}  // namespace

Args prepare_adamw(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_copy,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t step, std::optional<int64_t> seed, c10::DeviceType device_type) {
  TORCH_CHECK(param.scalar_type() == at::kFloat, "fused_adamw_: param must be float32, got ",
              param.scalar_type());
  check_tensor(param, "param", param, device_type);
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kBFloat16,
              "fused_adamw_: grad must be float32 or bfloat16, got ", grad.scalar_type());
  check_tensor(grad, "grad", param, device_type);
  for (const auto& [t, name] : {std::pair{&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kBFloat16,
                "fused_adamw_: ", name, " must be float32 or bfloat16, got ", t->scalar_type());
    check_tensor(*t, name, param, device_type);
  }
  TORCH_CHECK(exp_avg.scalar_type() == exp_avg_sq.scalar_type(),
              "fused_adamw_: exp_avg and exp_avg_sq must have the same dtype, got ",
              exp_avg.scalar_type(), " and ", exp_avg_sq.scalar_type());
  const bool has_copy = param_copy.has_value();
  if (has_copy) {
    const auto dtype = param_copy->scalar_type();
    TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf,
                "fused_adamw_: param_copy must be bfloat16 or float16, got ", dtype);
    check_tensor(*param_copy, "param_copy", param, device_type);
  }
  // The kernels read and write through restrict pointers: no two tensors may share memory.
  std::vector<std::pair<const at::Tensor*, const char*>> all = {
      {&param, "param"}, {&grad, "grad"}, {&exp_avg, "exp_avg"}, {&exp_avg_sq, "exp_avg_sq"}};
  if (has_copy) all.emplace_back(&*param_copy, "param_copy");
  for (size_t i = 0; i < all.size(); ++i)
    for (size_t j = i + 1; j < all.size(); ++j)
      TORCH_CHECK(at::get_overlap_status(*all[i].first, *all[j].first) == at::MemOverlapStatus::No,
                  "fused_adamw_: ", all[i].second, " and ", all[j].second, " share memory");

  TORCH_CHECK(lr >= 0.0, "fused_adamw_: lr must be >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, "fused_adamw_: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, "fused_adamw_: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0.0, "fused_adamw_: eps must be >= 0, got ", eps);
  TORCH_CHECK(weight_decay >= 0.0, "fused_adamw_: weight_decay must be >= 0, got ",
              weight_decay);
  TORCH_CHECK(step >= 1, "fused_adamw_: step must be >= 1 (the count including this step), got ",
              step);

  Args a;
  a.param = param.data_ptr<float>();
  a.grad = grad.const_data_ptr();
  a.exp_avg = exp_avg.mutable_data_ptr();
  a.exp_avg_sq = exp_avg_sq.mutable_data_ptr();
  a.copy = has_copy ? param_copy->mutable_data_ptr() : nullptr;
  a.numel = param.numel();
  a.grad_kind = grad.scalar_type() == at::kFloat ? Grad::F32 : Grad::BF16;
  a.moment_kind = exp_avg.scalar_type() == at::kFloat ? Moments::F32 : Moments::BF16;
  const bool sr = seed.has_value();
  a.copy_kind = !has_copy                                   ? Copy::None
                : param_copy->scalar_type() == at::kBFloat16 ? (sr ? Copy::BF16_SR : Copy::BF16)
                                                             : (sr ? Copy::F16_SR : Copy::F16);
  a.s = make_scalars(lr, beta1, beta2, eps, weight_decay, step, seed.value_or(0));
  return a;
}

namespace {

using RangeFn = void (*)(const Args&, int64_t, int64_t);

// The widest loop this CPU runs; both give the same bits (adamw_cpu_loop.cpp).
std::pair<RangeFn, const char*> cpu_loop() {
#if defined(LIMA_HAVE_AVX2_LOOP)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {&cpu_avx2::adamw_range, "avx2"};
#endif
  return {&cpu_default::adamw_range, "default"};
}

void fused_adamw_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_copy,
                     double lr, double beta1, double beta2, double eps, double weight_decay,
                     int64_t step, std::optional<int64_t> seed) {
  const Args a = prepare_adamw(param, grad, exp_avg, exp_avg_sq, param_copy, lr, beta1, beta2,
                               eps, weight_decay, step, seed, c10::DeviceType::CPU);
  static const RangeFn range = cpu_loop().first;
  constexpr int64_t kGrain = 1 << 15;  // elements: below this one thread does the whole step
  at::parallel_for(0, a.numel, kGrain,
                   [&](int64_t begin, int64_t end) { range(a, begin, end); });
}

std::string cpu_isa() { return cpu_loop().second; }

}  // namespace
}  // namespace lima

TORCH_LIBRARY(lima, m) {
  m.set_python_module("lima_core.native.adamw");
  m.def(
      "fused_adamw_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? param_copy, *, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, int step, int? seed=None) -> ()");
  // Which CPU loop fused_adamw_ runs here ("avx2" or "default"), for benchmark reports.
  m.def("fused_adamw_cpu_isa() -> str", &lima::cpu_isa);
}

TORCH_LIBRARY_IMPL(lima, CPU, m) { m.impl("fused_adamw_", &lima::fused_adamw_cpu); }
