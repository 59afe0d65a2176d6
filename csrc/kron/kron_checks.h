#pragma once
// Argument validation for the Kronecker-adapter ops (ops.md section 5), shared by
// the CPU and CUDA kernels. Shapes: x [..., n1*n2], u [k, m1, n1], v [k, m2, n2],
// sigma [k], weight [m1*m2, n1*n2], bias [m1*m2].
#include <optional>
#include <vector>

#include "common/checks.h"

namespace lrk {

struct KronDims {
  int64_t M;   // rows of x after flattening its leading dims
  int64_t K;   // in features = n1 * n2
  int64_t N;   // out features = m1 * m2
  int64_t k;   // number of Kronecker terms
  int64_t m1, n1, m2, n2;
};

inline bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_like_x(const at::Tensor& t, std::string_view name, const at::Tensor& x) {
  check_float_tensor(t, name);
  check_same_dtype(t, name, x, "x");
  check_same_device(t, name, x, "x");
}

inline KronDims check_kron_inputs(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v,
                                  const std::optional<at::Tensor>& sigma, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& bias, double scale) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected a tensor of shape [..., in_features], got a 0-D tensor");
  check_like_x(u, "u", x);
  check_like_x(v, "v", x);
  check_dim(u, "u", 3);
  check_dim(v, "v", 3);
  const int64_t k = u.size(0);
  TORCH_CHECK(k >= 1, "u: expected at least one Kronecker term (dim 0 of shape [terms, m1, n1]), got shape ",
              u.sizes());
  check_size(v, "v", 0, k, "number of terms = u.shape[0]");
  const int64_t m1 = u.size(1), n1 = u.size(2), m2 = v.size(1), n2 = v.size(2);
  TORCH_CHECK(m1 >= 1 && n1 >= 1, "u: expected factors [terms, m1, n1] with m1, n1 >= 1, got shape ", u.sizes());
  TORCH_CHECK(m2 >= 1 && n2 >= 1, "v: expected factors [terms, m2, n2] with m2, n2 >= 1, got shape ", v.sizes());
  const int64_t K = n1 * n2, N = m1 * m2;
  TORCH_CHECK(x.size(-1) == K, "x: expected in_features = u.shape[2] * v.shape[2] = ", n1, " * ", n2, " = ", K,
              " in the last dim, got shape ", x.sizes());
  if (has_tensor(sigma)) {
    check_like_x(*sigma, "sigma", x);
    check_dim(*sigma, "sigma", 1);
    check_size(*sigma, "sigma", 0, k, "number of terms = u.shape[0]");
  }
  if (has_tensor(weight)) {
    check_like_x(*weight, "weight", x);
    check_dim(*weight, "weight", 2);
    TORCH_CHECK(weight->size(0) == N, "weight: expected out_features = u.shape[1] * v.shape[1] = ", m1, " * ", m2,
                " = ", N, " in dim 0, got shape ", weight->sizes());
    check_size(*weight, "weight", 1, K, "in_features = x.shape[-1]");
  }
  if (has_tensor(bias)) {
    check_like_x(*bias, "bias", x);
    check_dim(*bias, "bias", 1);
    TORCH_CHECK(bias->size(0) == N, "bias: expected out_features = u.shape[1] * v.shape[1] = ", m1, " * ", m2,
                " = ", N, " in dim 0, got shape ", bias->sizes());
  }
  check_finite(scale, "scale");
  return KronDims{x.numel() / K, K, N, k, m1, n1, m2, n2};
}

inline KronDims check_kron_bwd_inputs(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
                                      const at::Tensor& v, const std::optional<at::Tensor>& sigma,
                                      const std::optional<at::Tensor>& weight, double scale) {
  const KronDims d = check_kron_inputs(x, u, v, sigma, weight, std::nullopt, scale);
  check_like_x(grad_y, "grad_y", x);
  check_leading_dims_like(grad_y, "grad_y", x, d.N);
  return d;
}

}  // namespace lrk
