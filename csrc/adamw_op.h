// Fused AdamW: the host side shared by the CPU and CUDA registrations (see adamw_op.cpp).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "adamw.h"

namespace lima {

// Checks the op's arguments (TORCH_CHECK messages name the argument), computes the step's
// fp32 constants and packs the raw pointers. Every tensor must be on `device_type`.
Args prepare_adamw(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& param_copy,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   int64_t step, std::optional<int64_t> seed, c10::DeviceType device_type);

}  // namespace lima
