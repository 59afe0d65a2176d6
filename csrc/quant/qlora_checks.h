#pragma once
// Argument validation of the fused QLoRA / QDoRA ops (csrc/quant/qlora.cpp).
#include <optional>

#include "lora/lora_checks.h"
#include "quant/quant4_checks.h"

namespace lrk {

struct QloraDims {
  int64_t M;  // rows of x after flattening its leading dims
  int64_t K;  // in_features
  int64_t N;  // out_features
  int64_t r;  // rank
};

// x [..., K] and the LoRA factors lora_a [r, K], lora_b [N, r], bias [N] (x's dtype
// and device), over a 4-bit W [N, K] already checked by check_weight_4bit.
inline QloraDims check_qlora_inputs(const at::Tensor& x, const Weight4bitDims& w,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                    const at::Tensor& lora_b, double scale, double dropout_p) {
  const int64_t M = check_linear_4bit_input(x, "x", w.cols, "in_features");
  check_float_tensor(lora_a, "lora_a");
  check_float_tensor(lora_b, "lora_b");
  check_same_dtype(lora_a, "lora_a", x, "x");
  check_same_dtype(lora_b, "lora_b", x, "x");
  check_same_device(lora_a, "lora_a", x, "x");
  check_same_device(lora_b, "lora_b", x, "x");
  check_dim(lora_a, "lora_a", 2);
  check_dim(lora_b, "lora_b", 2);
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(r >= 1, "lora_a: rank (dim 0) must be at least 1, got shape ", lora_a.sizes());
  TORCH_CHECK(r <= std::min(w.cols, w.rows), "lora_a: rank ", r,
              " is larger than min(in_features, out_features) = ", std::min(w.cols, w.rows));
  check_size(lora_a, "lora_a", 1, w.cols, "in_features of the 4-bit weight");
  check_size(lora_b, "lora_b", 0, w.rows, "out_features of the 4-bit weight");
  check_size(lora_b, "lora_b", 1, r, "rank = lora_a.shape[0]");
  if (bias.has_value() && bias->defined()) {
    check_float_tensor(*bias, "bias");
    check_same_dtype(*bias, "bias", x, "x");
    check_same_device(*bias, "bias", x, "x");
    check_dim(*bias, "bias", 1);
    check_size(*bias, "bias", 0, w.rows, "out_features of the 4-bit weight");
  }
  check_finite(scale, "scale");
  check_probability(dropout_p, "dropout_p");
  return QloraDims{M, w.cols, w.rows, r};
}

// grad_y [..., N] and h [..., r] with x's leading dims, x's dtype and device.
inline void check_qlora_bwd_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h,
                                   const QloraDims& d) {
  check_grad_y_and_h(grad_y, h, x, d.M, d.N, d.r);
}

}  // namespace lrk
