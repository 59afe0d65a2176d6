// Autograd of the fused LoRA and DoRA forward ops, in C++ (the Autograd
// dispatch key). A Python autograd formula costs about as much host time as
// the frozen layer's whole GPU step at small batch sizes (the anchors' M=2048
// case is host-bound for PEFT and eager PyTorch); in C++ the per-step overhead
// of lora_fused is close to that of nn.Linear. torch.compile traces through
// these kernels like any other: the forward and backward call lrk's own ops,
// whose fakes come from Python.
//
// What backward keeps: x, h = dropout(x) @ lora_a^T (and for DoRA y_unscaled
// and the row norms); the dropout mask is regenerated from the seed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "common/autograd_util.h"

namespace lrk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using OptTensor = std::optional<at::Tensor>;

using LoraFwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const OptTensor&,
                                                     const at::Tensor&, const at::Tensor&, double, double,
                                                     c10::SymInt);
using LoraBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, double,
                                                                 double, c10::SymInt, bool);
using DoraFwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    double, double, c10::SymInt, const OptTensor&);
using DoraBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, c10::SymInt, bool);
using DropoutFn = at::Tensor(const at::Tensor&, double, c10::SymInt);

// Autograd's edge indices count only the tensor arguments that are present:
// an absent bias shifts the ones after it.
struct InputEdges {
  size_t x = 0, weight = 1, bias, lora_a, lora_b, magnitude;
  explicit InputEdges(bool has_bias)
      : bias(2), lora_a(has_bias ? 3 : 2), lora_b(lora_a + 1), magnitude(lora_b + 1) {}
};

void save_scalars(AutogradContext* ctx, double scale, double dropout_p, const c10::SymInt& seed, bool has_bias) {
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["seed"] = seed;
  ctx->saved_data["has_bias"] = has_bias;
}

// The frozen layer's own gradients, only when asked for: dW = dy_w^T @ x and
// dbias = column sums of dy (dy_w is dy * g for DoRA, dy for LoRA).
void frozen_layer_grads(AutogradContext* ctx, const InputEdges& e, const at::Tensor& grad_y,
                        const at::Tensor& grad_y_for_weight, const at::Tensor& x, const at::Tensor& weight,
                        variable_list& grads) {
  const c10::SymInt n = weight.sym_size(0);
  if (ctx->needs_input_grad(e.weight)) {
    grads[1] = rows_of(grad_y_for_weight, n).t().mm(rows_of(x, weight.sym_size(1)));
  }
  if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(e.bias)) {
    grads[2] = rows_of(grad_y, n).sum(0);
  }
}

class LoraFusedFunction : public torch::autograd::Function<LoraFusedFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               double scale, double dropout_p, c10::SymInt seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto fwd = lrk_op<LoraFwdFn>("lrk::lora_fused_fwd");
    auto [y, h] = fwd.call(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed);
    ctx->set_materialize_grads(false);  // an unused h gets no zero tensor to multiply
    ctx->save_for_backward({x, weight, lora_a, lora_b, h});
    save_scalars(ctx, scale, dropout_p, seed, present(bias));
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool create_graph = at::GradMode::is_enabled();
    const at::NoGradGuard no_grad;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3], &h = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    const double p = ctx->saved_data["dropout_p"].toDouble();
    const c10::SymInt seed = ctx->saved_data["seed"].toSymInt();
    const InputEdges e(ctx->saved_data["has_bias"].toBool());
    const bool need_x = ctx->needs_input_grad(e.x);
    const at::Tensor& grad_y = grad_outputs[0];
    const at::Tensor& grad_h = grad_outputs[1];

    // One gradient per forward argument: x, weight, bias, lora_a, lora_b, scale, p, seed.
    variable_list grads(8);
    if (grad_y.defined()) {
      static auto bwd = lrk_op<LoraBwdFn>("lrk::lora_fused_bwd");
      auto [gx, ga, gb] = bwd.call(grad_y, x, weight, lora_a, lora_b, h, scale, p, seed, need_x);
      if (need_x) grads[0] = gx;
      grads[3] = ga;
      grads[4] = gb;
      frozen_layer_grads(ctx, e, grad_y, grad_y, x, weight, grads);
    }
    if (grad_h.defined()) {  // only when a caller used h itself
      static auto dropout = lrk_op<DropoutFn>("lrk::philox_dropout");
      const c10::SymInt k = x.sym_size(-1);
      const at::Tensor gh = rows_of(grad_h, lora_a.sym_size(0));
      const at::Tensor x_drop = p > 0 ? dropout.call(x, p, seed) : x;
      const at::Tensor ga = gh.t().mm(rows_of(x_drop, k));
      grads[3] = grads[3].defined() ? grads[3] + ga : ga;
      if (need_x) {
        at::Tensor t = gh.mm(lora_a).reshape_symint(x.sym_sizes());
        if (p > 0) t = dropout.call(t, p, seed);
        grads[0] = grads[0].defined() ? grads[0] + t : t;
      }
    }
    if (!ctx->needs_input_grad(e.lora_a)) grads[3] = at::Tensor();
    if (!ctx->needs_input_grad(e.lora_b)) grads[4] = at::Tensor();
    return once_differentiable(std::move(grads), {grad_y, grad_h, x, weight, lora_a, lora_b}, create_graph,
                               "lrk::lora_fused_fwd");
  }
};

