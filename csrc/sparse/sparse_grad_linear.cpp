// SaRA's layer op: y = x @ weight^T + bias where `values` are entries of `weight`
// at a sparse pattern that the caller keeps written into weight (the trained values
// live inside W, so the forward is the plain GEMM). Its autograd (Python) gives
// `values` the masked gradient (grad_y^T @ x)[pattern] through the SDDMM, never the
// dense [N, K] gradient. The forward is one ATen call, so one implementation serves
// every device.
#include <torch/library.h>

#include "sparse/sparse_checks.h"

namespace lrk {
namespace {

struct LinearDims {
  int64_t N;
  int64_t K;
};

LinearDims check_linear_inputs(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& values) {
  check_float_tensor(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x: expected a tensor of shape [..., in_features], got a 0-D tensor");
  check_float_tensor(weight, "weight");
  check_same_dtype(weight, "weight", x, "x");
  check_same_device(weight, "weight", x, "x");
  check_dim(weight, "weight", 2);
  check_size(weight, "weight", 1, x.size(-1), "in_features = x.shape[-1]");
  if (bias.has_value() && bias->defined()) {
    check_float_tensor(*bias, "bias");
    check_same_dtype(*bias, "bias", x, "x");
    check_same_device(*bias, "bias", x, "x");
    check_dim(*bias, "bias", 1);
    check_size(*bias, "bias", 0, weight.size(0), "out_features = weight.shape[0]");
  }
  check_float_tensor(values, "values");
  check_same_device(values, "values", x, "x");
  return LinearDims{weight.size(0), weight.size(1)};
}

at::Tensor sparse_grad_linear_block(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& values,
                                    const at::Tensor& block_indices, int64_t block_size) {
  check_linear_inputs(x, weight, bias, values);
  check_block_size(block_size);
  const int64_t nb = check_block_indices_shape(block_indices, x, "x");
  TORCH_CHECK(values.dim() == 3 && values.size(0) == nb && values.size(1) == block_size &&
                  values.size(2) == block_size,
              "values: expected shape [", nb, ", ", block_size, ", ", block_size,
              "] (one block_size x block_size tile per row of block_indices), got ", values.sizes());
  return at::linear(x, weight, bias);
}

at::Tensor sparse_grad_linear_csr(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& values, const at::Tensor& crow_indices,
                                  const at::Tensor& col_indices) {
  const LinearDims d = check_linear_inputs(x, weight, bias, values);
  const int64_t nnz = check_csr_shape(crow_indices, col_indices, d.N, x, "x");
  TORCH_CHECK(values.dim() == 1 && values.size(0) == nnz, "values: expected shape [", nnz,
              "] (one value per entry of col_indices), got ", values.sizes());
  return at::linear(x, weight, bias);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CompositeExplicitAutograd, m) {
  m.impl("sparse_grad_linear_block", &sparse_grad_linear_block);
  m.impl("sparse_grad_linear_csr", &sparse_grad_linear_csr);
}

}  // namespace lrk
