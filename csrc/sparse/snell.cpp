// SNELL / SNELLA (ops.md section 4): a sparse delta merged from low-rank factors
// through a kernel function, with competition-based sparsification:
//   Kmat[i, j] = scale * kappa(a_i, b_j),  a_i = lora_a[i] (out side), b_j = lora_b[j] (in side)
//     linear            a_i . b_j
//     piecewise_linear  sum_h c_h ||a_i^h - b_j^h||_2   (heads: equal slices of the rank;
//                       SNELL's released code, c_h = 0.1 * (-1)^h by default, frozen)
//     rbf               exp(-gamma ||a_i - b_j||^2)
//   Delta = Kmat * mask, mask = the largest (1 - sparsity) fraction of |Kmat| (element
//   competition, exact count through the radix select) or of the b x b tiles by norm
//   (block competition);  y = x @ (W + Delta)^T + bias.
// SNELL's ops take the kernel scalars (scale, gamma, c_h) as float arguments; SNELLA's
// take them as a tensor, kernel_params, and return their gradient too:
//     linear [scale],  piecewise_linear [c_0 .. c_{H-1}] (scale 1),  rbf [scale, gamma].
// Nothing dense outlives a call: backward recomputes Kmat and the mask from lora_a,
// lora_b (and the scalars; no index or matrix is stored), takes the masked gradient
// with the SDDMM, then applies the chain rule through kappa per kept entry
// (O(nnz * r)): to the factors, and for SNELLA to the scalars (the mask is a constant,
// as in SNELL's straight-through competition).
// Compositions of ATen and lrk ops: one CompositeExplicitAutograd implementation.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "sparse/sparse_checks.h"

