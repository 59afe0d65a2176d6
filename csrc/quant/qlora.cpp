// Fused QLoRA and QDoRA: lora_fused / dora_fused over a frozen 4-bit W
// (bitsandbytes' layout), composed of lrk's ops so that one implementation serves
// every device and picks up each device's kernels:
//   base products    linear_4bit (x @ W^T), linear_4bit_grad_input (dy @ W)
//   LoRA branch      philox_dropout and lora_fused_bwd (dA, dB: the skinny kernels
//                    on CUDA); lora_fused_bwd reads its weight only for grad_x,
//                    which it is not asked for here
//   DoRA             dora_grad_scale, and the row norms from dora_norm.h with
//                    A @ W^T = linear_4bit(A) and ||W_n||^2 from weight_4bit_sq_norm
// W never exists in full. Double-quantized absmax (uint8, with absmax2 and code2)
// is dequantized per call (it is 1/16 of the packed weight's size in float32),
// and never saved for backward, so training keeps bitsandbytes' storage.
// Registered as CompositeExplicitAutograd; autograd in qlora_autograd.cpp, fakes
// in python/lrk/quant_ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/autocast.h"
#include "common/autograd_util.h"
#include "lora/dora_norm.h"
#include "lora/lora_checks.h"
#include "quant/qlora_checks.h"

namespace lrk {
namespace {

using OptTensor = std::optional<at::Tensor>;

using Linear4bitFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                int64_t, int64_t);
using DequantizeAbsmaxFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double);
using DropoutFn = at::Tensor(const at::Tensor&, double, int64_t);
using LoraBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, double,
                                                                 double, int64_t, bool);
using GradScaleFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&);

// A checked 4-bit weight with its float32 absmax (dequantized when double-quantized).
struct Weight4bit {
  at::Tensor packed, absmax, code;
  int64_t blocksize;
  Weight4bitDims dims;

  at::Tensor times_transpose(const at::Tensor& x) const {  // x @ W^T
    static auto linear = lrk_op<Linear4bitFn>("lrk::linear_4bit");
    return linear.call(x, packed, absmax, code, blocksize, dims.rows, dims.cols);
  }
  at::Tensor times(const at::Tensor& grad_y) const {  // grad_y @ W
    static auto grad_input = lrk_op<Linear4bitFn>("lrk::linear_4bit_grad_input");
    return grad_input.call(grad_y, packed, absmax, code, blocksize, dims.rows, dims.cols);
  }
};

Weight4bit weight_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                       int64_t out_features, int64_t in_features, const OptTensor& absmax2, const OptTensor& code2,
                       int64_t blocksize2, double offset, const at::Tensor& x) {
  at::Tensor absmax_f = absmax;
  if (absmax.defined() && absmax.scalar_type() == at::kByte) {
    TORCH_CHECK(present(absmax2) && present(code2),
                "absmax: a uint8 (double-quantized) absmax needs absmax2 and code2 (bitsandbytes' state2)");
    static auto dequantize = lrk_op<DequantizeAbsmaxFn>("lrk::dequantize_absmax");
    check_same_device(absmax, "absmax", x, "x");
    absmax_f = dequantize.call(absmax, *absmax2, *code2, blocksize2, offset);
  } else {
    TORCH_CHECK(!present(absmax2) && !present(code2),
                "absmax2, code2: given with a float32 absmax; they belong to a double-quantized (uint8) absmax");
  }
  const Weight4bitDims dims = check_weight_4bit(packed, absmax_f, code, blocksize, out_features, in_features, x, "x");
  return Weight4bit{packed, absmax_f, code, blocksize, dims};
}

at::Tensor maybe_dropout(const at::Tensor& t, double p, int64_t seed) {
  static auto dropout = lrk_op<DropoutFn>("lrk::philox_dropout");
  return p > 0 ? dropout.call(t, p, seed) : t;
}

