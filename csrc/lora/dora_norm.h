#pragma once
// DoRA's row norms from parts, without forming W + s * B @ A (ops.md section 1):
//   ||W_n + s B_n A||^2 = ||W_n||^2 + 2 s B_n . (A W^T)[:, n] + s^2 B_n (A A^T) B_n^T.
// Shared by dora_weight_norm (dense W) and QDoRA (4-bit W, where A W^T is one
// linear_4bit of A and ||W_n||^2 is computed once per frozen weight).
#include <ATen/ATen.h>

namespace lrk {

// weight_sq_norm [N], a_weight_t = A @ W^T [r, N], a [r, K], b [N, r]: all in the
// norm's dtype (float32, or float64).
inline at::Tensor dora_norm_from_parts(const at::Tensor& weight_sq_norm, const at::Tensor& a_weight_t,
                                       const at::Tensor& a, const at::Tensor& b, double scale) {
  const at::Tensor cross = (b * a_weight_t.t()).sum(1);              // B_n . (A W^T)[:, n]
  const at::Tensor quad = (at::mm(b, at::mm(a, a.t())) * b).sum(1);  // B_n (A A^T) B_n^T
  return (weight_sq_norm + (2.0 * scale) * cross + (scale * scale) * quad).clamp_min(0.0).sqrt();
}

}  // namespace lrk
