// Spectral adapter initialisation (PiSSA, LoRA-GA, LoRA-One, EVA): a truncated
// SVD (exact or randomized), two-sided sketches of a layer's weight gradient
// accumulated without forming it, the SVD recovered from those sketches, and a
// streaming Nystrom range finder of a layer's input covariance. Every step is a
// GEMM over the streamed data or a factorization of a small matrix, which ATen
// already runs at full speed on every device, so one composition registered as
// CompositeExplicitAutograd serves the CPU and CUDA (the random test matrices
// come from lrk::philox_normal_, identical on both).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>

#include "common/randomized_svd.h"
#include "spectral/spectral_checks.h"

namespace lrk {
namespace {

// Singular vectors are defined up to sign. Make the entry of largest magnitude
// of each row of vh positive (the first one on ties) and flip u's column with
// it: the rule of PEFT's incremental PCA (svd_flip on the right vectors), so
// that EVA's components compare with PEFT's directly.
std::tuple<at::Tensor, at::Tensor> canonical_row_signs(at::Tensor u, at::Tensor vh) {
  const at::Tensor idx = vh.abs().argmax(1, true);  // [rank, 1]
  const at::Tensor sign = at::where(vh.gather(1, idx) < 0, -1.0, 1.0).to(vh.scalar_type());
  return {u.mul(sign.t()), vh.mul(sign)};
}

void fill_gaussian(at::Tensor& out, int64_t seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrk::philox_normal_", "")
                       .typed<void(at::Tensor&, int64_t, double)>();
  op.call(out, seed, 1.0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> truncated_svd(const at::Tensor& a_in, int64_t rank,
                                                             c10::string_view method, int64_t oversample,
                                                             int64_t power_iters, int64_t seed) {
  check_nonempty_matrix(a_in, "a");
  const int64_t limit = std::min(a_in.size(0), a_in.size(1));
  check_spectral_rank(rank, limit, "min(a.shape)");
  TORCH_CHECK(method == "exact" || method == "randomized", "method: expected \"exact\" or \"randomized\", got \"",
              method, "\"");
  TORCH_CHECK(oversample >= 0, "oversample: expected an integer >= 0, got ", oversample);
  TORCH_CHECK(power_iters >= 0 && power_iters <= 64, "power_iters: expected an integer in [0, 64], got ",
              power_iters);
  const at::Tensor a = a_in.to(spectral_acc_dtype(a_in.scalar_type()));
  at::Tensor u, s, vh;
  if (method == "exact") {
    std::tie(u, s, vh) = at::linalg_svd(a, /*full_matrices=*/false);
    u = u.narrow(1, 0, rank);
    s = s.narrow(0, 0, rank);
    vh = vh.narrow(0, 0, rank);
  } else {
    const int64_t l = std::min(rank + oversample, limit);
    at::Tensor omega = at::empty({a.size(1), l}, a.options().memory_format(at::MemoryFormat::Contiguous));
    fill_gaussian(omega, seed);
    std::tie(u, s, vh) = randomized_svd(a, omega, rank, power_iters);
  }
  std::tie(u, vh) = canonical_row_signs(u, vh);
  return {u.contiguous(), s.contiguous(), vh.contiguous()};
}

// grad_out [..., N] and x [..., K] as 2-D token matrices, in the sketch's dtype.
at::Tensor tokens(const at::Tensor& t, at::ScalarType dtype) {
  return t.reshape({-1, t.size(-1)}).to(dtype);
}

void check_token_pair(const at::Tensor& grad_out, const at::Tensor& x) {
  check_float_tensor(grad_out, "grad_out");
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected a tensor [..., K], got a 0-D tensor");
  TORCH_CHECK(grad_out.dim() >= 1, "grad_out: expected a tensor [..., N], got a 0-D tensor");
  const int64_t n_tokens = x.numel() / std::max<int64_t>(x.size(-1), 1);
  TORCH_CHECK(grad_out.dim() == x.dim() && grad_out.numel() == n_tokens * grad_out.size(-1), "grad_out: expected ",
              "the leading dims of x ", x.sizes(), ", got shape ", grad_out.sizes());
  check_same_device(grad_out, "grad_out", x, "x");
}

// y [N, l1] += G @ omega and z [K, l2] += G^T @ psi for G = grad_out^T @ x, the
// weight gradient [N, K] of a linear layer on these tokens, never formed:
// G @ omega = grad_out^T @ (x @ omega), G^T @ psi = x^T @ (grad_out @ psi).
void sketch_update(at::Tensor& y, at::Tensor& z, const at::Tensor& grad_out, const at::Tensor& x,
                   const at::Tensor& omega, const at::Tensor& psi) {
  check_token_pair(grad_out, x);
  check_sketch(y, "y");
  check_sketch(z, "z");
  check_same_dtype(z, "z", y, "y");
  check_matrix(omega, "omega");
  check_matrix(psi, "psi");
  check_same_dtype(omega, "omega", y, "y");
  check_same_dtype(psi, "psi", y, "y");
  const int64_t n = grad_out.size(-1), k = x.size(-1);
  check_size(omega, "omega", 0, k, "K = x.shape[-1]");
  check_size(psi, "psi", 0, n, "N = grad_out.shape[-1]");
  check_size(y, "y", 0, n, "N = grad_out.shape[-1]");
  check_size(y, "y", 1, omega.size(1), "omega.shape[1]");
  check_size(z, "z", 0, k, "K = x.shape[-1]");
  check_size(z, "z", 1, psi.size(1), "psi.shape[1]");
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{y, "y"}, {z, "z"}, {omega, "omega"},
                                {psi, "psi"}, {grad_out, "grad_out"}})
    check_same_device(t, name, x, "x");
  const at::Tensor g2 = tokens(grad_out, y.scalar_type()), x2 = tokens(x, y.scalar_type());
  y.addmm_(g2.t(), at::mm(x2, omega));
  z.addmm_(x2.t(), at::mm(g2, psi));
}

// y [K, l] += x^T @ (x @ omega): a sketch of the input covariance X^T X [K, K]
// (unnormalised, uncentred), never formed.
void gram_sketch_update(at::Tensor& y, const at::Tensor& x, const at::Tensor& omega) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected a tensor [..., K], got a 0-D tensor");
  check_sketch(y, "y");
  check_matrix(omega, "omega");
  check_same_dtype(omega, "omega", y, "y");
  const int64_t k = x.size(-1);
  check_size(omega, "omega", 0, k, "K = x.shape[-1]");
  check_size(y, "y", 0, k, "K = x.shape[-1]");
  check_size(y, "y", 1, omega.size(1), "omega.shape[1]");
  check_same_device(y, "y", x, "x");
  check_same_device(omega, "omega", x, "x");
  const at::Tensor x2 = tokens(x, y.scalar_type());
  y.addmm_(x2.t(), at::mm(x2, omega));
}

// The truncated SVD of G from its two sketches y = G omega [N, l1] and
// z = G^T psi [K, l2] (l2 >= l1; Tropp, Yurtsever, Udell and Cevher 2017):
// Q = orth(y), G ~= Q X with X = (psi^T Q)^+ z^T [l1, K], then the SVD of X.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sketch_svd(const at::Tensor& y, const at::Tensor& z,
                                                          const at::Tensor& psi, int64_t rank) {
  check_nonempty_matrix(y, "y");
  check_nonempty_matrix(z, "z");
  check_nonempty_matrix(psi, "psi");
  check_same_dtype(z, "z", y, "y");
  check_same_dtype(psi, "psi", y, "y");
  check_same_device(z, "z", y, "y");
  check_same_device(psi, "psi", y, "y");
  check_size(psi, "psi", 0, y.size(0), "N = y.shape[0]");
  check_size(z, "z", 1, psi.size(1), "psi.shape[1]");
  TORCH_CHECK(z.size(1) >= y.size(1), "z: expected at least as many sketch columns as y (", y.size(1), "), got ",
              z.size(1));
  const int64_t limit = std::min({y.size(0), y.size(1), z.size(0)});
  check_spectral_rank(rank, limit, "min(N, K, y.shape[1])");
  const auto out_dtype = spectral_acc_dtype(y.scalar_type());
  const at::Tensor q = std::get<0>(at::linalg_qr(y.to(at::kDouble), "reduced"));  // [N, l1]
  auto [qc, rc] = at::linalg_qr(at::mm(psi.to(at::kDouble).t(), q), "reduced");   // [l2, l1], [l1, l1]
  const at::Tensor x = at::linalg_solve_triangular(rc, at::mm(qc.t(), z.to(at::kDouble).t()), /*upper=*/true);
  auto [ux, s, vh] = at::linalg_svd(x, /*full_matrices=*/false);
  at::Tensor u = at::mm(q, ux.narrow(1, 0, rank));
  at::Tensor v = vh.narrow(0, 0, rank);
  std::tie(u, v) = canonical_row_signs(u, v);
  return {u.to(out_dtype).contiguous(), s.narrow(0, 0, rank).to(out_dtype).contiguous(), v.to(out_dtype).contiguous()};
}

