// The device-independent body of lrk::galore_adamw_step (see galore_step.h).
#include "galore/galore_step.h"

#include <cmath>

#include "galore/galore_checks.h"

namespace lrk {
namespace {

// Fira's epsilons (its released code): the per-channel norm ratio and the limiter.
constexpr double kFiraNormEps = 1e-8;
constexpr double kFiraGrowth = 1.01;

void check_param_and_grad(const at::Tensor& param, const at::Tensor& grad) {
  check_float_tensor(param, "param");
  TORCH_CHECK(param.is_contiguous(), "param: expected a contiguous tensor, got strides ", param.strides());
  check_float_tensor(grad, "grad");
  check_same_dtype(grad, "grad", param, "param");
  check_same_device(grad, "grad", param, "param");
  TORCH_CHECK(grad.sizes() == param.sizes(), "grad: expected shape ", param.sizes(), " (the shape of param), got ",
              grad.sizes());
}

// The dense projector [size, rank] in the accumulation dtype (a transposed view
// of the dequantised [rank, size] buffer for int4 storage).
at::Tensor dense_projector(const GaloreKernels& kernels, const at::Tensor& param, const at::Tensor& proj,
                           const std::optional<at::Tensor>& proj_scales, const std::optional<at::Tensor>& proj_zeros,
                           int64_t quant_group_size, bool left) {
  const int64_t size = galore_proj_size(param, left);
  const bool has_scales = proj_scales.has_value() && proj_scales->defined();
  const bool has_zeros = proj_zeros.has_value() && proj_zeros->defined();
  check_same_device(proj, "proj", param, "param");
  at::Tensor p;
  if (proj.scalar_type() == at::kByte) {
    TORCH_CHECK(has_scales && has_zeros, "proj: a uint8 (int4) projector needs proj_scales and proj_zeros");
    TORCH_CHECK(param.scalar_type() != at::kDouble, "proj: int4 projectors serve float32/bfloat16/float16 params, "
                "got a float64 param");
    check_galore_int4(proj, *proj_scales, *proj_zeros, size, quant_group_size);
    p = kernels.dequantize_int4_t(proj, *proj_scales, *proj_zeros, size, quant_group_size).t();
  } else {
    TORCH_CHECK(!has_scales && !has_zeros, "proj_scales/proj_zeros: only for a uint8 (int4) projector, got a ",
                proj.scalar_type(), " projector");
    const auto acc = galore_acc_dtype(param.scalar_type());
    TORCH_CHECK(proj.scalar_type() == acc, "proj: expected dtype ", acc, " (or uint8 for int4), got ",
                proj.scalar_type());
    check_dim(proj, "proj", 2);
    check_size(proj, "proj", 0, size, left ? "m = param.shape[0] (left projection)" : "n = param.shape[1] (right projection)");
    p = proj;
  }
  // No rank <= min(m, n) check: a row shard of a projector may have fewer rows than columns.
  TORCH_CHECK(p.size(1) >= 1, "proj: rank (dim 1) must be at least 1, got shape ", p.sizes());
  return p;
}

}  // namespace

void galore_adamw_step_impl(const GaloreKernels& kernels, at::Tensor& param, const at::Tensor& grad,
                            at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& proj,
                            const std::optional<at::Tensor>& proj_scales, const std::optional<at::Tensor>& proj_zeros,
                            int64_t quant_group_size, bool left, int64_t step, double lr, double beta1, double beta2,
                            double eps, double weight_decay, double scale, bool correct_bias,
                            const std::optional<at::Tensor>& low_rank_grad, bool fira,
                            const std::optional<at::Tensor>& fira_prev_norm) {
  check_param_and_grad(param, grad);
  check_optimizer_scalars(step, lr, beta1, beta2, eps, weight_decay, scale);
  const auto acc = galore_acc_dtype(param.scalar_type());
  const double t = static_cast<double>(step);
  const double step_size =
      correct_bias ? lr * std::sqrt(1.0 - std::pow(beta2, t)) / (1.0 - std::pow(beta1, t)) : lr;
  const double decay = lr * weight_decay;
  const bool has_lrg = low_rank_grad.has_value() && low_rank_grad->defined();
  const bool has_fira_norm = fira_prev_norm.has_value() && fira_prev_norm->defined();

  if (!proj.has_value() || !proj->defined()) {
    // Plain AdamW (parameters outside GaLore groups, any shape).
    TORCH_CHECK(!has_lrg, "low_rank_grad: only with a projector (proj is None)");
    TORCH_CHECK(!fira, "fira: needs a projector (proj is None)");
    TORCH_CHECK(!(proj_scales.has_value() && proj_scales->defined()) && !(proj_zeros.has_value() && proj_zeros->defined()),
                "proj_scales/proj_zeros: only with an int4 projector (proj is None)");
    check_state(exp_avg, "exp_avg", param, param.sizes());
    check_state(exp_avg_sq, "exp_avg_sq", param, param.sizes());
    if (param.numel() == 0) return;
    kernels.adam_full(param, grad.contiguous(), exp_avg, exp_avg_sq, beta1, beta2, eps, step_size, decay);
    return;
  }

  TORCH_CHECK(param.dim() == 2, "param: a projected (GaLore) step needs a 2-D parameter, got shape ", param.sizes());
  TORCH_CHECK(param.numel() > 0, "param: expected a non-empty matrix, got shape ", param.sizes());
  const at::Tensor p = dense_projector(kernels, param, *proj, proj_scales, proj_zeros, quant_group_size, left);
  const int64_t m = param.size(0), n = param.size(1), rank = p.size(1);
  const std::vector<int64_t> low_shape = left ? std::vector<int64_t>{rank, n} : std::vector<int64_t>{m, rank};
  check_state(exp_avg, "exp_avg", param, low_shape);
  check_state(exp_avg_sq, "exp_avg_sq", param, low_shape);

  // Full-rank gradient in the accumulation dtype (no copy for float32/float64).
  at::Tensor g = grad.to(acc);
  at::Tensor r;
  if (has_lrg) {
    TORCH_CHECK(!fira, "fira: not supported with low_rank_grad (the residual norm would be local to this shard)");
    TORCH_CHECK(low_rank_grad->scalar_type() == acc, "low_rank_grad: expected dtype ", acc, ", got ",
                low_rank_grad->scalar_type());
    check_same_device(*low_rank_grad, "low_rank_grad", param, "param");
    TORCH_CHECK(low_rank_grad->sizes() == at::IntArrayRef(low_shape), "low_rank_grad: expected shape ",
                at::IntArrayRef(low_shape), ", got ", low_rank_grad->sizes());
    r = low_rank_grad->contiguous();
  } else {
    r = left ? at::mm(p.t(), g) : at::mm(g, p);
  }

  at::Tensor nrm = at::empty_like(r);
  kernels.adam_moments(r, exp_avg, exp_avg_sq, nrm, beta1, beta2, eps);

  if (fira) {
    TORCH_CHECK(has_fira_norm, "fira_prev_norm: fira needs its norm state (1 element, -1 before the first step)");
    const at::Tensor& prev = *fira_prev_norm;
    TORCH_CHECK(prev.scalar_type() == acc && prev.numel() == 1, "fira_prev_norm: expected one ", acc,
                " element, got ", prev.scalar_type(), " of shape ", prev.sizes());
    check_same_device(prev, "fira_prev_norm", param, "param");
    // phi per channel: columns for a left projection (R [r, n]), rows for a right one.
    const int64_t dim = left ? 0 : 1;
    const at::Tensor phi = at::linalg_vector_norm(nrm, 2, {dim}, true) /
                           (at::linalg_vector_norm(r, 2, {dim}, true) + kFiraNormEps);
    at::Tensor resid = left ? at::addmm(g, p, r, 1.0, -1.0) : at::addmm(g, r, p.t(), 1.0, -1.0);
    resid.mul_(phi);
    // Norm-growth limiter on the whole residual, kept on the device (no host sync).
    const at::Tensor snorm = at::linalg_vector_norm(resid).reshape({1});
    const at::Tensor prev1 = prev.reshape({1});
    const at::Tensor limiter = at::where(prev1 >= 0, at::clamp_min(snorm / (prev1 + kFiraNormEps), kFiraGrowth) / kFiraGrowth,
                                         at::ones_like(snorm));
    resid.div_(limiter);
    at::Tensor prev_mut = *fira_prev_norm;
    prev_mut.copy_((snorm / limiter).reshape(prev.sizes()));
    // Full update: scale * back(N) + S.
    if (left) {
      resid.addmm_(p, nrm, 1.0, scale);
    } else {
      resid.addmm_(nrm, p.t(), 1.0, scale);
    }
    kernels.apply_update(param, resid, step_size, decay);
    return;
  }

  if (param.scalar_type() == acc) {
    // (W - s * scale * back(N)) * (1 - decay) in the GEMM's epilogue.
    const double beta = 1.0 - decay;
    const double alpha = -step_size * scale * beta;
    if (left) {
      param.addmm_(p, nrm, beta, alpha);
    } else {
      param.addmm_(nrm, p.t(), beta, alpha);
    }
  } else {
    // Half-precision parameters: the back projection in fp32, rounded once into W.
    const at::Tensor update = left ? at::mm(p, nrm) : at::mm(nrm, p.t());
    kernels.apply_update(param, update, step_size * scale, decay);
  }
}

}  // namespace lrk
