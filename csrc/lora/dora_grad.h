#pragma once
// The elementwise part of DoRA's backward in one pass over grad_y (CUDA, bf16/fp16):
//   grad_y_scaled[i, n] = grad_y[i, n] * g[n]                 (rounded once)
//   column_sums[n]     += sum_i grad_y[i, n] * y_unscaled[i, n]  (fp32)
// where the composite path (dora.cpp) would read grad_y twice and write a product.
#include <ATen/ATen.h>

#include <tuple>

#include "common/checks.h"

namespace lrk {

// Op lrk::dora_grad_scale(grad_y, y_unscaled, g) -> (grad_y * g, column_sums):
// grad_y and y_unscaled [..., N] of one float dtype, g [N] (float32 or float64).
inline void check_dora_grad_scale_inputs(const at::Tensor& grad_y, const at::Tensor& y_unscaled, const at::Tensor& g) {
  check_float_tensor(grad_y, "grad_y");
  TORCH_CHECK(grad_y.dim() >= 1, "grad_y: expected at least one dimension, got a scalar");
  check_same_dtype(y_unscaled, "y_unscaled", grad_y, "grad_y");
  check_same_device(y_unscaled, "y_unscaled", grad_y, "grad_y");
  TORCH_CHECK(y_unscaled.sizes() == grad_y.sizes(), "y_unscaled: expected shape ", grad_y.sizes(), " (that of grad_y), got ",
              y_unscaled.sizes());
  check_same_device(g, "g", grad_y, "grad_y");
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble, "g: expected float32 or float64, got ",
              g.scalar_type());
  check_dim(g, "g", 1);
  check_size(g, "g", 0, grad_y.size(-1), "grad_y.shape[-1]");
}

// The same with ATen ops (any device and dtype): grad_y * g rounded once to grad_y's
// dtype, and the column sums of products formed and accumulated in g's dtype (a
// bf16 product would carry bf16 rounding into the float32 sums).
inline std::tuple<at::Tensor, at::Tensor> dora_grad_scale_aten(const at::Tensor& grad_y, const at::Tensor& y_unscaled,
                                                               const at::Tensor& g) {
  at::Tensor scaled = at::empty_like(grad_y, at::MemoryFormat::Contiguous);
  at::mul_out(scaled, grad_y, g);
  const int64_t N = grad_y.size(-1);
  const at::ScalarType acc = g.scalar_type();
  const at::Tensor prod = at::mul(grad_y.reshape({-1, N}).to(acc), y_unscaled.reshape({-1, N}).to(acc));
  return {scaled, at::sum(prod, {0}, false, g.scalar_type())};
}

// grad_y, y_unscaled, grad_y_scaled: contiguous [M, N] of one half dtype; g: float32 [N];
// column_sums: float32 [N], zeroed by the caller.
void dora_grad_scale_cuda(const at::Tensor& grad_y, const at::Tensor& y_unscaled, const at::Tensor& g,
                          at::Tensor& grad_y_scaled, at::Tensor& column_sums);

}  // namespace lrk
