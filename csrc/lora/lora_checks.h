#pragma once
// Argument validation for the fused LoRA ops, shared by the CPU and CUDA kernels.
#include <optional>

#include "common/checks.h"

namespace lrk {

struct LoraDims {
  int64_t M;  // rows of x after flattening its leading dims
  int64_t K;  // in features
  int64_t N;  // out features
  int64_t r;  // rank
};

inline LoraDims check_lora_inputs(const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                  const at::Tensor& lora_b, double scale, double dropout_p) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected a tensor of shape [..., in_features], got a 0-D tensor");
  check_float_tensor(weight, "weight");
  check_float_tensor(lora_a, "lora_a");
  check_float_tensor(lora_b, "lora_b");
  check_same_dtype(weight, "weight", x, "x");
  check_same_dtype(lora_a, "lora_a", x, "x");
  check_same_dtype(lora_b, "lora_b", x, "x");
  check_same_device(weight, "weight", x, "x");
  check_same_device(lora_a, "lora_a", x, "x");
  check_same_device(lora_b, "lora_b", x, "x");
  check_dim(weight, "weight", 2);
  check_dim(lora_a, "lora_a", 2);
  check_dim(lora_b, "lora_b", 2);
  const int64_t K = x.size(-1);
  const int64_t N = weight.size(0);
  check_size(weight, "weight", 1, K, "in_features = x.shape[-1]");
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(r >= 1, "lora_a: rank (dim 0) must be at least 1, got shape ", lora_a.sizes());
  TORCH_CHECK(r <= std::min(K, N), "lora_a: rank ", r, " is larger than min(in_features, out_features) = ",
              std::min(K, N));
  check_size(lora_a, "lora_a", 1, K, "in_features = x.shape[-1]");
  check_size(lora_b, "lora_b", 0, N, "out_features = weight.shape[0]");
  check_size(lora_b, "lora_b", 1, r, "rank = lora_a.shape[0]");
  if (bias.has_value() && bias->defined()) {
    check_float_tensor(*bias, "bias");
    check_same_dtype(*bias, "bias", x, "x");
    check_same_device(*bias, "bias", x, "x");
    check_dim(*bias, "bias", 1);
    check_size(*bias, "bias", 0, N, "out_features = weight.shape[0]");
  }
  check_finite(scale, "scale");
  check_probability(dropout_p, "dropout_p");
  return LoraDims{x.numel() / std::max<int64_t>(K, 1), K, N, r};
}

// Backward's grad_y [..., N] and h [..., r]: x's leading dims (M rows), dtype and device.
// Shared by every LoRA-style backward (plain and 4-bit weights).
inline void check_grad_y_and_h(const at::Tensor& grad_y, const at::Tensor& h, const at::Tensor& x, int64_t M,
                               int64_t N, int64_t r) {
  check_float_tensor(grad_y, "grad_y");
  check_same_dtype(grad_y, "grad_y", x, "x");
  check_same_device(grad_y, "grad_y", x, "x");
  check_leading_dims_like(grad_y, "grad_y", x, N);
  check_float_tensor(h, "h");
  check_same_dtype(h, "h", x, "x");
  check_same_device(h, "h", x, "x");
  TORCH_CHECK(h.size(-1) == r && h.numel() == M * r, "h: expected shape [..., ", r,
              "] with the leading dims of x ", x.sizes(), ", got ", h.sizes());
}

inline LoraDims check_lora_bwd_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                      const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& h,
                                      double scale, double dropout_p) {
  const LoraDims d = check_lora_inputs(x, weight, std::nullopt, lora_a, lora_b, scale, dropout_p);
  check_grad_y_and_h(grad_y, h, x, d.M, d.N, d.r);
  return d;
}

// DoRA's magnitude [N]: x's dtype or float32, on x's device.
inline void check_dora_magnitude(const at::Tensor& magnitude, const at::Tensor& x, int64_t N) {
  check_float_tensor(magnitude, "magnitude");
  check_same_device(magnitude, "magnitude", x, "x");
  TORCH_CHECK(magnitude.scalar_type() == x.scalar_type() || magnitude.scalar_type() == at::kFloat,
              "magnitude: expected dtype ", x.scalar_type(), " (the dtype of x) or float32, got ",
              magnitude.scalar_type());
  check_dim(magnitude, "magnitude", 1);
  check_size(magnitude, "magnitude", 0, N, "out_features = weight.shape[0]");
}

}  // namespace lrk