// Norms and g in float32, or float64 for float64 x (as dora_fused).
at::ScalarType norm_dtype(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> qlora_forward(const at::Tensor& x, const Weight4bit& w, const OptTensor& bias,
                                                 const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                 double dropout_p, int64_t seed) {
  const QloraDims d = check_qlora_inputs(x, w.dims, bias, lora_a, lora_b, scale, dropout_p);
  const at::Tensor x2 = x.reshape({d.M, d.K});
  const at::Tensor h = at::mm(maybe_dropout(x2, dropout_p, seed), lora_a.t());  // [M, r]
  at::Tensor y = w.times_transpose(x2);                                          // [M, N], a fresh tensor
  if (present(bias)) y.add_(*bias);
  y.addmm_(h, lora_b.t(), /*beta=*/1.0, /*alpha=*/scale);
  return {y.reshape(with_last_dim(x, d.N)), h.reshape(with_last_dim(x, d.r))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qlora_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                              const Weight4bit& w, const at::Tensor& lora_a,
                                                              const at::Tensor& lora_b, const at::Tensor& h,
                                                              double scale, double dropout_p, int64_t seed,
                                                              bool need_grad_x) {
  const QloraDims d = check_qlora_inputs(x, w.dims, std::nullopt, lora_a, lora_b, scale, dropout_p);
  check_qlora_bwd_inputs(grad_y, x, h, d);
  // dA, dB from the LoRA family's backward; its weight argument only carries W's
  // shape (a zero-stride view of one zero: no memory), read for grad_x alone.
  static auto lora_bwd = lrk_op<LoraBwdFn>("lrk::lora_fused_bwd");
  const at::Tensor weight_shape = at::zeros({}, x.options()).expand({d.N, d.K});
  auto [unused, grad_a, grad_b] =
      lora_bwd.call(grad_y, x, weight_shape, lora_a, lora_b, h, scale, dropout_p, seed, /*need_grad_x=*/false);
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_grad_x) {  // dx = dy @ W + dropout(s * dy @ B @ A)
    const at::Tensor dy = grad_y.reshape({d.M, d.N});
    const at::Tensor dh = at::mm(dy, lora_b).mul_(scale);
    at::Tensor gx = w.times(dy);
    gx.add_(maybe_dropout(at::mm(dh, lora_a), dropout_p, seed));
    grad_x = gx.reshape(x.sizes());
  }
  return {grad_x, grad_a, grad_b};
}

// ||W_n||^2 in float64, one chunk of rows at a time (ATen ops: any device).
at::Tensor weight_4bit_sq_norm(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                               int64_t blocksize, int64_t out_features, int64_t in_features) {
  LRK_NO_AUTOCAST();
  const Weight4bitDims w =
      check_weight_4bit(packed, absmax, code, blocksize, out_features, in_features, packed, "packed");
  const at::Tensor bytes = packed.reshape({-1});
  const auto index_options = packed.options().dtype(at::kLong);
  at::Tensor out = at::empty({w.rows}, absmax.options().dtype(at::kDouble));
  const int64_t chunk_rows = std::max<int64_t>(1, (int64_t{1} << 20) / w.cols);
  for (int64_t row0 = 0; row0 < w.rows; row0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, w.rows - row0);
    const int64_t e0 = row0 * w.cols, e1 = e0 + rows * w.cols;  // elements [e0, e1) of the flat W
    const at::Tensor chunk = bytes.slice(0, e0 / 2, (e1 + 1) / 2).to(at::kLong);
    const at::Tensor nibbles = at::stack({chunk.bitwise_right_shift(4), chunk.bitwise_and(15)}, 1)
                                   .reshape({-1})
                                   .slice(0, e0 % 2, e0 % 2 + (e1 - e0));
    const at::Tensor blocks = at::arange(e0, e1, index_options).div_(blocksize, "floor");
    const at::Tensor values = (code.index_select(0, nibbles) * absmax.index_select(0, blocks)).to(at::kDouble);
    out.narrow(0, row0, rows).copy_(values.view({rows, w.cols}).square().sum(1));
  }
  return out;
}