// Leading eigenpairs of a PSD matrix C [K, K] from y = C omega (omega [K, l] with
// orthonormal columns): the shifted Nystrom approximation of Tropp, Yurtsever,
// Udell and Cevher (2017, algorithm 3). Returns (eigenvalues [rank], descending,
// eigenvectors as rows [rank, K], the largest-magnitude entry of each positive).
std::tuple<at::Tensor, at::Tensor> nystrom_eigh(const at::Tensor& y, const at::Tensor& omega, int64_t rank) {
  check_nonempty_matrix(y, "y");
  check_nonempty_matrix(omega, "omega");
  check_same_dtype(omega, "omega", y, "y");
  check_same_device(omega, "omega", y, "y");
  TORCH_CHECK(omega.sizes() == y.sizes(), "omega: expected the shape of y ", y.sizes(), ", got ", omega.sizes());
  check_spectral_rank(rank, std::min(y.size(0), y.size(1)), "min(y.shape)");
  const auto out_dtype = spectral_acc_dtype(y.scalar_type());
  const at::Tensor yd = y.to(at::kDouble), od = omega.to(at::kDouble);
  // The shift keeps omega^T y_nu positive definite under rounding; a failed
  // Cholesky factorization (C numerically of rank < l) retries with a larger one.
  double nu = std::sqrt(static_cast<double>(y.size(0))) * std::numeric_limits<double>::epsilon() *
              at::linalg_vector_norm(yd, 2).item<double>();
  nu = std::max(nu, std::numeric_limits<double>::min());
  for (int attempt = 0; attempt < 8; ++attempt, nu *= 1e3) {
    const at::Tensor y_nu = yd + nu * od;
    at::Tensor b = at::mm(od.t(), y_nu);
    b = (b + b.t()) * 0.5;
    auto [chol, info] = at::linalg_cholesky_ex(b);
    if (info.item<int64_t>() != 0) continue;
    // F = y_nu chol^{-T}: C_nys = F F^T.
    const at::Tensor f = at::linalg_solve_triangular(chol, y_nu.t(), /*upper=*/false).t();
    auto [u, s, unused] = at::linalg_svd(f, /*full_matrices=*/false);
    const at::Tensor evals = at::clamp_min(s.narrow(0, 0, rank).square() - nu, 0.0);
    at::Tensor vecs = u.narrow(1, 0, rank).t();  // [rank, K]
    vecs = std::get<1>(canonical_row_signs(at::empty({0, rank}, vecs.options()), vecs));
    return {evals.to(out_dtype).contiguous(), vecs.to(out_dtype).contiguous()};
  }
  TORCH_CHECK(false, "y: the sketch is not that of a positive semidefinite matrix (Cholesky factorization of "
              "omega^T y failed even with a shift); was it accumulated with gram_sketch_update and this omega?");
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CompositeExplicitAutograd, m) {
  m.impl("truncated_svd", &truncated_svd);
  m.impl("sketch_update", &sketch_update);
  m.impl("gram_sketch_update", &gram_sketch_update);
  m.impl("sketch_svd", &sketch_svd);
  m.impl("nystrom_eigh", &nystrom_eigh);
}

}  // namespace lrk
