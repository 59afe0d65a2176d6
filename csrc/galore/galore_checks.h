#pragma once
// Argument validation for the GaLore-family ops, shared by CPU, CUDA and the
// composite projector kernels.
#include <string>

#include "common/checks.h"

namespace lrk {

// Projectors and optimizer states: float64 for float64 gradients, else float32.
inline at::ScalarType galore_acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Rows of the projector: n for a right projection (grad @ Q), m for a left one (P^T @ grad).
inline int64_t galore_proj_size(const at::Tensor& grad, bool left) { return left ? grad.size(0) : grad.size(1); }

inline void check_galore_grad(const at::Tensor& grad, std::string_view name = "grad") {
  check_float_tensor(grad, name);
  check_dim(grad, name, 2);
  TORCH_CHECK(grad.numel() > 0, name, ": expected a non-empty matrix, got shape ", grad.sizes());
}

inline void check_galore_rank(int64_t rank, const at::Tensor& grad) {
  const int64_t limit = std::min(grad.size(0), grad.size(1));
  TORCH_CHECK(rank >= 1 && rank <= limit, "rank: expected 1 <= rank <= min(m, n) = ", limit, " for grad of shape ",
              grad.sizes(), ", got ", rank);
}

inline int64_t galore_quant_groups(int64_t size, int64_t group_size) {
  return group_size <= 0 ? 1 : (size + group_size - 1) / group_size;
}

// Int4 projector storage: packed uint8 [rank, ceil(size/2)], scales float32 and
// zeros uint8, both [rank, groups].
inline void check_galore_int4(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                              int64_t size, int64_t group_size, std::string_view name = "proj") {
  TORCH_CHECK(size >= 1, "size: expected a positive projector length, got ", size);
  TORCH_CHECK(packed.scalar_type() == at::kByte, name, ": expected uint8 (packed int4), got ", packed.scalar_type());
  check_dim(packed, name, 2);
  const int64_t rank = packed.size(0);
  TORCH_CHECK(rank >= 1, name, ": expected at least one column (dim 0 = rank), got shape ", packed.sizes());
  check_size(packed, name, 1, (size + 1) / 2, "ceil(size / 2) packed pairs");
  const int64_t groups = galore_quant_groups(size, group_size);
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "proj_scales: expected dtype float32, got ", scales.scalar_type());
  TORCH_CHECK(zeros.scalar_type() == at::kByte, "proj_zeros: expected dtype uint8, got ", zeros.scalar_type());
  check_dim(scales, "proj_scales", 2);
  check_dim(zeros, "proj_zeros", 2);
  check_size(scales, "proj_scales", 0, rank, "rank = packed.shape[0]");
  check_size(scales, "proj_scales", 1, groups, "groups = ceil(size / group_size)");
  check_size(zeros, "proj_zeros", 0, rank, "rank = packed.shape[0]");
  check_size(zeros, "proj_zeros", 1, groups, "groups = ceil(size / group_size)");
  check_same_device(scales, "proj_scales", packed, name);
  check_same_device(zeros, "proj_zeros", packed, name);
  TORCH_CHECK(packed.is_contiguous() && scales.is_contiguous() && zeros.is_contiguous(), name,
              ": expected contiguous packed, scales and zeros tensors");
}

inline void check_optimizer_scalars(int64_t step, double lr, double beta1, double beta2, double eps,
                                    double weight_decay, double scale) {
  TORCH_CHECK(step >= 1, "step: expected the step count after the increment (>= 1), got ", step);
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "lr: expected a finite number >= 0, got ", lr);
  TORCH_CHECK(std::isfinite(beta1) && beta1 >= 0.0 && beta1 < 1.0, "beta1: expected a number in [0, 1), got ", beta1);
  TORCH_CHECK(std::isfinite(beta2) && beta2 >= 0.0 && beta2 < 1.0, "beta2: expected a number in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "eps: expected a finite number >= 0, got ", eps);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0,
              "weight_decay: expected a finite number >= 0, got ", weight_decay);
  check_finite(scale, "scale");
}

inline void check_state(const at::Tensor& t, std::string_view name, const at::Tensor& param,
                        at::IntArrayRef expected_shape) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  const auto acc = galore_acc_dtype(param.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, name, ": expected dtype ", acc, " (states of a ", param.scalar_type(),
              " parameter), got ", t.scalar_type());
  check_same_device(t, name, param, "param");
  TORCH_CHECK(t.sizes() == expected_shape, name, ": expected shape ", expected_shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
}

}  // namespace lrk
