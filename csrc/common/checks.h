#pragma once
// Input validation shared by every op's CPU and CUDA kernels. Messages name the
// argument, what was expected and what was given.
#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string_view>

namespace lrk {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline bool is_half_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

inline void check_float_tensor(const at::Tensor& t, std::string_view name) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              ": expected dtype float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, std::string_view name, const at::Tensor& ref,
                             std::string_view ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, ": expected dtype ", ref.scalar_type(),
              " (the dtype of ", ref_name, "), got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& t, std::string_view name, const at::Tensor& ref,
                              std::string_view ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(),
              " (the device of ", ref_name, "), got one on ", t.device());
}

inline void check_dim(const at::Tensor& t, std::string_view name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, name, ": expected a ", dim, "-D tensor, got shape ", t.sizes());
}

inline void check_size(const at::Tensor& t, std::string_view name, int64_t d, int64_t expected,
                       std::string_view what) {
  TORCH_CHECK(t.size(d) == expected, name, ": expected size ", expected, " in dim ", d, " (", what,
              "), got shape ", t.sizes());
}

inline void check_finite(double v, std::string_view name) {
  TORCH_CHECK(std::isfinite(v), name, ": expected a finite number, got ", v);
}

inline void check_probability(double p, std::string_view name) {
  TORCH_CHECK(std::isfinite(p) && p >= 0.0 && p < 1.0, name, ": expected a probability in [0, 1), got ", p);
}

}  // namespace lrk
