// Kronecker-product SVD (Van Loan-Pitsianis, ops.md section 5).
//
// W [m1*m2, n1*n2] is rearranged into R [m1*n1, m2*n2] with
//   R[i1*n1 + j1, i2*n2 + j2] = W[i1*m2 + i2, j1*n2 + j2],
// which maps sum_t sigma_t (U_t ⊗ V_t) to sum_t sigma_t vec(U_t) vec(V_t)^T and
// keeps the Frobenius norm; the truncated SVD of R is therefore the best sum of
// `rank` Kronecker products. The SVD is exact (LAPACK / cuSOLVER) or randomized:
// a range finder seeded on the CPU (identical draws on every device), power
// iterations, then a small SVD (common/randomized_svd.h).
// Composed of ATen ops, so one implementation serves every device.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <string_view>

#include "common/checks.h"
#include "common/randomized_svd.h"

namespace lrk {
namespace {

struct KpsvdShape {
  int64_t m1, m2, n1, n2, P, Q;  // R is [P, Q] = [m1*n1, m2*n2]
};

KpsvdShape check_kpsvd_inputs(const at::Tensor& weight, int64_t m1, int64_t m2, int64_t n1, int64_t n2,
                              int64_t rank, std::string_view method, int64_t oversample, int64_t power_iters) {
  check_float_tensor(weight, "weight");
  check_dim(weight, "weight", 2);
  TORCH_CHECK(m1 >= 1 && m2 >= 1 && n1 >= 1 && n2 >= 1, "m1, m2, n1, n2: expected factor sizes >= 1, got (", m1,
              ", ", m2, ", ", n1, ", ", n2, ")");
  TORCH_CHECK(m1 * m2 == weight.size(0), "m1, m2: expected m1 * m2 = out_features = weight.shape[0] = ",
              weight.size(0), ", got m1 * m2 = ", m1, " * ", m2, " = ", m1 * m2);
  TORCH_CHECK(n1 * n2 == weight.size(1), "n1, n2: expected n1 * n2 = in_features = weight.shape[1] = ",
              weight.size(1), ", got n1 * n2 = ", n1, " * ", n2, " = ", n1 * n2);
  const int64_t P = m1 * n1, Q = m2 * n2;
  TORCH_CHECK(rank >= 1 && rank <= std::min(P, Q), "rank: expected 1 <= rank <= min(m1 * n1, m2 * n2) = ",
              std::min(P, Q), ", got ", rank);
  TORCH_CHECK(method == "auto" || method == "exact" || method == "randomized",
              "method: expected \"auto\", \"exact\" or \"randomized\", got \"", method, "\"");
  TORCH_CHECK(oversample >= 0, "oversample: expected a count >= 0, got ", oversample);
  TORCH_CHECK(power_iters >= 0, "power_iters: expected a count >= 0, got ", power_iters);
  return KpsvdShape{m1, m2, n1, n2, P, Q};
}

// R(W) [m1*n1, m2*n2] in dtype acc (one copy of W).
at::Tensor rearrange(const at::Tensor& weight, const KpsvdShape& s, at::ScalarType acc) {
  return weight.to(acc).reshape({s.m1, s.m2, s.n1, s.n2}).permute({0, 2, 1, 3}).reshape({s.P, s.Q});
}

// Returns (U [P, rank], S [rank], Vh [rank, Q]); the sketch is drawn on the CPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor> kpsvd_randomized(const at::Tensor& R, int64_t rank, int64_t oversample,
                                                                int64_t power_iters, int64_t seed) {
  const int64_t l = std::min(rank + oversample, std::min(R.size(0), R.size(1)));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  const at::Tensor omega = at::randn({R.size(1), l}, gen, at::TensorOptions().dtype(at::kDouble)).to(R.options());
  return randomized_svd(R, omega, rank, power_iters);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kpsvd(const at::Tensor& weight, int64_t m1, int64_t m2, int64_t n1,
                                                     int64_t n2, int64_t rank, c10::string_view method,
                                                     int64_t oversample, int64_t power_iters, int64_t seed) {
  const std::string_view how(method.data(), method.size());
  const KpsvdShape s = check_kpsvd_inputs(weight, m1, m2, n1, n2, rank, how, oversample, power_iters);
  const auto acc = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor R = rearrange(weight, s, acc);
  const int64_t small = std::min(s.P, s.Q);
  // A full SVD is cheap below a few hundred and pointless to avoid when the
  // sketch would be a large fraction of the matrix anyway.
  const bool exact = how == "exact" || (how == "auto" && (small <= 512 || 4 * (rank + oversample) > small));
  at::Tensor u, sv, vh;
  if (exact) {
    auto [uf, sf, vhf] = at::linalg_svd(R, /*full_matrices=*/false);
    u = uf.narrow(1, 0, rank);
    sv = sf.narrow(0, 0, rank);
    vh = vhf.narrow(0, 0, rank);
  } else {
    std::tie(u, sv, vh) = kpsvd_randomized(R, rank, oversample, power_iters, seed);
  }
  // Deterministic signs: the entry of largest magnitude of every u_t is positive.
  const at::Tensor pivot = u.gather(0, u.abs().argmax(0, /*keepdim=*/true));  // [1, rank]
  const at::Tensor sign = at::where(pivot < 0, -1.0, 1.0).to(u.scalar_type());
  u = u * sign;
  vh = vh * sign.t();
  return {sv.contiguous(), u.t().reshape({rank, s.m1, s.n1}).contiguous(),
          vh.reshape({rank, s.m2, s.n2}).contiguous()};
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CompositeExplicitAutograd, m) { m.impl("kpsvd", &kpsvd); }

}  // namespace lrk
