#pragma once
// Argument validation for the sparse-update ops (ops.md section 4): SDDMM, selection,
// SaRA and SNELL. Shared by the CPU, CUDA and composite kernels.
#include <optional>

#include "common/checks.h"

namespace lrk {

inline void check_block_size(int64_t b) {
  TORCH_CHECK(b == 16 || b == 32 || b == 64 || b == 128, "block_size: expected one of 16, 32, 64, 128, got ", b);
}

inline void check_index_tensor(const at::Tensor& t, std::string_view name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, name,
              ": expected dtype int32 or int64, got ", t.scalar_type());
}

// Accumulation dtype of the SDDMM: float32, or float64 for float64 inputs.
inline at::ScalarType sddmm_acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

struct SddmmDims {
  int64_t M;  // rows of grad_y / x after flattening leading dims (tokens)
  int64_t N;  // grad_y.shape[-1] (out features)
  int64_t K;  // x.shape[-1] (in features)
  at::ScalarType out_dtype;
};

// grad_y [..., N] and x [..., K] with the same leading dims; out_dtype is None
// (float32, float64 for float64 inputs) or that dtype or the inputs' dtype.
inline SddmmDims check_sddmm_operands(const at::Tensor& grad_y, const at::Tensor& x,
                                      std::optional<at::ScalarType> out_dtype) {
  check_float_tensor(grad_y, "grad_y");
  check_float_tensor(x, "x");
  check_same_dtype(x, "x", grad_y, "grad_y");
  check_same_device(x, "x", grad_y, "grad_y");
  TORCH_CHECK(grad_y.dim() >= 1, "grad_y: expected a tensor of shape [..., out_features], got a 0-D tensor");
  TORCH_CHECK(x.dim() == grad_y.dim() && x.sizes().slice(0, x.dim() - 1) == grad_y.sizes().slice(0, grad_y.dim() - 1),
              "x: expected the leading dims of grad_y ", grad_y.sizes(), " and shape [..., in_features], got ",
              x.sizes());
  const int64_t N = grad_y.size(-1), K = x.size(-1);
  const int64_t M = N > 0 ? grad_y.numel() / N : (K > 0 ? x.numel() / K : 0);
  const at::ScalarType acc = sddmm_acc_dtype(grad_y.scalar_type());
  const at::ScalarType od = out_dtype.value_or(acc);
  TORCH_CHECK(od == acc || od == grad_y.scalar_type(), "out_dtype: expected ", acc, " or ", grad_y.scalar_type(),
              " (the dtype of grad_y), got ", od);
  return SddmmDims{M, N, K, od};
}

// block_indices [n_blocks, 2] int32/int64 of (block_row, block_col).
inline int64_t check_block_indices_shape(const at::Tensor& block_indices, const at::Tensor& ref,
                                         std::string_view ref_name = "grad_y") {
  check_index_tensor(block_indices, "block_indices");
  check_same_device(block_indices, "block_indices", ref, ref_name);
  TORCH_CHECK(block_indices.dim() == 2 && block_indices.size(1) == 2,
              "block_indices: expected shape [n_blocks, 2] of (block_row, block_col), got ", block_indices.sizes());
  return block_indices.size(0);
}

// Host-side range check of block coordinates (CPU tensors only: on CUDA it would
// cost a device synchronisation; the CUDA kernels write NaN for such blocks instead).
inline void check_block_indices_values(const at::Tensor& idx_long, int64_t n_block_rows, int64_t n_block_cols) {
  const int64_t* p = idx_long.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < idx_long.size(0); ++i) {
    TORCH_CHECK(p[2 * i] >= 0 && p[2 * i] < n_block_rows && p[2 * i + 1] >= 0 && p[2 * i + 1] < n_block_cols,
                "block_indices: entry ", i, " = (", p[2 * i], ", ", p[2 * i + 1], ") is outside the ", n_block_rows,
                " x ", n_block_cols, " grid of blocks");
  }
}

// CSR pattern: crow_indices [N + 1], col_indices [nnz], same integer dtype.
inline int64_t check_csr_shape(const at::Tensor& crow, const at::Tensor& col, int64_t N, const at::Tensor& ref,
                               std::string_view ref_name = "grad_y") {
  check_index_tensor(crow, "crow_indices");
  check_index_tensor(col, "col_indices");
  TORCH_CHECK(col.scalar_type() == crow.scalar_type(), "col_indices: expected dtype ", crow.scalar_type(),
              " (the dtype of crow_indices), got ", col.scalar_type());
  check_same_device(crow, "crow_indices", ref, ref_name);
  check_same_device(col, "col_indices", ref, ref_name);
  TORCH_CHECK(crow.dim() == 1 && crow.size(0) == N + 1, "crow_indices: expected shape [", N + 1,
              "] (out_features + 1), got ", crow.sizes());
  check_dim(col, "col_indices", 1);
  return col.size(0);
}

// Host-side validation of a CSR pattern held in int64 CPU tensors.
inline void check_csr_values(const at::Tensor& crow_long, const at::Tensor& col_long, int64_t K) {
  const int64_t N = crow_long.size(0) - 1, nnz = col_long.size(0);
  const int64_t* rp = crow_long.const_data_ptr<int64_t>();
  const int64_t* cp = col_long.const_data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0, "crow_indices: expected crow_indices[0] == 0, got ", rp[0]);
  TORCH_CHECK(rp[N] == nnz, "crow_indices: expected crow_indices[-1] == nnz = col_indices.numel() = ", nnz, ", got ",
              rp[N]);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(rp[n + 1] >= rp[n], "crow_indices: expected a non-decreasing sequence, got crow_indices[", n,
                "] = ", rp[n], " > crow_indices[", n + 1, "] = ", rp[n + 1]);
  }
  for (int64_t j = 0; j < nnz; ++j) {
    TORCH_CHECK(cp[j] >= 0 && cp[j] < K, "col_indices: entry ", j, " = ", cp[j], " is outside [0, ", K,
                ") (in_features = x.shape[-1])");
  }
}

inline void check_sparsity(double s) {
  TORCH_CHECK(std::isfinite(s) && s >= 0.0 && s < 1.0, "sparsity: expected a value in [0, 1), got ", s);
}

// Number of kept entries for a keep ratio (1 - sparsity) of `total`: rounded, and
// at least one when there is anything to keep (sparsity < 1 always keeps something).
inline int64_t keep_count(int64_t total, double sparsity) {
  const double k = std::round((1.0 - sparsity) * static_cast<double>(total));
  return std::clamp<int64_t>(static_cast<int64_t>(k), std::min<int64_t>(total, 1), total);
}

}  // namespace lrk