namespace lrk {
namespace {

enum class KernelKind { Linear, PiecewiseLinear, Rbf };

// A kernel scalar: a constant (SNELL's float arguments) or a 0-D tensor (SNELLA's
// learnable scalars, on the factors' device, so reading them never synchronises).
struct KScalar {
  double value = 1.0;
  at::Tensor t;  // defined: the scalar is this tensor and `value` is unused
};

at::Tensor times(const at::Tensor& x, const KScalar& s) { return s.t.defined() ? x * s.t : x * s.value; }
at::Tensor& times_(at::Tensor& x, const KScalar& s) { return s.t.defined() ? x.mul_(s.t) : x.mul_(s.value); }

// a * b, a constant when both are (one rounding, as before SNELLA existed).
KScalar product(const KScalar& a, const KScalar& b) {
  if (!a.t.defined() && !b.t.defined()) return KScalar{a.value * b.value, {}};
  if (!a.t.defined()) return KScalar{1.0, b.t * a.value};
  if (!b.t.defined()) return KScalar{1.0, a.t * b.value};
  return KScalar{1.0, a.t * b.t};
}

struct SnellParams {
  KernelKind kind;
  std::vector<KScalar> coeffs;  // piecewise_linear: one per head
  KScalar gamma;
  KScalar scale;
  double sparsity;
  int64_t block_size;  // 0: element competition
  const char* coeffs_name;  // the argument that holds the head coefficients, for messages
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

void check_constant(const KScalar& s, const char* name) {
  if (!s.t.defined()) check_finite(s.value, name);
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
    TORCH_CHECK(H >= 1, p.coeffs_name, ": kernel 'piecewise_linear' needs one coefficient per head, got none");
    TORCH_CHECK(r % H == 0, p.coeffs_name, ": the rank ", r, " must be divisible by the number of heads ", H);
    for (const KScalar& c : p.coeffs) check_constant(c, p.coeffs_name);
  } else {
    TORCH_CHECK(p.coeffs.empty(), p.coeffs_name, ": only kernel 'piecewise_linear' uses head coefficients, got ",
                p.coeffs.size(), " for kernel '", kernel, "'");
  }
  check_constant(p.gamma, "gamma");
  if (p.kind == KernelKind::Rbf && !p.gamma.t.defined()) {
    TORCH_CHECK(p.gamma.value > 0, "gamma: expected a positive number, got ", p.gamma.value);
  }
  check_constant(p.scale, "scale");
  check_sparsity(p.sparsity);
  if (p.block_size != 0) check_block_size(p.block_size);
  return SnellDims{lora_a.size(0), lora_b.size(0), r};
}

SnellParams make_params(c10::string_view kernel, double sparsity, int64_t block_size, at::ArrayRef<double> coeffs,
                        double gamma, double scale) {
  std::vector<KScalar> cs;
  for (double c : coeffs) cs.push_back(KScalar{c, {}});
  return SnellParams{parse_kernel(kernel), std::move(cs), KScalar{gamma, {}}, KScalar{scale, {}},
                     sparsity, block_size, "head_coeffs"};
}

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// SNELLA: the kernel scalars from kernel_params (1-D, on lora_a's device), as 0-D
// tensors of the accumulation dtype (differentiable slices: snella_delta traces them).
SnellParams make_learnable_params(c10::string_view kernel, double sparsity, int64_t block_size,
                                  const at::Tensor& kernel_params, const at::Tensor& lora_a) {
  const KernelKind kind = parse_kernel(kernel);
  check_float_tensor(kernel_params, "kernel_params");
  check_same_device(kernel_params, "kernel_params", lora_a, "lora_a");
  check_dim(kernel_params, "kernel_params", 1);
  const int64_t n = kernel_params.size(0);
  const at::Tensor k = kernel_params.to(acc_dtype(lora_a));
  SnellParams p{kind, {}, KScalar{1.0, {}}, KScalar{1.0, {}}, sparsity, block_size, "kernel_params"};
  switch (kind) {
    case KernelKind::Linear:
      TORCH_CHECK(n == 1, "kernel_params: expected shape [1] ([scale]) for kernel 'linear', got ",
                  kernel_params.sizes());
      p.scale.t = k.select(0, 0);
      break;
    case KernelKind::PiecewiseLinear:
      TORCH_CHECK(n >= 1, "kernel_params: kernel 'piecewise_linear' needs one coefficient per head, got shape ",
                  kernel_params.sizes());
      for (int64_t h = 0; h < n; ++h) p.coeffs.push_back(KScalar{1.0, k.select(0, h)});
      break;
    case KernelKind::Rbf:
      TORCH_CHECK(n == 2, "kernel_params: expected shape [2] ([scale, gamma]) for kernel 'rbf', got ",
                  kernel_params.sizes());
      p.scale.t = k.select(0, 0);
      p.gamma.t = k.select(0, 1);
      break;
  }
  return p;
}

// Values of kernel_params, checked where that costs no device synchronisation (CPU
// tensors; the explicit-autograd ops only, which never see fake tensors).
void check_learnable_values(const at::Tensor& kernel_params, KernelKind kind) {
  if (!kernel_params.device().is_cpu()) return;
  const at::Tensor v = kernel_params.detach().to(at::kDouble).contiguous();
  const double* p = v.const_data_ptr<double>();
  for (int64_t i = 0; i < v.numel(); ++i) {
    TORCH_CHECK(std::isfinite(p[i]), "kernel_params: expected finite values, got ", p[i], " at index ", i);
  }
  if (kind == KernelKind::Rbf) {
    TORCH_CHECK(p[1] > 0, "kernel_params: gamma (index 1) of kernel 'rbf' must be positive, got ", p[1]);
  }
}

// ||a_i - b_j||^2 for all pairs, through one GEMM (clamped: rounding can go below 0).
// inplace: reuse buffers (the explicit-autograd ops); else out-of-place ops that
// autograd can differentiate (snell_delta, snella_delta).
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
    case KernelKind::Linear: {
      at::Tensor dot = at::mm(a, b.t());
      return inplace ? times_(dot, p.scale) : times(dot, p.scale);
    }
    case KernelKind::PiecewiseLinear: {
      const int64_t H = static_cast<int64_t>(p.coeffs.size()), dh = a.size(1) / H;
      at::Tensor out;
      for (int64_t h = 0; h < H; ++h) {
        at::Tensor d2 = sq_distances(a.narrow(1, h * dh, dh), b.narrow(1, h * dh, dh), inplace);
        const KScalar c = product(p.coeffs[h], p.scale);
        at::Tensor term = inplace ? times_(d2.sqrt_(), c) : times(d2.sqrt(), c);
        out = h == 0 ? term : (inplace ? out.add_(term) : out + term);
      }
      return out;
    }
    case KernelKind::Rbf: {
      at::Tensor d2 = sq_distances(a, b, inplace);
      if (inplace) {
        times_(d2, p.gamma).neg_().exp_();
        return times_(d2, p.scale);
      }
      return times(times(d2, p.gamma).neg().exp(), p.scale);
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

// Gradients of the loss through kappa: the factors, and (SNELLA) the kernel scalars.
struct KernelGrads {
  at::Tensor a, b;
  at::Tensor scale, gamma, coeffs;  // 0-D, 0-D, [H]; defined when scalar grads were asked for
};

// Chain rule through kappa at the kept entries (g = dL/dKmat there): grad_a[i] +=
// g_ij dKmat/da_i, grad_b[j] += g_ij dKmat/db_j and, with scalar_grads, the sums of
// g_ij dKmat_ij/dscale, /dgamma, /dc_h; in chunks of entries (memory O(chunk * r)).
KernelGrads kernel_grads(const at::Tensor& a, const at::Tensor& b, const at::Tensor& rows, const at::Tensor& cols,
                         const at::Tensor& g, const SnellParams& p, bool scalar_grads) {
  KernelGrads out{at::zeros_like(a), at::zeros_like(b), {}, {}, {}};
  const int64_t H = static_cast<int64_t>(p.coeffs.size());
  if (scalar_grads) {
    out.scale = at::zeros({}, a.options());
    out.gamma = at::zeros({}, a.options());
    out.coeffs = at::zeros({H}, a.options());
  }
  const int64_t nnz = rows.numel(), r = a.size(1);
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 22) / r);
  for (int64_t c0 = 0; c0 < nnz; c0 += chunk) {
    const int64_t c = std::min(chunk, nnz - c0);
    const at::Tensor rr = rows.narrow(0, c0, c), cc = cols.narrow(0, c0, c);
    const at::Tensor graw = g.narrow(0, c0, c).unsqueeze(1);  // [c, 1], dL/dKmat
    const at::Tensor gg = times(graw, p.scale);               // dL/dkappa
    const at::Tensor ai = a.index_select(0, rr), bj = b.index_select(0, cc);
    at::Tensor ga, gb;
    switch (p.kind) {
      case KernelKind::Linear:
        ga = bj.mul(gg);
        gb = ai.mul(gg);
        if (scalar_grads) out.scale.add_(graw.squeeze(1).dot(ai.mul(bj).sum(1)));
        break;
      case KernelKind::PiecewiseLinear: {
        const int64_t dh = r / H;
        const at::Tensor diff = ai - bj;
        ga = at::empty_like(diff);
        for (int64_t h = 0; h < H; ++h) {
          const at::Tensor dfh = diff.narrow(1, h * dh, dh);
          const at::Tensor dist = at::linalg_vector_norm(dfh, 2, {1}, true);  // [c, 1]
          // d||u||/du = u / ||u||; at u = 0 the subgradient 0 (as torch.cdist's backward).
          const at::Tensor w = at::where(dist > 0, times(gg, p.coeffs[h]) / dist, at::zeros_like(dist));
          ga.narrow(1, h * dh, dh).copy_(dfh * w);
          if (scalar_grads) {
            const at::Tensor gd = graw.mul(dist).sum();  // sum g_ij d_h(i, j)
            out.coeffs.select(0, h).add_(times(gd, p.scale));
            out.scale.add_(times(gd, p.coeffs[h]));
          }
        }
        gb = ga.neg();
        break;
      }
      case KernelKind::Rbf: {
        const at::Tensor diff = ai - bj;
        const at::Tensor d2 = diff.square().sum(1, true);
        at::Tensor kv = times(d2, p.gamma);
        kv.neg_().exp_();                                   // exp(-gamma d2)
        const at::Tensor ggk = gg.mul(kv);                  // dL/d(d2) = -gamma * ggk
        at::Tensor coef = times(ggk, p.gamma);
        ga = diff.mul(coef.mul_(-2.0));
        gb = ga.neg();
        if (scalar_grads) {
          out.scale.add_(graw.mul(kv).sum());
          out.gamma.sub_(ggk.mul(d2).sum());
        }
        break;
      }
    }
    out.a.index_add_(0, rr, ga);
    out.b.index_add_(0, cc, gb);
  }
  return out;
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

// Kmat * mask through differentiable out-of-place ops (the mask is a constant).
at::Tensor delta_composite(const at::Tensor& lora_a, const at::Tensor& lora_b, const SnellParams& p) {
  const at::Tensor kmat = kernel_matrix(lora_a, lora_b, p, /*inplace=*/false);
  const at::Tensor mask = competition_mask(kmat.detach(), p);
  return kmat * (p.block_size == 0 ? mask : expand_block_mask(mask, p.block_size, kmat.size(0), kmat.size(1)));
}

// The sparse delta [N, K] (float32; float64 for float64 factors): for merging and export.
at::Tensor snell_delta(const at::Tensor& lora_a, const at::Tensor& lora_b, c10::string_view kernel, double sparsity,
                       int64_t block_size, at::ArrayRef<double> head_coeffs, double gamma, double scale) {
  const SnellParams p = make_params(kernel, sparsity, block_size, head_coeffs, gamma, scale);
  check_factors(lora_a, lora_b, p, kernel);
  return delta_composite(lora_a, lora_b, p);
}

at::Tensor snella_delta(const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& kernel_params,
                        c10::string_view kernel, double sparsity, int64_t block_size) {
  check_float_tensor(lora_a, "lora_a");
  const SnellParams p = make_learnable_params(kernel, sparsity, block_size, kernel_params, lora_a);
  check_factors(lora_a, lora_b, p, kernel);
  return delta_composite(lora_a, lora_b, p);
}

// W + Delta in weight's dtype (one rounding); consumes kmat.
at::Tensor merged_weight(const at::Tensor& weight, at::Tensor& kmat, const at::Tensor& mask, const SnellParams& p) {
  return sparsify_(kmat, mask, p).add_(weight).to(weight.scalar_type());
}

at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& lora_a, const at::Tensor& lora_b, const SnellParams& p) {
  at::Tensor kmat = kernel_matrix(lora_a, lora_b, p);
  const at::Tensor mask = competition_mask(kmat, p);
  return at::linear(x, merged_weight(weight, kmat, mask, p), bias);
}

at::Tensor snell_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& lora_a, const at::Tensor& lora_b, c10::string_view kernel, double sparsity,
                        int64_t block_size, at::ArrayRef<double> head_coeffs, double gamma, double scale) {
  const SnellParams p = make_params(kernel, sparsity, block_size, head_coeffs, gamma, scale);
  const SnellDims d = check_factors(lora_a, lora_b, p, kernel);
  check_x_weight(x, weight, bias, lora_a, d);
  return forward_impl(x, weight, bias, lora_a, lora_b, p);
}

