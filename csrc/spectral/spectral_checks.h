#pragma once
// Argument validation for the spectral-initialisation ops (csrc/spectral), shared
// by their CPU and CUDA registrations.
#include <string_view>

#include "common/checks.h"

namespace lrk {

// Sketches, bases and factors: float64 for float64 inputs, else float32.
inline at::ScalarType spectral_acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_matrix(const at::Tensor& t, std::string_view name) {
  check_float_tensor(t, name);
  check_dim(t, name, 2);
}

inline void check_nonempty_matrix(const at::Tensor& t, std::string_view name) {
  check_matrix(t, name);
  TORCH_CHECK(t.numel() > 0, name, ": expected a non-empty matrix, got shape ", t.sizes());
}

inline void check_spectral_rank(int64_t rank, int64_t limit, std::string_view what) {
  TORCH_CHECK(rank >= 1 && rank <= limit, "rank: expected 1 <= rank <= ", what, " = ", limit, ", got ", rank);
}

// An accumulated sketch: float32/float64, contiguous, updated in place.
inline void check_sketch(const at::Tensor& s, std::string_view name) {
  TORCH_CHECK(s.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble, name,
              ": expected dtype float32 or float64 (an accumulator), got ", s.scalar_type());
  check_dim(s, name, 2);
  TORCH_CHECK(s.is_contiguous(), name, ": expected a contiguous tensor (it is updated in place)");
}

}  // namespace lrk
