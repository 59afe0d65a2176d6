// Autograd of the fused QLoRA and QDoRA forward ops, in C++ like the LoRA
// family's (csrc/lora/lora_autograd.cpp: host overhead close to nn.Linear's).
// The 4-bit weight is frozen: packed, absmax and code get no gradient (a float
// absmax that requires grad is an error rather than a silently missing gradient);
// x, lora_a, lora_b, magnitude and bias do.
//
// What backward keeps: x, h = dropout(x) @ lora_a^T (and for QDoRA y_unscaled and
// the row norms) plus references to the quantized weight's own tensors; a
// double-quantized absmax is dequantized again in backward, never saved.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace lrk {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

using QloraFwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, int64_t, int64_t, int64_t, const OptTensor&,
                                                      const at::Tensor&, const at::Tensor&, double, double,
                                                      c10::SymInt, const OptTensor&, const OptTensor&, int64_t,
                                                      double);
using QloraBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
    int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, c10::SymInt, bool,
    const OptTensor&, const OptTensor&, int64_t, double);
using QdoraFwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
    const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, c10::SymInt,
    const OptTensor&, const OptTensor&, const OptTensor&, int64_t, double);
using QdoraBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t,
    int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, double, double, c10::SymInt, bool, const OptTensor&, const OptTensor&, int64_t, double);

// Edge indices count only the tensor arguments present: x, packed, absmax, code,
// [bias], lora_a, lora_b, [magnitude]. Gradient slots count every argument:
// x 0, bias 7, lora_a 8, lora_b 9, magnitude 10.
struct QEdges {
  size_t x = 0, bias = 4, lora_a, lora_b, magnitude;
  explicit QEdges(bool has_bias) : lora_a(has_bias ? 5 : 4), lora_b(lora_a + 1), magnitude(lora_b + 1) {}
};
constexpr size_t kGradX = 0, kGradBias = 7, kGradA = 8, kGradB = 9, kGradMagnitude = 10;

void check_frozen(const at::Tensor& absmax, const at::Tensor& code) {
  TORCH_CHECK(!absmax.requires_grad() && !code.requires_grad(),
              "absmax, code: the 4-bit weight is frozen and gets no gradient; pass them detached");
}

// The quantized weight's arguments, saved as they came (absmax2/code2 may be absent).
struct SavedWeight {
  int64_t blocksize, out_features, in_features, blocksize2;
  double offset;
};

void save_weight(AutogradContext* ctx, int64_t blocksize, int64_t out_features, int64_t in_features,
                 int64_t blocksize2, double offset, double scale, double dropout_p, const c10::SymInt& seed,
                 bool has_bias) {
  ctx->saved_data["blocksize"] = blocksize;
  ctx->saved_data["out_features"] = out_features;
  ctx->saved_data["in_features"] = in_features;
  ctx->saved_data["blocksize2"] = blocksize2;
  ctx->saved_data["offset"] = offset;
  ctx->saved_data["scale"] = scale;
  ctx->saved_data["dropout_p"] = dropout_p;
  ctx->saved_data["seed"] = seed;
  ctx->saved_data["has_bias"] = has_bias;
}

SavedWeight saved_weight(AutogradContext* ctx) {
  return SavedWeight{ctx->saved_data["blocksize"].toInt(), ctx->saved_data["out_features"].toInt(),
                     ctx->saved_data["in_features"].toInt(), ctx->saved_data["blocksize2"].toInt(),
                     ctx->saved_data["offset"].toDouble()};
}

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
at::Tensor or_undefined(const OptTensor& t) { return present(t) ? *t : at::Tensor(); }

void bias_grad(AutogradContext* ctx, const QEdges& e, const at::Tensor& grad_y, int64_t n, variable_list& grads) {
  if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(e.bias)) {
    grads[kGradBias] = rows_of(grad_y, n).sum(0);
  }
}

class QloraFusedFunction : public torch::autograd::Function<QloraFusedFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                               int64_t out_features, int64_t in_features, const OptTensor& bias,
                               const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
                               c10::SymInt seed, const OptTensor& absmax2, const OptTensor& code2, int64_t blocksize2,
                               double offset) {
    check_frozen(absmax, code);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto fwd = lrk_op<QloraFwdFn>("lrk::qlora_fused_fwd");
    auto [y, h] = fwd.call(x, packed, absmax, code, blocksize, out_features, in_features, bias, lora_a, lora_b, scale,
                           dropout_p, seed, absmax2, code2, blocksize2, offset);
    ctx->mark_non_differentiable({h});  // a saved activation, not a result
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, packed, absmax, code, lora_a, lora_b, h, or_undefined(absmax2), or_undefined(code2)});
    save_weight(ctx, blocksize, out_features, in_features, blocksize2, offset, scale, dropout_p, seed, present(bias));
    return {y, h};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool create_graph = at::GradMode::is_enabled();
    const at::NoGradGuard no_grad;
    variable_list grads(17);  // one per forward argument
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &lora_a = saved[4], &lora_b = saved[5], &h = saved[6];
    const SavedWeight w = saved_weight(ctx);
    const QEdges e(ctx->saved_data["has_bias"].toBool());
    const bool need_x = ctx->needs_input_grad(e.x);
    static auto bwd = lrk_op<QloraBwdFn>("lrk::qlora_fused_bwd");
    auto [gx, ga, gb] = bwd.call(grad_y, x, saved[1], saved[2], saved[3], w.blocksize, w.out_features,
                                 w.in_features, lora_a, lora_b, h, ctx->saved_data["scale"].toDouble(),
                                 ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["seed"].toSymInt(), need_x,
                                 optional_of(saved[7]), optional_of(saved[8]), w.blocksize2, w.offset);
    if (need_x) grads[kGradX] = gx;
    if (ctx->needs_input_grad(e.lora_a)) grads[kGradA] = ga;
    if (ctx->needs_input_grad(e.lora_b)) grads[kGradB] = gb;
    bias_grad(ctx, e, grad_y, w.out_features, grads);
    return once_differentiable(std::move(grads), {grad_y, x, lora_a, lora_b}, create_graph, "lrk::qlora_fused_fwd");
  }
};

