// SNELL (ops.md section 4): a sparse delta merged from low-rank factors through a
// kernel function, with competition-based sparsification:
//   Kmat[i, j] = scale * kappa(a_i, b_j),  a_i = lora_a[i] (out side), b_j = lora_b[j] (in side)
//     linear            a_i . b_j
//     piecewise_linear  sum_h c_h ||a_i^h - b_j^h||_2   (heads: equal slices of the rank;
//                       SNELL's released code, c_h = 0.1 * (-1)^h by default, frozen)
//     rbf               exp(-gamma ||a_i - b_j||^2)
//   Delta = Kmat * mask, mask = the largest (1 - sparsity) fraction of |Kmat| (element
//   competition, exact count through the radix select) or of the b x b tiles by norm
//   (block competition);  y = x @ (W + Delta)^T + bias.
// Nothing dense outlives a call: backward recomputes Kmat and the mask from lora_a,
// lora_b (no index or matrix is stored), takes the masked gradient with the SDDMM,
// then applies the chain rule through kappa per kept entry (O(nnz * r)).
// Compositions of ATen and lrk ops: one CompositeExplicitAutograd implementation.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "sparse/sparse_checks.h"

namespace lrk {
namespace {

enum class KernelKind { Linear, PiecewiseLinear, Rbf };

struct SnellParams {
  KernelKind kind;
  std::vector<double> coeffs;  // piecewise_linear: one per head
  double gamma;
  double scale;
  double sparsity;
  int64_t block_size;  // 0: element competition
};

struct SnellDims {
  int64_t N, K, r;
};

KernelKind parse_kernel(c10::string_view kernel) {
  if (kernel == "linear") return KernelKind::Linear;
  if (kernel == "piecewise_linear") return KernelKind::PiecewiseLinear;
  if (kernel == "rbf") return KernelKind::Rbf;
  TORCH_CHECK(false, "kernel: expected 'linear', 'piecewise_linear' or 'rbf', got '", kernel, "'");
}

SnellDims check_factors(const at::Tensor& lora_a, const at::Tensor& lora_b, const SnellParams& p,
                        c10::string_view kernel) {
  check_float_tensor(lora_a, "lora_a");
  check_float_tensor(lora_b, "lora_b");
  check_same_dtype(lora_b, "lora_b", lora_a, "lora_a");
  check_same_device(lora_b, "lora_b", lora_a, "lora_a");
  check_dim(lora_a, "lora_a", 2);
  check_dim(lora_b, "lora_b", 2);
  const int64_t r = lora_a.size(1);
  TORCH_CHECK(r >= 1, "lora_a: rank (dim 1) must be at least 1, got shape ", lora_a.sizes());
  check_size(lora_b, "lora_b", 1, r, "rank = lora_a.shape[1]");
  if (p.kind == KernelKind::PiecewiseLinear) {
    const int64_t H = static_cast<int64_t>(p.coeffs.size());
    TORCH_CHECK(H >= 1, "head_coeffs: kernel 'piecewise_linear' needs one coefficient per head, got none");
    TORCH_CHECK(r % H == 0, "head_coeffs: the rank ", r, " must be divisible by the number of heads ", H);
    for (double c : p.coeffs) check_finite(c, "head_coeffs");
  } else {
    TORCH_CHECK(p.coeffs.empty(), "head_coeffs: only kernel 'piecewise_linear' uses head coefficients, got ",
                p.coeffs.size(), " for kernel '", kernel, "'");
  }
  check_finite(p.gamma, "gamma");
  if (p.kind == KernelKind::Rbf) TORCH_CHECK(p.gamma > 0, "gamma: expected a positive number, got ", p.gamma);
  check_finite(p.scale, "scale");
  check_sparsity(p.sparsity);
  if (p.block_size != 0) check_block_size(p.block_size);
  return SnellDims{lora_a.size(0), lora_b.size(0), r};
}

SnellParams make_params(c10::string_view kernel, double sparsity, int64_t block_size, at::ArrayRef<double> coeffs,
                        double gamma, double scale) {
  return SnellParams{parse_kernel(kernel), coeffs.vec(), gamma, scale, sparsity, block_size};
}

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// ||a_i - b_j||^2 for all pairs, through one GEMM (clamped: rounding can go below 0).
// inplace: reuse buffers (the explicit-autograd ops); else out-of-place ops that
// autograd can differentiate (snell_delta).
at::Tensor sq_distances(const at::Tensor& a, const at::Tensor& b, bool inplace) {
  const at::Tensor a2 = a.square().sum(1, true);         // [N, 1]
  const at::Tensor b2 = b.square().sum(1).unsqueeze(0);  // [1, K]
  at::Tensor d = at::addmm(a2, a, b.t(), 1.0, -2.0);
  return inplace ? d.add_(b2).clamp_min_(0.0) : (d + b2).clamp_min(0.0);
}

// Kmat [N, K] in float32 (float64 for float64 factors).
at::Tensor kernel_matrix(const at::Tensor& lora_a, const at::Tensor& lora_b, const SnellParams& p,
                         bool inplace = true) {
  const auto acc = acc_dtype(lora_a);
  const at::Tensor a = lora_a.to(acc), b = lora_b.to(acc);
  switch (p.kind) {
    case KernelKind::Linear:
      return at::mm(a, b.t()).mul(p.scale);
    case KernelKind::PiecewiseLinear: {
      const int64_t H = static_cast<int64_t>(p.coeffs.size()), dh = a.size(1) / H;
      at::Tensor out;
      for (int64_t h = 0; h < H; ++h) {
        const at::Tensor d2 = sq_distances(a.narrow(1, h * dh, dh), b.narrow(1, h * dh, dh), inplace);
        const at::Tensor term = (inplace ? d2.sqrt_() : d2.sqrt()).mul(p.coeffs[h] * p.scale);
        out = h == 0 ? term : (inplace ? out.add_(term) : out + term);
      }
      return out;
    }
    case KernelKind::Rbf: {
      const at::Tensor d2 = sq_distances(a, b, inplace);
      return inplace ? d2.mul_(-p.gamma).exp_().mul_(p.scale) : d2.mul(-p.gamma).exp().mul(p.scale);
    }
  }
  TORCH_CHECK(false, "unreachable");
}

at::Tensor call_abs_topk_mask(const at::Tensor& x, int64_t k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrk::abs_topk_mask", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, bool)>();
  return op.call(x, k, true);
}

at::Tensor call_block_norms(const at::Tensor& w, int64_t b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrk::block_scores", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, c10::string_view, double)>();
  return op.call(w, b, "norm", 0.0);
}

// The competition's winners: an element mask [N, K] (block_size 0), or a block mask
// [ceil(N/b), ceil(K/b)]; both hold exactly the kept count.
at::Tensor competition_mask(const at::Tensor& kmat, const SnellParams& p) {
  if (p.block_size == 0) return call_abs_topk_mask(kmat, keep_count(kmat.numel(), p.sparsity));
  const at::Tensor scores = call_block_norms(kmat, p.block_size);
  return call_abs_topk_mask(scores, keep_count(scores.numel(), p.sparsity));
}

// Block mask [nbr, nbc] -> element mask [N, K] (a broadcast view, no index math).
at::Tensor expand_block_mask(const at::Tensor& bmask, int64_t b, int64_t N, int64_t K) {
  const int64_t nbr = bmask.size(0), nbc = bmask.size(1);
  return bmask.view({nbr, 1, nbc, 1}).expand({nbr, b, nbc, b}).reshape({nbr * b, nbc * b}).narrow(0, 0, N).narrow(1, 0, K);
}

// Kmat * mask, in place; returns Kmat.
at::Tensor sparsify_(at::Tensor& kmat, const at::Tensor& mask, const SnellParams& p) {
  if (p.block_size == 0) return kmat.mul_(mask);
  return kmat.mul_(expand_block_mask(mask, p.block_size, kmat.size(0), kmat.size(1)));
}

// Chain rule through kappa at the kept entries: grad_a[i] += g_ij dkappa/da_i,
// grad_b[j] += g_ij dkappa/db_j, in chunks of entries (memory O(chunk * r)).
std::tuple<at::Tensor, at::Tensor> kernel_grads(const at::Tensor& a, const at::Tensor& b, const at::Tensor& rows,
                                                const at::Tensor& cols, const at::Tensor& g, const SnellParams& p) {
  at::Tensor grad_a = at::zeros_like(a), grad_b = at::zeros_like(b);
  const int64_t nnz = rows.numel(), r = a.size(1);
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / r);
  for (int64_t c0 = 0; c0 < nnz; c0 += chunk) {
    const int64_t c = std::min(chunk, nnz - c0);
    const at::Tensor rr = rows.narrow(0, c0, c), cc = cols.narrow(0, c0, c);
    const at::Tensor gg = g.narrow(0, c0, c).mul(p.scale).unsqueeze(1);  // [c, 1]
    const at::Tensor ai = a.index_select(0, rr), bj = b.index_select(0, cc);
    at::Tensor ga, gb;
    switch (p.kind) {
      case KernelKind::Linear:
        ga = bj.mul(gg);
        gb = ai.mul(gg);
        break;
      case KernelKind::PiecewiseLinear: {
        const int64_t H = static_cast<int64_t>(p.coeffs.size()), dh = r / H;
        const at::Tensor diff = ai - bj;
        ga = at::empty_like(diff);
        for (int64_t h = 0; h < H; ++h) {
          const at::Tensor dfh = diff.narrow(1, h * dh, dh);
          const at::Tensor dist = at::linalg_vector_norm(dfh, 2, {1}, true);  // [c, 1]
          // d||u||/du = u / ||u||; at u = 0 the subgradient 0 (as torch.cdist's backward).
          const at::Tensor w = at::where(dist > 0, gg.mul(p.coeffs[h]) / dist, at::zeros_like(dist));
          ga.narrow(1, h * dh, dh).copy_(dfh * w);
        }
        gb = ga.neg();
        break;
      }
      case KernelKind::Rbf: {
        const at::Tensor diff = ai - bj;
        const at::Tensor kv = diff.square().sum(1, true).mul_(-p.gamma).exp_();
        ga = diff.mul(gg.mul(kv).mul_(-2.0 * p.gamma));
        gb = ga.neg();
        break;
      }
    }
    grad_a.index_add_(0, rr, ga);
    grad_b.index_add_(0, cc, gb);
  }
  return {grad_a, grad_b};
}

at::Tensor call_sddmm_csr(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrk::sddmm_csr", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         std::optional<at::ScalarType>)>();
  return op.call(dy, x, crow, col, std::nullopt);
}

at::Tensor call_sddmm_block(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& idx, int64_t b) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrk::sddmm_block", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                         std::optional<at::ScalarType>)>();
  return op.call(dy, x, idx, b, std::nullopt);
}

