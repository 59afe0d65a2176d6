#pragma once
// Run-time value -> compile-time parameter dispatch for templated CUDA kernels:
// f is called with a tag whose type carries the choice (element type, a bool, a tile size).
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace lrk::cuda {

// bfloat16 -> __nv_bfloat16{}, float16 -> __half{}; other dtypes are an error naming `what`.
template <typename F>
void with_half_type(at::ScalarType t, const char* what, F&& f) {
  if (t == at::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    TORCH_CHECK(t == at::kHalf, what, ": bfloat16 or float16 expected, got ", t);
    f(__half{});
  }
}

// Also float32 -> float{} and float64 -> double{}.
template <typename F>
void with_float_type(at::ScalarType t, const char* what, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, what, ": unsupported dtype ", t);
  }
}

// std::true_type{} / std::false_type{} (e.g. the 16-byte vector path).
template <typename F>
void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The smallest rank tile of 16, 32 or 64 that holds r (64 for larger r, tiled by the caller).
template <typename F>
void with_rank_tile(int64_t r, F&& f) {
  if (r <= 16) {
    f(std::integral_constant<int, 16>{});
  } else if (r <= 32) {
    f(std::integral_constant<int, 32>{});
  } else {
    f(std::integral_constant<int, 64>{});
  }
}

}  // namespace lrk::cuda