class QdoraFusedFunction : public torch::autograd::Function<QdoraFusedFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                               int64_t out_features, int64_t in_features, const OptTensor& bias,
                               const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& magnitude,
                               double scale, double dropout_p, c10::SymInt seed, const OptTensor& weight_sq_norm,
                               const OptTensor& absmax2, const OptTensor& code2, int64_t blocksize2, double offset) {
    check_frozen(absmax, code);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto fwd = lrk_op<QdoraFwdFn>("lrk::qdora_fused_fwd");
    auto [y, h, y_unscaled, weight_norm] =
        fwd.call(x, packed, absmax, code, blocksize, out_features, in_features, bias, lora_a, lora_b, magnitude, scale,
                 dropout_p, seed, weight_sq_norm, absmax2, code2, blocksize2, offset);
    ctx->mark_non_differentiable({h, y_unscaled, weight_norm});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, packed, absmax, code, lora_a, lora_b, magnitude, h, y_unscaled, weight_norm,
                            or_undefined(absmax2), or_undefined(code2)});
    save_weight(ctx, blocksize, out_features, in_features, blocksize2, offset, scale, dropout_p, seed, present(bias));
    return {y, h, y_unscaled, weight_norm};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool create_graph = at::GradMode::is_enabled();
    const at::NoGradGuard no_grad;
    variable_list grads(19);  // one per forward argument
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return grads;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &lora_a = saved[4], &lora_b = saved[5], &magnitude = saved[6];
    const SavedWeight w = saved_weight(ctx);
    const QEdges e(ctx->saved_data["has_bias"].toBool());
    const bool need_x = ctx->needs_input_grad(e.x);
    static auto bwd = lrk_op<QdoraBwdFn>("lrk::qdora_fused_bwd");
    auto [gx, ga, gb, gm] =
        bwd.call(grad_y, x, saved[1], saved[2], saved[3], w.blocksize, w.out_features, w.in_features, lora_a, lora_b,
                 magnitude, saved[7], saved[8], saved[9], ctx->saved_data["scale"].toDouble(),
                 ctx->saved_data["dropout_p"].toDouble(), ctx->saved_data["seed"].toSymInt(), need_x,
                 optional_of(saved[10]), optional_of(saved[11]), w.blocksize2, w.offset);
    if (need_x) grads[kGradX] = gx;
    if (ctx->needs_input_grad(e.lora_a)) grads[kGradA] = ga;
    if (ctx->needs_input_grad(e.lora_b)) grads[kGradB] = gb;
    if (ctx->needs_input_grad(e.magnitude)) grads[kGradMagnitude] = gm;
    bias_grad(ctx, e, grad_y, w.out_features, grads);
    return once_differentiable(std::move(grads), {grad_y, x, lora_a, lora_b, magnitude}, create_graph,
                               "lrk::qdora_fused_fwd");
  }
};

std::tuple<at::Tensor, at::Tensor> qlora_fused_fwd_autograd(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
    int64_t out_features, int64_t in_features, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scale, double dropout_p, c10::SymInt seed, const OptTensor& absmax2,
    const OptTensor& code2, int64_t blocksize2, double offset) {
  auto out = QloraFusedFunction::apply(x, packed, absmax, code, blocksize, out_features, in_features, bias, lora_a,
                                       lora_b, scale, dropout_p, std::move(seed), absmax2, code2, blocksize2, offset);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qdora_fused_fwd_autograd(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
    int64_t out_features, int64_t in_features, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, double scale, double dropout_p, c10::SymInt seed,
    const OptTensor& weight_sq_norm, const OptTensor& absmax2, const OptTensor& code2, int64_t blocksize2,
    double offset) {
  auto out = QdoraFusedFunction::apply(x, packed, absmax, code, blocksize, out_features, in_features, bias, lora_a,
                                       lora_b, magnitude, scale, dropout_p, std::move(seed), weight_sq_norm, absmax2,
                                       code2, blocksize2, offset);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, Autograd, m) {
  m.impl("qlora_fused_fwd", &qlora_fused_fwd_autograd);
  m.impl("qdora_fused_fwd", &qdora_fused_fwd_autograd);
}

}  // namespace lrk
