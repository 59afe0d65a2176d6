// CPU kernels of the masked-gradient SDDMM, dDelta[mask] = (grad_y^T @ x)[mask]
// (ops.md section 4): the reference that runs everywhere. Half-precision inputs are
// computed in float32 (float64 for float64 inputs); the dense [N, K] product is
// never formed.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sparse/sparse_checks.h"

namespace lrk {
namespace {

// Tokens per step of the unstructured kernel: bounds its transposed copies of
// grad_y and x to (N + K) * kTokenChunk elements however many tokens there are.
constexpr int64_t kTokenChunk = 4096;

at::Tensor sddmm_block_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& block_indices,
                           int64_t block_size, std::optional<at::ScalarType> out_dtype) {
  const SddmmDims d = check_sddmm_operands(grad_y, x, out_dtype);
  check_block_size(block_size);
  const int64_t nb = check_block_indices_shape(block_indices, grad_y);
  const int64_t b = block_size;
  const int64_t n_block_rows = (d.N + b - 1) / b, n_block_cols = (d.K + b - 1) / b;
  const at::Tensor idx = block_indices.to(at::kLong).contiguous();
  check_block_indices_values(idx, n_block_rows, n_block_cols);
  const auto acc = sddmm_acc_dtype(grad_y.scalar_type());
  at::Tensor out = at::zeros({nb, b, b}, grad_y.options().dtype(acc));
  if (nb == 0 || d.M == 0) return out.to(d.out_dtype);
  const at::Tensor dy = grad_y.reshape({d.M, d.N}).to(acc);
  const at::Tensor xx = x.reshape({d.M, d.K}).to(acc);
  const int64_t* p = idx.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t n0 = p[2 * i] * b, k0 = p[2 * i + 1] * b;
    const int64_t bn = std::min(b, d.N - n0), bk = std::min(b, d.K - k0);
    // One small GEMM per kept tile, reduced over all tokens by BLAS; edge tiles
    // keep their zero padding.
    at::Tensor tile = out[i].narrow(0, 0, bn).narrow(1, 0, bk);
    const at::Tensor prod = at::mm(dy.narrow(1, n0, bn).t(), xx.narrow(1, k0, bk));
    tile.copy_(prod);
  }
  return out.to(d.out_dtype);
}

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;  // independent partial sums
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

at::Tensor sddmm_csr_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& crow_indices,
                         const at::Tensor& col_indices, std::optional<at::ScalarType> out_dtype) {
  const SddmmDims d = check_sddmm_operands(grad_y, x, out_dtype);
  const int64_t nnz = check_csr_shape(crow_indices, col_indices, d.N, grad_y);
  const at::Tensor crow = crow_indices.to(at::kLong).contiguous();
  const at::Tensor col = col_indices.to(at::kLong).contiguous();
  check_csr_values(crow, col, d.K);
  const auto acc = sddmm_acc_dtype(grad_y.scalar_type());
  at::Tensor out = at::zeros({nnz}, grad_y.options().dtype(acc));
  if (nnz == 0 || d.M == 0) return out.to(d.out_dtype);
  const at::Tensor dy = grad_y.reshape({d.M, d.N});
  const at::Tensor xx = x.reshape({d.M, d.K});
  const int64_t* rp = crow.const_data_ptr<int64_t>();
  const int64_t* cp = col.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(acc, "sddmm_csr_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t m0 = 0; m0 < d.M; m0 += kTokenChunk) {
      const int64_t mc = std::min(kTokenChunk, d.M - m0);
      // Token-contiguous rows of grad_y^T and x^T for this chunk: every dot product
      // below reads two contiguous vectors.
      const at::Tensor dyt = dy.narrow(0, m0, mc).t().to(acc).contiguous();  // [N, mc]
      const at::Tensor xt = xx.narrow(0, m0, mc).t().to(acc).contiguous();   // [K, mc]
      const scalar_t* a = dyt.const_data_ptr<scalar_t>();
      const scalar_t* bptr = xt.const_data_ptr<scalar_t>();
      at::parallel_for(0, d.N, 16, [&](int64_t n_begin, int64_t n_end) {
        for (int64_t n = n_begin; n < n_end; ++n) {
          for (int64_t j = rp[n]; j < rp[n + 1]; ++j) o[j] += dot(a + n * mc, bptr + cp[j] * mc, mc);
        }
      });
    }
  });
  return out.to(d.out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CPU, m) {
  m.impl("sddmm_block", &sddmm_block_cpu);
  m.impl("sddmm_csr", &sddmm_csr_cpu);
}

}  // namespace lrk