at::Tensor dora_norm(const at::Tensor& x, const Weight4bit& w, const at::Tensor& lora_a, const at::Tensor& lora_b,
                     double scale, const OptTensor& weight_sq_norm) {
  const auto acc = norm_dtype(x);
  at::Tensor wsq;
  if (present(weight_sq_norm)) {
    const at::Tensor& t = *weight_sq_norm;
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                "weight_sq_norm: expected float32 or float64, got ", t.scalar_type());
    check_same_device(t, "weight_sq_norm", x, "x");
    check_dim(t, "weight_sq_norm", 1);
    check_size(t, "weight_sq_norm", 0, w.dims.rows, "out_features of the 4-bit weight");
    wsq = t.to(acc);
  } else {
    wsq = weight_4bit_sq_norm(w.packed, w.absmax, w.code, w.blocksize, w.dims.rows, w.dims.cols).to(acc);
  }
  const at::Tensor a = lora_a.to(acc);
  return dora_norm_from_parts(wsq, w.times_transpose(a), a, lora_b.to(acc), scale);
}

// ---- op entry points ----------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> qlora_fused_fwd(const at::Tensor& x, const at::Tensor& packed,
                                                   const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                                                   int64_t out_features, int64_t in_features, const OptTensor& bias,
                                                   const at::Tensor& lora_a, const at::Tensor& lora_b, double scale,
                                                   double dropout_p, int64_t seed, const OptTensor& absmax2,
                                                   const OptTensor& code2, int64_t blocksize2, double offset) {
  LRK_NO_AUTOCAST();
  check_float_tensor(x, "x");
  const Weight4bit w = weight_4bit(packed, absmax, code, blocksize, out_features, in_features, absmax2, code2,
                                   blocksize2, offset, x);
  return qlora_forward(x, w, bias, lora_a, lora_b, scale, dropout_p, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> qlora_fused_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const at::Tensor& code, int64_t blocksize, int64_t out_features, int64_t in_features, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& h, double scale, double dropout_p, int64_t seed, bool need_grad_x,
    const OptTensor& absmax2, const OptTensor& code2, int64_t blocksize2, double offset) {
  LRK_NO_AUTOCAST();
  check_float_tensor(x, "x");
  const Weight4bit w = weight_4bit(packed, absmax, code, blocksize, out_features, in_features, absmax2, code2,
                                   blocksize2, offset, x);
  return qlora_backward(grad_y, x, w, lora_a, lora_b, h, scale, dropout_p, seed, need_grad_x);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qdora_fused_fwd(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
    int64_t out_features, int64_t in_features, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, double scale, double dropout_p, int64_t seed,
    const OptTensor& weight_sq_norm, const OptTensor& absmax2, const OptTensor& code2, int64_t blocksize2,
    double offset) {
  LRK_NO_AUTOCAST();
  check_float_tensor(x, "x");
  const Weight4bit w = weight_4bit(packed, absmax, code, blocksize, out_features, in_features, absmax2, code2,
                                   blocksize2, offset, x);
  const QloraDims d = check_qlora_inputs(x, w.dims, bias, lora_a, lora_b, scale, dropout_p);
  check_dora_magnitude(magnitude, x, d.N);
  const at::Tensor norm = dora_norm(x, w, lora_a, lora_b, scale, weight_sq_norm);
  const at::Tensor g = magnitude.to(norm.scalar_type()) / norm;  // [N]
  auto [y_unscaled, h] = qlora_forward(x, w, std::nullopt, lora_a, lora_b, scale, dropout_p, seed);
  at::Tensor y = at::empty_like(y_unscaled);  // one elementwise pass, rounded once
  if (present(bias)) {
    at::addcmul_out(y, *bias, y_unscaled, g);
  } else {
    at::mul_out(y, y_unscaled, g);
  }
  return {y, h, y_unscaled, norm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qdora_fused_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
    const at::Tensor& code, int64_t blocksize, int64_t out_features, int64_t in_features, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, const at::Tensor& h, const at::Tensor& y_unscaled,
    const at::Tensor& weight_norm, double scale, double dropout_p, int64_t seed, bool need_grad_x,
    const OptTensor& absmax2, const OptTensor& code2, int64_t blocksize2, double offset) {
  LRK_NO_AUTOCAST();
  check_float_tensor(x, "x");
  const Weight4bit w = weight_4bit(packed, absmax, code, blocksize, out_features, in_features, absmax2, code2,
                                   blocksize2, offset, x);
  check_dora_magnitude(magnitude, x, w.dims.rows);
  const auto acc = norm_dtype(x);
  TORCH_CHECK(weight_norm.scalar_type() == acc && weight_norm.dim() == 1 && weight_norm.size(0) == w.dims.rows,
              "weight_norm: expected a ", acc, " tensor of shape [", w.dims.rows, "], got ", weight_norm.scalar_type(),
              " ", weight_norm.sizes());
  TORCH_CHECK(y_unscaled.sizes() == grad_y.sizes(), "y_unscaled: expected shape ", grad_y.sizes(), ", got ",
              y_unscaled.sizes());
  // Backward treats the norm as a constant (as dora_fused): LoRA's backward on
  // grad_y * g, and grad_m = sum_rows(grad_y * y_unscaled) / norm.
  static auto grad_scale = lrk_op<GradScaleFn>("lrk::dora_grad_scale");
  const at::Tensor g = magnitude.to(acc) / weight_norm;
  const auto [grad_y_scaled, column_sums] = grad_scale.call(grad_y, y_unscaled, g);
  auto [grad_x, grad_a, grad_b] =
      qlora_backward(grad_y_scaled, x, w, lora_a, lora_b, h, scale, dropout_p, seed, need_grad_x);
  return {grad_x, grad_a, grad_b, (column_sums / weight_norm).to(magnitude.scalar_type())};
}

// The user-facing ops: the forward ops' first output (autograd is on the _fwd ops).
at::Tensor qlora_fused(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                       int64_t blocksize, int64_t out_features, int64_t in_features, const OptTensor& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
                       c10::SymInt seed, const OptTensor& absmax2, const OptTensor& code2, int64_t blocksize2,
                       double offset) {
  static auto fwd = lrk_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
      const OptTensor&, const at::Tensor&, const at::Tensor&, double, double, c10::SymInt, const OptTensor&,
      const OptTensor&, int64_t, double)>("lrk::qlora_fused_fwd");
  return std::get<0>(fwd.call(x, packed, absmax, code, blocksize, out_features, in_features, bias, lora_a, lora_b,
                              scale, dropout_p, std::move(seed), absmax2, code2, blocksize2, offset));
}

at::Tensor qdora_fused(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                       int64_t blocksize, int64_t out_features, int64_t in_features, const OptTensor& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& magnitude, double scale,
                       double dropout_p, c10::SymInt seed, const OptTensor& weight_sq_norm, const OptTensor& absmax2,
                       const OptTensor& code2, int64_t blocksize2, double offset) {
  static auto fwd = lrk_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
      const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, c10::SymInt,
      const OptTensor&, const OptTensor&, const OptTensor&, int64_t, double)>("lrk::qdora_fused_fwd");
  return std::get<0>(fwd.call(x, packed, absmax, code, blocksize, out_features, in_features, bias, lora_a, lora_b,
                              magnitude, scale, dropout_p, std::move(seed), weight_sq_norm, absmax2, code2, blocksize2,
                              offset));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CompositeExplicitAutograd, m) {
  m.impl("weight_4bit_sq_norm", &weight_4bit_sq_norm);
  m.impl("qlora_fused_fwd", &qlora_fused_fwd);
  m.impl("qlora_fused_bwd", &qlora_fused_bwd);
  m.impl("qdora_fused_fwd", &qdora_fused_fwd);
  m.impl("qdora_fused_bwd", &qdora_fused_bwd);
}

TORCH_LIBRARY_IMPL(lrk, CompositeImplicitAutograd, m) {
  m.impl("qlora_fused", &qlora_fused);
  m.impl("qdora_fused", &qdora_fused);
}

}  // namespace lrk
