// CUDA kernels of the Kronecker adapter ops (any sm_80+ GPU).
//
// Forward: bf16/fp16 inputs whose factors fit take the fused kernel (kron_fused.h:
// all terms in one kernel, x read once, y written once); everything else takes the
// portable form (kron_portable.h): per chunk of rows one cuBLAS GEMM (x @ V^T for
// all terms at once) and one strided-batched GEMM (the side-by-side U factors
// against every row), in the input dtype with fp32 accumulation. Either way the
// frozen base GEMM then adds into the adapter's output (beta = 1).
// Backward: the portable form. When only grad x is asked for (frozen factors), it is
// itself a Kronecker adapter, dX_m = sum_t coef_t U_t^T dY_m V_t, so the fused forward
// kernel runs it with the transposed factors (one kernel, no intermediate). With the
// factor gradients, dx is one GEMM on the dZ = Uc^T dY that dv needs anyway.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>

#include "common/launch.cuh"
#include "kron/kron_fused.h"
#include "kron/kron_portable.h"

namespace lrk {
namespace {

at::Tensor kron_linear_cuda(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                            const std::optional<at::Tensor>& sigma, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& bias, double scale) {
  const KronDims d = check_kron_inputs(x, u, v, sigma, weight, bias, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor coef = kron_coefficients(sigma, d.k, scale, x.scalar_type(), x.device());
  if (kron_fused_supported(x2, d)) {
    at::Tensor y = at::empty({d.M, d.N}, x.options());
    kron_fused_forward_cuda(x2, u.contiguous(), v.contiguous(), coef, bias, y, d);
    if (has_tensor(weight)) y.addmm_(x2, weight->t());
    return y.reshape(with_last_dim(x, d.N));
  }
  const at::Tensor y = kron_forward_portable(x2, u, v, coef, weight, bias, d);
  return y.reshape(with_last_dim(x, d.N));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kron_linear_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
    const std::optional<at::Tensor>& sigma, const std::optional<at::Tensor>& weight, double scale,
    std::array<bool, 4> output_mask) {
  const KronDims d = check_kron_bwd_inputs(grad_y, x, u, v, sigma, weight, scale);
  const c10::cuda::CUDAGuard guard(x.device());
  const KronGradMask mask{output_mask[0], output_mask[1], output_mask[2], output_mask[3] && has_tensor(sigma)};
  const at::Tensor dy2 = grad_y.reshape({d.M, d.N}).contiguous();
  const at::Tensor coef = kron_coefficients(sigma, d.k, scale, x.scalar_type(), x.device());
  const auto empty = [&] { return at::empty({0}, x.options()); };
  if (mask.x && !mask.u && !mask.v && !mask.sigma) {
    // The transposed adapter: in_features N = m1*m2, out_features K = n1*n2.
    const KronDims dt{d.M, d.N, d.K, d.k, d.n1, d.m1, d.n2, d.m2};
    if (kron_fused_supported(dy2, dt)) {
      at::Tensor gx = at::empty({d.M, d.K}, x.options());
      kron_fused_forward_cuda(dy2, u.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), coef,
                              std::nullopt, gx, dt);
      if (has_tensor(weight)) gx.addmm_(dy2, *weight);
      return {gx.reshape(x.sizes()), empty(), empty(), empty()};
    }
  }
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  KronGrads g = kron_backward_portable(dy2, x2, u, v, coef, weight, scale, mask, d);
  return {mask.x ? g.x.reshape(x.sizes()) : empty(), mask.u ? g.u : empty(), mask.v ? g.v : empty(),
          mask.sigma ? g.sigma : empty()};
}

}  // namespace

LRK_CUDA_KERNELS(m) {
  m.impl("kron_linear", &kron_linear_cuda);
  m.impl("kron_linear_bwd", &kron_linear_bwd_cuda);
}

}  // namespace lrk
