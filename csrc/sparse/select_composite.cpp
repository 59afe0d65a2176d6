// Mask construction on top of the radix select, for every device: compositions of
// ATen ops and lrk::abs_kth_value, registered as CompositeExplicitAutograd (fakes
// come from Python). Nothing here synchronises with the host, so the CUDA path
// stays asynchronous and capturable.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "sparse/sparse_checks.h"

namespace lrk {
namespace {

at::Tensor call_abs_kth_value(const at::Tensor& x, int64_t k, bool largest) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrk::abs_kth_value", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, bool)>();
  return op.call(x, k, largest);
}

// Exactly k entries: every |x| strictly beyond the k-th value, then the entries
// equal to it in flat (row-major) order until k are taken, so that ties (common in
// bf16 weights) never change the budget. NaN ranks above +inf, as in the select.
at::Tensor abs_topk_mask(const at::Tensor& x, int64_t k, bool largest) {
  check_float_tensor(x, "x");
  const int64_t n = x.numel();
  TORCH_CHECK(k >= 0 && k <= n, "k: expected a count in [0, numel(x)] = [0, ", n, "], got ", k);
  const auto bool_opts = x.options().dtype(at::kBool);
  if (k == 0) return at::zeros(x.sizes(), bool_opts);
  if (k == n) return at::ones(x.sizes(), bool_opts);
  const at::Tensor t = call_abs_kth_value(x, k, largest);  // 0-D, on x's device
  const at::Tensor a = x.abs();
  const at::Tensor a_nan = at::isnan(a);
  const at::Tensor t_nan = at::isnan(t);
  const at::Tensor strict = largest ? at::logical_or(at::gt(a, t), at::logical_and(a_nan, at::logical_not(t_nan)))
                                    : at::logical_or(at::lt(a, t), at::logical_and(at::logical_not(a_nan), t_nan));
  const at::Tensor eq = at::logical_or(at::eq(a, t), at::logical_and(a_nan, t_nan));
  const at::Tensor need = at::sub(at::scalar_tensor(k, x.options().dtype(at::kLong)), strict.sum());  // 0-D
  const at::Tensor tie_rank = eq.reshape({-1}).cumsum(0).view(x.sizes());                         // 1-based among ties
  return at::logical_or(strict, at::logical_and(eq, at::le(tie_rank, need)));
}

// Per-tile scores of a 2-D tensor in b x b tiles (edge tiles zero-padded):
//   "norm":        the Frobenius norm of the tile
//   "count_below": how many entries of the tile have |w| < threshold (padding never counts)
// float32 result (float64 for float64 input), shape [ceil(N/b), ceil(K/b)].
at::Tensor block_scores(const at::Tensor& weight, int64_t block_size, c10::string_view score, double threshold) {
  check_float_tensor(weight, "weight");
  check_dim(weight, "weight", 2);
  check_block_size(block_size);
  TORCH_CHECK(score == "norm" || score == "count_below", "score: expected 'norm' or 'count_below', got '", score,
              "'");
  check_finite(threshold, "threshold");
  const int64_t b = block_size, N = weight.size(0), K = weight.size(1);
  const int64_t nbr = (N + b - 1) / b, nbc = (K + b - 1) / b;
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.to(acc);
  const at::Tensor v = score == "norm" ? w.square() : at::lt(w.abs(), threshold).to(acc);
  const at::Tensor padded = at::constant_pad_nd(v, {0, nbc * b - K, 0, nbr * b - N}, 0.0);
  const at::Tensor sums = padded.view({nbr, b, nbc, b}).sum({1, 3});
  return score == "norm" ? sums.sqrt() : sums;
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CompositeExplicitAutograd, m) {
  m.impl("abs_topk_mask", &abs_topk_mask);
  m.impl("block_scores", &block_scores);
}

}  // namespace lrk