at::Tensor snella_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& kernel_params,
                         c10::string_view kernel, double sparsity, int64_t block_size) {
  check_float_tensor(lora_a, "lora_a");
  const SnellParams p = make_learnable_params(kernel, sparsity, block_size, kernel_params, lora_a);
  const SnellDims d = check_factors(lora_a, lora_b, p, kernel);
  check_x_weight(x, weight, bias, lora_a, d);
  check_learnable_values(kernel_params, p.kind);
  return forward_impl(x, weight, bias, lora_a, lora_b, p);
}

// Shared backward: (grad_x, gradients through kappa).
std::tuple<at::Tensor, KernelGrads> backward_impl(const at::Tensor& grad_y, const at::Tensor& x,
                                                  const at::Tensor& weight, const at::Tensor& lora_a,
                                                  const at::Tensor& lora_b, const SnellParams& p, const SnellDims& d,
                                                  bool need_grad_x, bool scalar_grads) {
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
  KernelGrads kg = kernel_grads(lora_a.to(acc), lora_b.to(acc), rows, cols, g, p, scalar_grads);
  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_grad_x) grad_x = at::mm(dy, merged_weight(weight, kmat, mask, p)).view(x.sizes());
  kg.a = kg.a.to(lora_a.scalar_type());
  kg.b = kg.b.to(lora_b.scalar_type());
  return {grad_x, std::move(kg)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> snell_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, c10::string_view kernel, double sparsity, int64_t block_size,
    at::ArrayRef<double> head_coeffs, double gamma, double scale, bool need_grad_x) {
  const SnellParams p = make_params(kernel, sparsity, block_size, head_coeffs, gamma, scale);
  const SnellDims d = check_factors(lora_a, lora_b, p, kernel);
  auto [grad_x, kg] = backward_impl(grad_y, x, weight, lora_a, lora_b, p, d, need_grad_x, false);
  return {grad_x, kg.a, kg.b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> snella_linear_bwd(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& kernel_params, c10::string_view kernel, double sparsity,
    int64_t block_size, bool need_grad_x) {
  check_float_tensor(lora_a, "lora_a");
  const SnellParams p = make_learnable_params(kernel, sparsity, block_size, kernel_params, lora_a);
  const SnellDims d = check_factors(lora_a, lora_b, p, kernel);
  check_learnable_values(kernel_params, p.kind);
  auto [grad_x, kg] = backward_impl(grad_y, x, weight, lora_a, lora_b, p, d, need_grad_x, true);
  at::Tensor grad_params;
  switch (p.kind) {
    case KernelKind::Linear: grad_params = kg.scale.reshape({1}); break;
    case KernelKind::PiecewiseLinear: grad_params = kg.coeffs; break;
    case KernelKind::Rbf: grad_params = at::stack({kg.scale, kg.gamma}); break;
  }
  return {grad_x, kg.a, kg.b, grad_params.to(kernel_params.scalar_type())};
}

}  // namespace

// snell_delta / snella_delta decompose into differentiable ATen ops (the mask is a
// constant), so autograd and torch.compile trace through them.
TORCH_LIBRARY_IMPL(lrk, CompositeImplicitAutograd, m) {
  m.impl("snell_delta", &snell_delta);
  m.impl("snella_delta", &snella_delta);
}

TORCH_LIBRARY_IMPL(lrk, CompositeExplicitAutograd, m) {
  m.impl("snell_linear", &snell_linear);
  m.impl("snell_linear_bwd", &snell_linear_bwd);
  m.impl("snella_linear", &snella_linear);
  m.impl("snella_linear_bwd", &snella_linear_bwd);
}

}  // namespace lrk