void check_x_weight(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& lora_a, const SnellDims& d) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected a tensor of shape [..., in_features], got a 0-D tensor");
  check_float_tensor(weight, "weight");
  check_same_dtype(weight, "weight", x, "x");
  check_same_device(weight, "weight", x, "x");
  check_same_dtype(lora_a, "lora_a", x, "x");
  check_same_device(lora_a, "lora_a", x, "x");
  check_dim(weight, "weight", 2);
  check_size(weight, "weight", 1, x.size(-1), "in_features = x.shape[-1]");
  check_size(weight, "weight", 0, d.N, "out_features = lora_a.shape[0]");
  check_size(weight, "weight", 1, d.K, "in_features = lora_b.shape[0]");
  if (bias.has_value() && bias->defined()) {
    check_float_tensor(*bias, "bias");
    check_same_dtype(*bias, "bias", x, "x");
    check_same_device(*bias, "bias", x, "x");
    check_dim(*bias, "bias", 1);
    check_size(*bias, "bias", 0, d.N, "out_features = weight.shape[0]");
  }
}

// The sparse delta [N, K] (float32; float64 for float64 factors): for merging and export.
at::Tensor snell_delta(const at::Tensor& lora_a, const at::Tensor& lora_b, c10::string_view kernel, double sparsity,
                       int64_t block_size, at::ArrayRef<double> head_coeffs, double gamma, double scale) {
  const SnellParams p = make_params(kernel, sparsity, block_size, head_coeffs, gamma, scale);
  check_factors(lora_a, lora_b, p, kernel);
  const at::Tensor kmat = kernel_matrix(lora_a, lora_b, p, /*inplace=*/false);
  const at::Tensor mask = competition_mask(kmat.detach(), p);
  return kmat * (p.block_size == 0 ? mask : expand_block_mask(mask, p.block_size, kmat.size(0), kmat.size(1)));
}

