// Cholesky-QR twice, in float64. Each pass is one l x l Gram product, an l x l
// Cholesky factorization and a triangular solve: a handful of GPU kernels,
// where Householder QR walks the columns one panel at a time (about a
// millisecond per call for a [4096, 36] block on a GPU, and a range finder
// needs 2 * power_iters + 2 of them). The second pass restores orthogonality to
// float64 precision while a's condition number stays below about 1e8; when the
// Cholesky factorization fails (numerically dependent columns, NaN),
// Householder QR takes over. One host sync per pass reads the factorization's
// status.
#include "common/tall_skinny_qr.h"

namespace lrk {

std::tuple<at::Tensor, at::Tensor> tall_skinny_qr(const at::Tensor& a) {
  at::Tensor q = a.to(at::kDouble);
  at::Tensor r;
  for (int pass = 0; pass < 2; ++pass) {
    auto [chol, info] = at::linalg_cholesky_ex(at::mm(q.t(), q));
    if (info.item<int64_t>() != 0) return at::linalg_qr(a, "reduced");
    q = at::linalg_solve_triangular(chol.t(), q, /*upper=*/true, /*left=*/false);  // q @ chol^-T
    r = pass == 0 ? chol.t() : at::mm(chol.t(), r);  // a = q_2 (L_2^T L_1^T)
  }
  return {q.to(a.scalar_type()), r.to(a.scalar_type())};
}

}  // namespace lrk
