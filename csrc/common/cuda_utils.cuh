#pragma once
// Small CUDA helpers shared by lrk's kernels: element conversion, launch checks.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/launch.cuh"

namespace lrk::cuda {

// ATen scalar type -> CUDA native element type.
template <typename T>
struct native {
  using type = T;
};
template <>
struct native<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct native<at::Half> {
  using type = __half;
};
template <typename T>
using native_t = typename native<T>::type;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace lrk::cuda