// W + Delta in weight's dtype (one rounding); consumes kmat.
at::Tensor merged_weight(const at::Tensor& weight, at::Tensor& kmat, const at::Tensor& mask, const SnellParams& p) {
  return sparsify_(kmat, mask, p).add_(weight).to(weight.scalar_type());
}

at::Tensor snell_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& lora_a, const at::Tensor& lora_b, c10::string_view kernel, double sparsity,
                        int64_t block_size, at::ArrayRef<double> head_coeffs, double gamma, double scale) {
  const SnellParams p = make_params(kernel, sparsity, block_size, head_coeffs, gamma, scale);
  const SnellDims d = check_factors(lora_a, lora_b, p, kernel);
  check_x_weight(x, weight, bias, lora_a, d);
  at::Tensor kmat = kernel_matrix(lora_a, lora_b, p);
  const at::Tensor mask = competition_mask(kmat, p);
  return at::linear(x, merged_weight(weight, kmat, mask, p), bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> snell_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, c10::string_view kernel, double sparsity, int64_t block_size,
    at::ArrayRef<double> head_coeffs, double gamma, double scale, bool need_grad_x) {
  const SnellParams p = make_params(kernel, sparsity, block_size, head_coeffs, gamma, scale);
  const SnellDims d = check_factors(lora_a, lora_b, p, kernel);
  check_x_weight(x, weight, std::nullopt, lora_a, d);
  check_float_tensor(grad_y, "grad_y");
  check_same_dtype(grad_y, "grad_y", x, "x");
  check_same_device(grad_y, "grad_y", x, "x");
  const int64_t M = x.numel() / std::max<int64_t>(d.K, 1);
  check_leading_dims_like(grad_y, "grad_y", x, d.N);
  const auto acc = acc_dtype(lora_a);
  const at::Tensor dy = grad_y.reshape({M, d.N});
  const at::Tensor xx = x.reshape({M, d.K});
  at::Tensor kmat = kernel_matrix(lora_a, lora_b, p);  // recomputed, not stored by the forward
  const at::Tensor mask = competition_mask(kmat, p);
  const auto long_opts = lora_a.options().dtype(at::kLong);

  // Kept entries as (row, col) lists and their gradients g = (dy^T @ x)[kept].
  at::Tensor rows, cols, g;
  if (p.block_size == 0) {
    const int64_t k = keep_count(kmat.numel(), p.sparsity);
    const at::Tensor coords = at::nonzero_static(mask, k, -1);  // row-major: sorted rows, exactly k
    rows = coords.select(1, 0).contiguous();
    cols = coords.select(1, 1).contiguous();
    const at::Tensor crow = at::searchsorted(rows, at::arange(d.N + 1, long_opts));
    g = call_sddmm_csr(dy, xx, crow, cols).to(acc);
  } else {
    const int64_t b = p.block_size;
    const at::Tensor bidx = at::nonzero_static(mask, keep_count(mask.numel(), p.sparsity), -1);  // [nb, 2]
    const at::Tensor gblk = call_sddmm_block(dy, xx, bidx, b).to(acc);                          // [nb, b, b]
    const at::Tensor ar = at::arange(b, long_opts);
    const at::Tensor r3 = (bidx.select(1, 0) * b).view({-1, 1, 1}) + ar.view({1, b, 1});
    const at::Tensor c3 = (bidx.select(1, 1) * b).view({-1, 1, 1}) + ar.view({1, 1, b});
    // Zero padding of edge tiles: no gradient, any in-range index.
    const at::Tensor valid = at::logical_and(r3 < d.N, c3 < d.K);
    g = at::where(valid, gblk, at::zeros({}, gblk.options())).reshape({-1});
    rows = at::where(valid, r3, at::zeros({}, long_opts)).expand({-1, b, b}).reshape({-1});
    cols = at::where(valid, c3, at::zeros({}, long_opts)).expand({-1, b, b}).reshape({-1});
  }
  auto [ga, gb] = kernel_grads(lora_a.to(acc), lora_b.to(acc), rows, cols, g, p);
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_grad_x) grad_x = at::mm(dy, merged_weight(weight, kmat, mask, p)).view(x.sizes());
  return {grad_x, ga.to(lora_a.scalar_type()), gb.to(lora_b.scalar_type())};
}

}  // namespace

// snell_delta decomposes into differentiable ATen ops (the mask is a constant), so
// autograd and torch.compile trace through it.
TORCH_LIBRARY_IMPL(lrk, CompositeImplicitAutograd, m) { m.impl("snell_delta", &snell_delta); }

TORCH_LIBRARY_IMPL(lrk, CompositeExplicitAutograd, m) {
  m.impl("snell_linear", &snell_linear);
  m.impl("snell_linear_bwd", &snell_linear_bwd);
}

}  // namespace lrk
