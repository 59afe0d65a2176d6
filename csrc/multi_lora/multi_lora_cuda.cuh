#pragma once
// Shared pieces of the multi-adapter LoRA CUDA kernels: how a kernel finds a
// token's adapter and rank from device index tensors (never trusting their
// values: see multi_lora_checks.h), element conversions for every dtype, the
// per-slice pool pointers, and the launchers that multi_lora_cuda.cu calls.
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/cuda_utils.cuh"

namespace lrk::multi_lora {

// ---- elements -----------------------------------------------------------------
// Accumulation type: double for double, float for everything else.
template <typename T>
struct acc {
  using type = float;
};
template <>
struct acc<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return v;
  } else {
    return cuda::from_float<T>(v);
  }
}

// ---- index tensors --------------------------------------------------------------
__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Where each token's adapter comes from: per-token ids (num_segments < 0) or
// segments of sorted tokens. Plain data, passed to kernels by value.
struct AdapterIndex {
  const void* ids = nullptr;
  const void* seg_offsets = nullptr;
  const void* seg_adapters = nullptr;
  const void* ranks = nullptr;
  int64_t num_segments = -1;
  int64_t n = 0;      // adapters in the pool
  int64_t r_max = 0;  // rank capacity of a slot
  bool ids64 = false, offsets64 = false, seg_adapters64 = false, ranks64 = false;

  // An id outside [0, n) means no adapter: the pool is never read out of bounds.
  __device__ __forceinline__ int64_t valid_adapter(int64_t j) const { return (j >= 0 && j < n) ? j : -1; }

  __device__ __forceinline__ int64_t rank_of(int64_t j) const {
    const int64_t r = load_index(ranks, ranks64, j);
    return r < 0 ? 0 : (r > r_max ? r_max : r);
  }

  __device__ __forceinline__ int64_t offset(int64_t s) const { return load_index(seg_offsets, offsets64, s); }

  __device__ __forceinline__ int64_t segment_adapter(int64_t s) const {
    return valid_adapter(load_index(seg_adapters, seg_adapters64, s));
  }

  // The first segment s in [0, num_segments) with offset(s) > v, or num_segments.
  // Terminates in log2 steps and stays in bounds whatever the offsets hold.
  __device__ __forceinline__ int64_t first_segment_after(int64_t v) const {
    int64_t lo = 0, hi = num_segments;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (offset(mid) <= v) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  }

  // Tokens [lo, hi) of segment s, clamped to [0, M] (an inverted segment is empty).
  __device__ __forceinline__ void segment_range(int64_t s, int64_t M, int64_t& lo, int64_t& hi) const {
    lo = offset(s);
    lo = lo < 0 ? 0 : (lo > M ? M : lo);
    hi = offset(s + 1);
    hi = hi < lo ? lo : (hi > M ? M : hi);
  }

  // Adapter of token i, or -1.
  __device__ __forceinline__ int64_t adapter_of(int64_t i, int64_t M) const {
    if (num_segments < 0) return valid_adapter(load_index(ids, ids64, i));
    const int64_t s = first_segment_after(i) - 1;  // the last segment starting at or before i
    if (s < 0) return -1;
    int64_t lo, hi;
    segment_range(s, M, lo, hi);
    return (i >= lo && i < hi) ? segment_adapter(s) : -1;
  }

  // Segments that may overlap tokens [row0, row_end): [first, last] (empty when last < first).
  __device__ __forceinline__ void segments_overlapping(int64_t row0, int64_t row_end, int64_t& first,
                                                       int64_t& last) const {
    first = first_segment_after(row0) - 1;
    if (first < 0) first = 0;
    last = first_segment_after(row_end - 1) - 1;
  }
};

// ---- output slices -----------------------------------------------------------------
// Up to kMaxSlices slices per launch (more are launched in groups).
constexpr int kMaxSlices = 8;

template <typename T>
struct SlicePack {
  const T* pool[kMaxSlices];  // lora_a[s] or lora_b[s]
  int64_t n_out[kMaxSlices];  // N_s (expand)
  int64_t col_off[kMaxSlices];  // first column of slice s in y (expand)
};

// ---- launchers (host) -------------------------------------------------------------
// h must be zeroed by the caller for the tile kernels (they add K-split partials);
// the row kernels write every element of h. `slice0` is the first slice of the pack:
// the launchers take pointers already offset to it.
struct ShrinkLaunch {
  const void* x;      // [M, K] contiguous
  void* h;            // [slices, M, r_max] (acc dtype), this pack's first slice
  const void* pools[kMaxSlices];
  int num_slices;     // in this pack
  int64_t M, K;
  AdapterIndex index;
};

struct ExpandLaunch {
  void* y;            // rows of ld_y elements
  int64_t ld_y;
  const void* h;      // this pack's first slice
  const void* pools[kMaxSlices];
  int64_t n_out[kMaxSlices];
  int64_t col_off[kMaxSlices];
  int num_slices;
  const float* scales;
  int64_t M;
  AdapterIndex index;
};

// One token per block (decode): any float dtype, any adapter layout.
void launch_shrink_rows(const ShrinkLaunch& p, at::ScalarType dtype);
void launch_expand_rows(const ExpandLaunch& p, at::ScalarType dtype);
// 64-token tiles on tensor cores (sorted segments): bfloat16 / float16, segment layout.
void launch_shrink_tiles(const ShrinkLaunch& p, at::ScalarType dtype);
void launch_expand_tiles(const ExpandLaunch& p, at::ScalarType dtype);

}  // namespace lrk::multi_lora
