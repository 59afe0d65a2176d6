// Randomized truncated SVD (see randomized_svd.h). Every step is a GEMM with a
// in it or a small dense factorization, so it is composed of ATen ops.
#include "common/randomized_svd.h"

namespace lrk {
namespace {

// Reduced QR of a tall-skinny a [n, l] (n >= l): Cholesky-QR twice, in float64.
// Each pass is two GEMMs (the l x l Gram matrix, then q times the inverse of
// its l x l Cholesky factor) and two l x l factorizations: a handful of GPU
// kernels, where Householder QR walks the columns one panel at a time (about a
// millisecond per call for a [4096, 36] block on a GPU, and the range finder
// needs 2 * power_iters + 2 of them). The second pass restores orthogonality to
// float64 precision while a's condition number stays below about 1e8; when the
// Cholesky factorization fails (numerically dependent columns, NaN) or the first
// pass's q is far from orthonormal (a beyond that bound), Householder QR takes
// over. One host sync per pass reads the factorization's
// status.
std::tuple<at::Tensor, at::Tensor> tall_skinny_qr(const at::Tensor& a) {
  at::Tensor q = a.to(at::kDouble);
  at::Tensor r;
  for (int pass = 0; pass < 2; ++pass) {
    const at::Tensor gram = at::mm(q.t(), q);
    auto [chol, info] = at::linalg_cholesky_ex(gram);
    at::Tensor failed = info != 0;
    if (pass == 1) {
      // The Cholesky factorization can succeed on a Gram matrix far beyond the
      // 1e8 bound (its pivots stay positive by rounding), and then the second
      // pass does not restore orthogonality (1e-4 seen at condition 1e14). The
      // first pass left q well conditioned if its Gram matrix is near I.
      const at::Tensor eye = at::eye(gram.size(0), gram.options());
      failed = failed.logical_or(at::linalg_matrix_norm(gram - eye, "fro") > 0.5);
    }
    if (failed.item<bool>()) return at::linalg_qr(a, "reduced");
    const at::Tensor upper = chol.t();  // q = q_next @ upper
    q = at::mm(q, at::linalg_solve_triangular(upper, at::eye(upper.size(0), upper.options()), /*upper=*/true));
    r = pass == 0 ? upper : at::mm(upper, r);  // a = q_2 (L_2^T L_1^T)
  }
  return {q.to(a.scalar_type()), r.to(a.scalar_type())};
}

at::Tensor orthonormal_basis(const at::Tensor& a) { return std::get<0>(tall_skinny_qr(a)); }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd(const at::Tensor& a, const at::Tensor& omega,
                                                              int64_t rank, int64_t power_iters) {
  at::Tensor basis = orthonormal_basis(at::mm(a, omega));  // [n, l], range of a
  for (int64_t i = 0; i < power_iters; ++i) {
    // (a a^T)^i a omega, re-orthonormalised after every product so that small
    // singular directions are not lost to rounding.
    const at::Tensor row_basis = orthonormal_basis(at::mm(a.t(), basis));  // [m, l]
    basis = orthonormal_basis(at::mm(a, row_basis));
  }
  // a ~= basis @ b with b = basis^T a [l, m]. SVD of b through b^T = qb rb:
  // b = rb^T qb^T, so only the l x l matrix rb^T needs an SVD.
  const at::Tensor bt = at::mm(a.t(), basis);  // [m, l]
  auto [qb, rb] = tall_skinny_qr(bt);
  auto [us, s, vsh] = at::linalg_svd(rb.t(), /*full_matrices=*/false);
  const at::Tensor u = at::mm(basis, us.narrow(1, 0, rank));
  const at::Tensor vh = at::mm(vsh.narrow(0, 0, rank), qb.t());
  return {u, s.narrow(0, 0, rank), vh};
}

}  // namespace lrk
