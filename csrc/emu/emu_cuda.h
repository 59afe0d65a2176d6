#pragma once
// The device-side names of CUDA C++ that lrk's kernels use, for the emulated
// build (force-included first in every emulated translation unit, so that the
// kernels compile as plain C++ with g++). Everything runs on emu_runtime.h.
#ifndef LRK_EMULATED
#error "csrc/emu is for the emulated build only (LRK_EMULATED)"
#endif

// Execution-space and launch annotations mean nothing on the CPU. CUDA's own
// host_defines.h keeps these definitions (it defines them only when undefined).
#define __host__
#define __device__
#define __global__
#define __launch_bounds__(...)
// A raw __shared__ declaration would be one static object shared by every
// block: kernels declare shared memory through LRK_SHARED / LRK_DYNAMIC_SHARED.
#define __shared__ static_assert(false, "declare shared memory with LRK_SHARED or LRK_DYNAMIC_SHARED");

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu/emu_runtime.h"

// ------------------------------------------------------------------ indices

#define threadIdx (::lrk::emu::this_thread().idx)
#define blockIdx (::lrk::emu::this_thread().block->idx)
#define blockDim (::lrk::emu::current_launch()->block_dim)
#define gridDim (::lrk::emu::current_launch()->grid)
constexpr int warpSize = 32;

// ------------------------------------------------------------------ barriers, warps

inline void __syncthreads() { ::lrk::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::lrk::emu::warp_barrier(mask, ::lrk::emu::WarpOp::kSyncwarp); }

namespace lrk::emu::detail {
inline int src_idx(int, int lane) { return lane; }
inline int src_xor(int lane, int m) { return lane ^ m; }
inline int src_down(int lane, int d) { return lane + d; }
inline int src_up(int lane, int d) { return lane - d; }
}  // namespace lrk::emu::detail

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  // The source lane wraps modulo width, as on a GPU.
  return ::lrk::emu::shuffle(mask, v, ::lrk::emu::detail::src_idx, ((src_lane % width) + width) % width, width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::lrk::emu::shuffle(mask, v, ::lrk::emu::detail::src_xor, lane_mask, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::lrk::emu::shuffle(mask, v, ::lrk::emu::detail::src_down, static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::lrk::emu::shuffle(mask, v, ::lrk::emu::detail::src_up, static_cast<int>(delta), width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ::lrk::emu::ballot(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return ::lrk::emu::ballot(mask, pred != 0) != 0; }
inline int __all_sync(unsigned mask, int pred) { return ::lrk::emu::ballot(mask, pred != 0) == mask; }

// ------------------------------------------------------------------ memory

template <typename T>
T __ldg(const T* p) {
  return *p;
}

// Every fiber runs on one OS thread, but std::atomic_ref keeps the operations
// atomic should blocks ever run in parallel.
template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value);
}
template <typename T>
T atomicOr(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_or(value);
}
template <typename T>
T atomicAnd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_and(value);
}
template <typename T>
T atomicMax(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (old < value && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
T atomicMin(T* address, T value) {
  std::atomic_ref<T> a(*address);
  T old = a.load();
  while (value < old && !a.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}
template <typename T>
T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Shared-window addresses only feed cp.async in lrk, which the emulator runs
// through lrk::cuda's wrappers; the generic address serves as the identity.
inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

// ------------------------------------------------------------------ bits and math

inline int __popc(unsigned v) { return std::popcount(v); }
inline int __popcll(unsigned long long v) { return std::popcount(v); }
inline int __clz(int v) { return std::countl_zero(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return v == 0 ? 0 : std::countr_zero(static_cast<unsigned>(v)) + 1; }
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
inline float __expf(float v) { return std::exp(v); }
inline float __logf(float v) { return std::log(v); }
inline float __sinf(float v) { return std::sin(v); }
inline float __cosf(float v) { return std::cos(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline float __saturatef(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }
