#pragma once
// Input validation shared by every op's CPU and CUDA kernels. Messages name the
// argument, what was expected and what was given.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>
#include <vector>

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

// t has shape [..., last] with the leading dims of x [..., K] (a grad_y, an h).
inline void check_leading_dims_like(const at::Tensor& t, std::string_view name, const at::Tensor& x, int64_t last) {
  const int64_t rows = x.numel() / std::max<int64_t>(x.size(-1), 1);
  TORCH_CHECK(t.dim() == x.dim() && t.size(-1) == last && t.numel() == rows * last, name, ": expected shape [..., ",
              last, "] with the leading dims of x ", x.sizes(), ", got ", t.sizes());
}

// Shape of an output [..., last] with the leading dims of x.
inline std::vector<int64_t> with_last_dim(const at::Tensor& x, int64_t last) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = last;
  return shape;
}

}  // namespace lrk
