#pragma once
// The elementwise part of DoRA's backward in one pass over grad_y (CUDA, bf16/fp16):
//   grad_y_scaled[i, n] = grad_y[i, n] * g[n]                 (rounded once)
//   column_sums[n]     += sum_i grad_y[i, n] * y_unscaled[i, n]  (fp32)
// where the composite path (dora.cpp) would read grad_y twice and write a product.
#include <ATen/ATen.h>

namespace lrk {

// grad_y, y_unscaled, grad_y_scaled: contiguous [M, N] of one half dtype; g: float32 [N];
// column_sums: float32 [N], zeroed by the caller.
void dora_grad_scale_cuda(const at::Tensor& grad_y, const at::Tensor& y_unscaled, const at::Tensor& g,
                          at::Tensor& grad_y_scaled, at::Tensor& column_sums);

}  // namespace lrk
