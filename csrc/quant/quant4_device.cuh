#pragma once
// Device-side pieces shared by the 4-bit weight kernels (quant4_tiled.cu,
// quant4_small_m.cu): reading one element of bitsandbytes' packed layout, and
// the element-type conversions of kernels that run in float32 or float64.
//
// Layout (python/lrk/reference_quant.py): element i of the row-major flattened
// W [rows, cols] is the high nibble of packed[i / 2] when i is even, the low one
// when odd; its value is code[nibble] * absmax[i / blocksize], formed in float32
// exactly as bitsandbytes forms it (so float64 kernels see the same values).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"

namespace lrk::quant4 {

// The accumulator of element type T: float64 for float64, float32 otherwise.
template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename A>
__device__ __forceinline__ A widen(float v) { return static_cast<A>(v); }
template <typename A>
__device__ __forceinline__ A widen(double v) { return static_cast<A>(v); }
template <typename A>
__device__ __forceinline__ A widen(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A>
__device__ __forceinline__ A widen(__nv_bfloat16 v) { return static_cast<A>(__bfloat162float(v)); }

// An accumulator value rounded to T.
template <typename T, typename A>
__device__ __forceinline__ T narrow(A v) {
  if constexpr (std::is_same_v<T, double>) {
    return static_cast<double>(v);
  } else {
    return cuda::from_float<T>(static_cast<float>(v));
  }
}

// The 4-bit code of flat element i.
__device__ __forceinline__ int nibble_at(const uint8_t* __restrict__ packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 15) : (byte >> 4);
}

// The 8 codes of a 32-bit word of packed bytes, in element order: byte b holds
// elements 2b (high nibble) and 2b + 1 (low nibble); the word is little-endian.
__device__ __forceinline__ int nibble_of_word(uint32_t word, int e) {
  return (word >> (8 * (e >> 1) + ((e & 1) ? 0 : 4))) & 15;
}

// a * b + c with the product rounded first (no FMA contraction), as the float
// references form double quantization's absmax.
__device__ __forceinline__ float mul_add_rn(float a, float b, float c) {
#ifdef LRK_EMULATED
  return a * b + c;  // g++ on x86-64 without -mfma does not contract
#else
  return __fadd_rn(__fmul_rn(a, b), c);
#endif
}

// code (float32 [16]) -> shared table, by the first 16 threads; the caller syncs.
__device__ __forceinline__ void stage_code_table(float* table, const float* __restrict__ code) {
  if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
}

}  // namespace lrk::quant4
