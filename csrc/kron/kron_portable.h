#pragma once
// The Kronecker adapter as two dense products per row of x, for any device
// (ATen GEMMs: MKL/OpenBLAS on the CPU, cuBLAS on CUDA). With X_m = x[m].view(n1, n2),
//   (U_t ⊗ V_t) x[m] = vec(U_t @ X_m @ V_t^T),
// and all terms together are one GEMM plus one batched GEMM:
//   Z[m, (j1, t), i2] = sum_j2 X[m, j1, j2] V[t, i2, j2]        x.view(M*n1, n2) @ V.view(k*m2, n2)^T
//   Y[m, i1, i2]      = sum_(j1, t) Uc[i1, (j1, t)] Z[m, (j1, t), i2]   Uc = c_t U_t side by side
// The Kronecker product itself is never formed. Rows are processed in chunks so
// that Z (k*m2/n2 times the size of x) stays bounded for many terms.
#include <ATen/ATen.h>

#include "kron/kron_checks.h"

namespace lrk {

struct KronGradMask {
  bool x, u, v, sigma;
};

struct KronGrads {
  at::Tensor x, u, v, sigma;  // undefined where not requested; x is [M, K]
};

// The type in which per-term coefficients and accumulations are kept:
// float64 for float64 tensors, float32 otherwise.
inline at::ScalarType kron_acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// coef_t = scale * sigma_t (scale for every term without sigma), [k] in kron_acc_dtype(dtype).
at::Tensor kron_coefficients(const std::optional<at::Tensor>& sigma, int64_t k, double scale, at::ScalarType dtype,
                             const at::Device& device);

// y [M, N] = bias + x2 @ weight^T + sum_t coef_t (u_t ⊗ v_t) x2, row by row. x2 [M, K]
// contiguous; x2, u, v, weight, bias share one dtype (the product dtype).
at::Tensor kron_forward_portable(const at::Tensor& x2, const at::Tensor& u, const at::Tensor& v,
                                 const at::Tensor& coef, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const KronDims& d);

// Gradients of the forward above for grad_y dy2 [M, N] (contiguous):
//   dx = sum_t coef_t (u_t^T ⊗ v_t^T) dy + dy @ weight
//   du_t = coef_t sum_m dY_m V_t X_m^T,   dv_t = coef_t sum_m dY_m^T U_t X_m,
//   dsigma_t = scale * <dY, U_t X V_t^T>.
KronGrads kron_backward_portable(const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& u,
                                 const at::Tensor& v, const at::Tensor& coef, const std::optional<at::Tensor>& weight,
                                 double scale, KronGradMask mask, const KronDims& d);

}  // namespace lrk