class DoraFusedFunction : public torch::autograd::Function<DoraFusedFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptTensor& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const at::Tensor& magnitude, double scale, double dropout_p, c10::SymInt seed,
                               const OptTensor& weight_sq_norm) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto fwd = lrk_op<DoraFwdFn>("lrk::dora_fused_fwd");
    auto [y, h, y_unscaled, weight_norm] =
        fwd.call(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, weight_sq_norm);
    ctx->mark_non_differentiable({h, y_unscaled, weight_norm});  // saved activations, not results
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, weight, lora_a, lora_b, magnitude, h, y_unscaled, weight_norm});
    save_scalars(ctx, scale, dropout_p, seed, present(bias));
    return {y, h, y_unscaled, weight_norm};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool create_graph = at::GradMode::is_enabled();
    const at::NoGradGuard no_grad;
    // One gradient per forward argument: x, weight, bias, lora_a, lora_b, magnitude,
    // scale, p, seed, weight_sq_norm.
    variable_list grads(10);
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &lora_a = saved[2], &lora_b = saved[3],
                     &magnitude = saved[4], &h = saved[5], &y_unscaled = saved[6], &weight_norm = saved[7];
    const InputEdges e(ctx->saved_data["has_bias"].toBool());
    const bool need_x = ctx->needs_input_grad(e.x);
    static auto bwd = lrk_op<DoraBwdFn>("lrk::dora_fused_bwd");
    auto [gx, ga, gb, gm] =
        bwd.call(grad_y, x, weight, lora_a, lora_b, magnitude, h, y_unscaled, weight_norm,
                 ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                 ctx->saved_data["seed"].toSymInt(), need_x);
    if (need_x) grads[0] = gx;
    if (ctx->needs_input_grad(e.lora_a)) grads[3] = ga;
    if (ctx->needs_input_grad(e.lora_b)) grads[4] = gb;
    if (ctx->needs_input_grad(e.magnitude)) grads[5] = gm;
    at::Tensor grad_y_for_weight;
    if (ctx->needs_input_grad(e.weight)) {  // the norm is a constant: dW = (dy * g)^T @ x
      const at::Tensor g = (magnitude.to(weight_norm.scalar_type()) / weight_norm).to(grad_y.scalar_type());
      grad_y_for_weight = grad_y * g;
    }
    frozen_layer_grads(ctx, e, grad_y, grad_y_for_weight, x, weight, grads);
    return once_differentiable(std::move(grads), {grad_y, x, weight, lora_a, lora_b, magnitude}, create_graph,
                               "lrk::dora_fused_fwd");
  }
};

std::tuple<at::Tensor, at::Tensor> lora_fused_fwd_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                           const OptTensor& bias, const at::Tensor& lora_a,
                                                           const at::Tensor& lora_b, double scale, double dropout_p,
                                                           c10::SymInt seed) {
  auto out = LoraFusedFunction::apply(x, weight, bias, lora_a, lora_b, scale, dropout_p, std::move(seed));
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_fused_fwd_autograd(
    const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, double scale, double dropout_p, c10::SymInt seed,
    const OptTensor& weight_sq_norm) {
  auto out = DoraFusedFunction::apply(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, std::move(seed),
                                      weight_sq_norm);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, Autograd, m) {
  m.impl("lora_fused_fwd", &lora_fused_fwd_autograd);
  m.impl("dora_fused_fwd", &dora_fused_fwd_autograd);
}

}  // namespace lrk
