// CUDA kernels of the fused LoRA ops (portable: any sm_80+ GPU).
//
// bf16/fp16: the skinny products run on lrk's WMMA kernels (common/skinny_gemm),
// dropout regenerated from the Philox seed as x is loaded (no mask, no dropped
// copy of x). The low-rank term is written first and the large cuBLAS GEMM
// adds its product to it (beta = 1): the GEMM is compute-bound, so reading C in
// its epilogue is almost free, where adding the term afterwards would cost a
// full read-modify-write pass over y (or dx). fp32/fp64 take the same steps
// through ATen (exact fp32 unless the user enabled TF32).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/dropout.h"
#include "common/skinny_gemm.h"
#include "lora/lora_checks.h"
#include "common/autocast.h"

namespace lrk {
namespace {

bool use_skinny_kernels(const at::Tensor& x) { return is_half_precision(x.scalar_type()); }

std::tuple<at::Tensor, at::Tensor> lora_fused_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                       double scale, double dropout_p, int64_t seed) {
  LRK_NO_AUTOCAST();
  const LoraDims d = check_lora_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor a = lora_a.contiguous();
  const at::Tensor b = lora_b.contiguous();

  at::Tensor h;
  if (use_skinny_kernels(x)) {
    at::Tensor h32 = at::zeros({d.M, d.r}, x.options().dtype(at::kFloat));
    skinny_rows_gemm_cuda(x2, a, h32, 1.0, make_dropout_params(dropout_p, seed));
    h = h32.to(x.scalar_type());
  } else {
    const at::Tensor x_drop = dropout_p > 0 ? philox_dropout_cuda(x2, dropout_p, seed) : x2;
    h = at::mm(x_drop, a.t());
  }
  // y = bias + scale * h @ B^T, then y += x @ W^T.
  at::Tensor y = at::empty({d.M, d.N}, x.options());
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(y, bias->expand({d.M, d.N}), h, b.t(), /*beta=*/1.0, /*alpha=*/scale);
  } else {
    at::addmm_out(y, y, h, b.t(), /*beta=*/0.0, /*alpha=*/scale);  // beta = 0: y's contents are ignored
  }
  y.addmm_(x2, w.t());
  return {y.reshape(with_last_dim(x, d.N)), h.reshape(with_last_dim(x, d.r))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_fused_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& h, double scale, double dropout_p, int64_t seed,
    bool need_grad_x) {
  LRK_NO_AUTOCAST();
  const LoraDims d = check_lora_bwd_inputs(grad_y, x, weight, lora_a, lora_b, h, scale, dropout_p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = grad_y.reshape({d.M, d.N}).contiguous();
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor h2 = h.reshape({d.M, d.r}).contiguous();
  const at::Tensor a = lora_a.contiguous();
  const auto dtype = x.scalar_type();

  at::Tensor dh, grad_a, grad_b;
  if (use_skinny_kernels(x)) {
    const auto f32 = x.options().dtype(at::kFloat);
    const DropoutParams none{};
    at::Tensor dh32 = at::zeros({d.M, d.r}, f32);
    skinny_rows_gemm_cuda(dy, lora_b.t().contiguous(), dh32, scale, none);  // dh = s * dy @ B
    at::Tensor gbt32 = at::zeros({d.r, d.N}, f32);
    skinny_cols_gemm_cuda(h2, dy, gbt32, scale, none);  // dB^T = s * h^T @ dy
    dh = dh32.to(dtype);
    at::Tensor ga32 = at::zeros({d.r, d.K}, f32);
    skinny_cols_gemm_cuda(dh, x2, ga32, 1.0, make_dropout_params(dropout_p, seed));  // dA = dh^T @ x~
    grad_a = ga32.to(dtype);
    grad_b = gbt32.t().to(dtype).contiguous();
  } else {
    dh = at::mm(dy, lora_b).mul_(scale);
    grad_b = at::mm(dy.t(), h2).mul_(scale);
    const at::Tensor x_drop = dropout_p > 0 ? philox_dropout_cuda(x2, dropout_p, seed) : x2;
    grad_a = at::mm(dh.t(), x_drop);
  }

  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_grad_x) {
    // dx = dropout(dh @ A) + dy @ W, the big GEMM last (beta = 1).
    at::Tensor gx = at::mm(dh, a);
    if (dropout_p > 0) dropout_cuda_(gx, dropout_p, seed);
    gx.addmm_(dy, weight);
    grad_x = gx.reshape(x.sizes());
  }
  return {grad_x, grad_a, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CUDA, m) {
  m.impl("lora_fused_fwd", &lora_fused_fwd_cuda);
  m.impl("lora_fused_bwd", &lora_fused_bwd_cuda);
}

}  // namespace lrk
