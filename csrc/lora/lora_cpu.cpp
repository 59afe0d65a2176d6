// CPU kernels of the fused LoRA ops: the reference that runs everywhere.
// Half-precision inputs are computed in float32 (fp32 accumulation, as on CUDA);
// h is rounded to the input dtype before its use in y, as the CUDA kernel does.
#include <torch/library.h>

#include "common/dropout.h"
#include "lora/lora_checks.h"
#include "common/autocast.h"

namespace lrk {
namespace {

at::ScalarType compute_dtype(at::ScalarType t) { return is_half_precision(t) ? at::kFloat : t; }

std::tuple<at::Tensor, at::Tensor> lora_fused_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias,
                                                      const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                      double scale, double dropout_p, int64_t seed) {
  LRK_NO_AUTOCAST();
  const LoraDims d = check_lora_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  const auto acc = compute_dtype(x.scalar_type());
  const at::Tensor x2 = x.reshape({d.M, d.K}).to(acc);
  const at::Tensor x_drop = dropout_p > 0 ? philox_dropout_cpu(x2, dropout_p, seed) : x2;
  const at::Tensor h = at::mm(x_drop, lora_a.to(acc).t()).to(x.scalar_type());
  at::Tensor y = at::mm(x2, weight.to(acc).t());
  if (bias.has_value() && bias->defined()) y.add_(bias->to(acc));
  y.addmm_(h.to(acc), lora_b.to(acc).t(), /*beta=*/1.0, /*alpha=*/scale);
  return {y.to(x.scalar_type()).reshape(with_last_dim(x, d.N)), h.reshape(with_last_dim(x, d.r))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_fused_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& h, double scale, double dropout_p, int64_t seed,
    bool need_grad_x) {
  LRK_NO_AUTOCAST();
  const LoraDims d = check_lora_bwd_inputs(grad_y, x, weight, lora_a, lora_b, h, scale, dropout_p);
  const auto dtype = x.scalar_type();
  const auto acc = compute_dtype(dtype);
  const at::Tensor dy = grad_y.reshape({d.M, d.N}).to(acc);
  const at::Tensor a = lora_a.to(acc);
  const at::Tensor dh = at::mm(dy, lora_b.to(acc)).mul_(scale);                      // [M, r]
  const at::Tensor grad_b = at::mm(dy.t(), h.reshape({d.M, d.r}).to(acc)).mul_(scale);  // [N, r]
  const at::Tensor x2 = x.reshape({d.M, d.K}).to(acc);
  const at::Tensor x_drop = dropout_p > 0 ? philox_dropout_cpu(x2, dropout_p, seed) : x2;
  const at::Tensor grad_a = at::mm(dh.t(), x_drop);                                    // [r, K]
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_grad_x) {
    const at::Tensor lora_term = at::mm(dh, a);
    at::Tensor gx = at::mm(dy, weight.to(acc));
    gx.add_(dropout_p > 0 ? philox_dropout_cpu(lora_term, dropout_p, seed) : lora_term);
    grad_x = gx.to(dtype).reshape(x.sizes());
  }
  return {grad_x, grad_a.to(dtype), grad_b.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CPU, m) {
  m.impl("lora_fused_fwd", &lora_fused_fwd_cpu);
  m.impl("lora_fused_bwd", &lora_fused_bwd_cpu);
}

}  // namespace lrk
