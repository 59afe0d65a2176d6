// Fused DoRA (weight-decomposed LoRA), built on the fused LoRA ops:
//   y = g * (x @ W^T + s * h @ B^T) + bias,  g = m / ||W + s * B @ A||_row.
// The row norms never form W + s*B@A (ops.md section 1):
//   ||W_n + s B_n A||^2 = ||W_n||^2 + 2 s B_n . (A W^T)[:, n] + s^2 B_n (A A^T) B_n^T.
// Backward treats the norm as a constant (the DoRA paper and PEFT do too), so it is
// LoRA's backward on grad_y * g plus grad_m = sum_rows(grad_y * y_unscaled) / norm.
// The kernels compose ATen and lrk ops, so one implementation serves every device
// (registered as CompositeExplicitAutograd; autograd in lora_autograd.cpp, fakes
// in Python),
// except two CUDA shortcuts for bf16/fp16: the elementwise part of the backward
// in one pass (dora_grad.h), and on Hopper the whole forward in one GEMM whose
// epilogue applies g and the bias (lora_cuda.h).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/autocast.h"
#include "lora/dora_grad.h"
#include "lora/dora_norm.h"
#ifdef LRK_WITH_CUDA
#include "lora/lora_cuda.h"
#endif
#include "lora/lora_checks.h"

namespace lrk {
namespace {

using LoraFwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, const at::Tensor&,
                                                     const at::Tensor&, double, double, int64_t);
using LoraBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, double,
                                                                 double, int64_t, bool);

