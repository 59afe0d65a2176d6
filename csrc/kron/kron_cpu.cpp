// CPU kernels of the Kronecker adapter ops: the portable two-product form
// (kron_portable.h). Half-precision inputs are computed in float32.
#include <torch/library.h>

#include <array>

#include "kron/kron_portable.h"

namespace lrk {
namespace {

at::ScalarType cpu_compute_dtype(at::ScalarType t) { return is_half_precision(t) ? at::kFloat : t; }

std::optional<at::Tensor> optional_to(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!has_tensor(t)) return std::nullopt;
  return t->to(dtype);
}

at::Tensor kron_linear_cpu(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                           const std::optional<at::Tensor>& sigma, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double scale) {
  const KronDims d = check_kron_inputs(x, u, v, sigma, weight, bias, scale);
  const auto acc = cpu_compute_dtype(x.scalar_type());
  const at::Tensor x2 = x.reshape({d.M, d.K}).to(acc).contiguous();
  const at::Tensor coef = kron_coefficients(sigma, d.k, scale, acc, x.device());
  const at::Tensor y = kron_forward_portable(x2, u.to(acc), v.to(acc), coef, optional_to(weight, acc),
                                             optional_to(bias, acc), d);
  return y.to(x.scalar_type()).reshape(with_last_dim(x, d.N));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kron_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& sigma, const std::optional<at::Tensor>& weight, double scale,
    std::array<bool, 4> output_mask) {
  const KronDims d = check_kron_bwd_inputs(grad_y, x, u, v, sigma, weight, scale);
  const KronGradMask mask{output_mask[0], output_mask[1], output_mask[2], output_mask[3] && has_tensor(sigma)};
  const auto dtype = x.scalar_type();
  const auto acc = cpu_compute_dtype(dtype);
  const at::Tensor dy2 = grad_y.reshape({d.M, d.N}).to(acc).contiguous();
  const at::Tensor x2 = x.reshape({d.M, d.K}).to(acc).contiguous();
  const at::Tensor coef = kron_coefficients(sigma, d.k, scale, acc, x.device());
  KronGrads g = kron_backward_portable(dy2, x2, u.to(acc), v.to(acc), coef, optional_to(weight, acc), scale, mask, d);
  const auto empty = [&] { return at::empty({0}, x.options()); };
  return {mask.x ? g.x.to(dtype).reshape(x.sizes()) : empty(), mask.u ? g.u.to(dtype) : empty(),
          mask.v ? g.v.to(dtype) : empty(), mask.sigma ? g.sigma.to(dtype) : empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CPU, m) {
  m.impl("kron_linear", &kron_linear_cpu);
  m.impl("kron_linear_bwd", &kron_linear_bwd_cpu);
}

}  // namespace lrk