// Norms and g are computed in float32, or float64 for float64 weights.
at::ScalarType norm_dtype(const at::Tensor& weight) {
  return weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A @ W^T [r, N] in the norm's dtype, accumulated and kept there: rounding it to
// bf16 (2^-8) would spoil the norm wherever the cross term nearly cancels ||W_n||^2
// and the quadratic term (B steering W's rows towards 0). On CUDA, cuBLAS takes
// the half-precision operands with a float32 output (one read of W, as before);
// that product has no derivative, so when autograd records the call (the op is
// composite), and on other devices, the operands are upcast instead.
at::Tensor lora_a_weight_t(const at::Tensor& lora_a, const at::Tensor& weight, at::ScalarType acc) {
  if (lora_a.scalar_type() == acc) return at::mm(lora_a, weight.t());
  const bool recorded = at::GradMode::is_enabled() && (lora_a.requires_grad() || weight.requires_grad());
  if (weight.is_cuda() && acc == at::kFloat && !recorded) return at::mm(lora_a, weight.t(), acc);
  return at::mm(lora_a.to(acc), weight.t().to(acc));
}

void check_weight_sq_norm(const std::optional<at::Tensor>& wsq, const at::Tensor& weight) {
  if (!wsq.has_value() || !wsq->defined()) return;
  TORCH_CHECK(wsq->scalar_type() == norm_dtype(weight), "weight_sq_norm: expected dtype ", norm_dtype(weight),
              ", got ", wsq->scalar_type());
  check_same_device(*wsq, "weight_sq_norm", weight, "weight");
  check_dim(*wsq, "weight_sq_norm", 1);
  check_size(*wsq, "weight_sq_norm", 0, weight.size(0), "out_features = weight.shape[0]");
}

at::Tensor dora_weight_norm(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                            double scale, const std::optional<at::Tensor>& weight_sq_norm) {
  LRK_NO_AUTOCAST();
  check_float_tensor(weight, "weight");
  check_dim(weight, "weight", 2);
  check_dim(lora_a, "lora_a", 2);
  check_dim(lora_b, "lora_b", 2);
  check_same_dtype(lora_a, "lora_a", weight, "weight");
  check_same_dtype(lora_b, "lora_b", weight, "weight");
  check_same_device(lora_a, "lora_a", weight, "weight");
  check_same_device(lora_b, "lora_b", weight, "weight");
  check_size(lora_a, "lora_a", 1, weight.size(1), "in_features = weight.shape[1]");
  check_size(lora_b, "lora_b", 0, weight.size(0), "out_features = weight.shape[0]");
  check_size(lora_b, "lora_b", 1, lora_a.size(0), "rank = lora_a.shape[0]");
  check_finite(scale, "scale");
  check_weight_sq_norm(weight_sq_norm, weight);
  const auto acc = norm_dtype(weight);
  const at::Tensor wsq = (weight_sq_norm.has_value() && weight_sq_norm->defined())
                             ? *weight_sq_norm
                             : at::linalg_vector_norm(weight, 2, {1}, false, acc).square();
  const at::Tensor a = lora_a.to(acc);
  const at::Tensor b = lora_b.to(acc);
  return dora_norm_from_parts(wsq, lora_a_weight_t(lora_a, weight, acc), a, b, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_fused_fwd(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, double scale, double dropout_p, int64_t seed,
    const std::optional<at::Tensor>& weight_sq_norm) {
  LRK_NO_AUTOCAST();
  const LoraDims d = check_lora_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  check_dora_magnitude(magnitude, x, d.N);
  static auto lora_fwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("lrk::lora_fused_fwd", "").typed<LoraFwdFn>();
  const at::Tensor norm = dora_weight_norm(weight, lora_a, lora_b, scale, weight_sq_norm);
  const at::Tensor g = magnitude.to(norm.scalar_type()) / norm;  // [N]
#ifdef LRK_WITH_CUDA
  {  // Hopper: g and the bias applied in the GEMM's epilogue, y_unscaled stored beside y.
    at::Tensor y, h, y_unscaled;
    if (dora_forward_hopper(d, x, weight, bias, lora_a, lora_b, g, scale, dropout_p, seed, y, h, y_unscaled)) {
      return {y, h, y_unscaled, norm};
    }
  }
#endif
  auto [y_unscaled, h] = lora_fwd.call(x, weight, std::nullopt, lora_a, lora_b, scale, dropout_p, seed);
  // One elementwise pass, computed in float32 and rounded once.
  at::Tensor y = at::empty_like(y_unscaled);
  if (bias.has_value() && bias->defined()) {
    at::addcmul_out(y, *bias, y_unscaled, g);
  } else {
    at::mul_out(y, y_unscaled, g);
  }
  return {y, h, y_unscaled, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_fused_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, const at::Tensor& h, const at::Tensor& y_unscaled,
    const at::Tensor& weight_norm, double scale, double dropout_p, int64_t seed, bool need_grad_x) {
  LRK_NO_AUTOCAST();
  const LoraDims d = check_lora_bwd_inputs(grad_y, x, weight, lora_a, lora_b, h, scale, dropout_p);
  check_dora_magnitude(magnitude, x, d.N);
  TORCH_CHECK(weight_norm.scalar_type() == norm_dtype(weight) && weight_norm.dim() == 1 && weight_norm.size(0) == d.N,
              "weight_norm: expected a ", norm_dtype(weight), " tensor of shape [", d.N, "], got ",
              weight_norm.scalar_type(), " ", weight_norm.sizes());
  TORCH_CHECK(y_unscaled.sizes() == grad_y.sizes(), "y_unscaled: expected shape ", grad_y.sizes(), ", got ",
              y_unscaled.sizes());
  static auto lora_bwd =
      c10::Dispatcher::singleton().findSchemaOrThrow("lrk::lora_fused_bwd", "").typed<LoraBwdFn>();
  const at::Tensor g = magnitude.to(weight_norm.scalar_type()) / weight_norm;
  // grad_y * g for LoRA's backward, and column_sums_n = sum_i grad_y[i, n] * y_unscaled[i, n]
  // (float32, or float64) for grad_m_n = column_sums_n / norm_n.
  // One pass over grad_y on CUDA (the op's CUDA kernel, dora_grad.cu).
  static auto grad_scale = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("lrk::dora_grad_scale", "")
                               .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                         const at::Tensor&)>();
  const auto [grad_y_scaled, column_sums] = grad_scale.call(grad_y, y_unscaled, g);
  auto [grad_x, grad_a, grad_b] =
      lora_bwd.call(grad_y_scaled, x, weight, lora_a, lora_b, h, scale, dropout_p, seed, need_grad_x);
  const at::Tensor grad_m = (column_sums / weight_norm).to(magnitude.scalar_type());
  return {grad_x, grad_a, grad_b, grad_m};
}

at::Tensor dora_fused(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& magnitude, double scale,
                      double dropout_p, c10::SymInt seed, const std::optional<at::Tensor>& weight_sq_norm) {
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("lrk::dora_fused_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                            const at::Tensor&, const at::Tensor&, double, double, c10::SymInt,
                            const std::optional<at::Tensor>&)>();
  return std::get<0>(
      fwd.call(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, std::move(seed), weight_sq_norm));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dora_grad_scale(const at::Tensor& grad_y, const at::Tensor& y_unscaled,
                                                   const at::Tensor& g) {
  check_dora_grad_scale_inputs(grad_y, y_unscaled, g);
  return dora_grad_scale_aten(grad_y, y_unscaled, g);
}

TORCH_LIBRARY_IMPL(lrk, CompositeExplicitAutograd, m) {
  m.impl("dora_grad_scale", &dora_grad_scale);
  m.impl("dora_fused_fwd", &dora_fused_fwd);
  m.impl("dora_fused_bwd", &dora_fused_bwd);
}

TORCH_LIBRARY_IMPL(lrk, CompositeImplicitAutograd, m) {
  m.impl("dora_fused", &dora_fused);
  m.impl("dora_weight_norm", &dora_weight_norm);
}

}  // namespace lrk
