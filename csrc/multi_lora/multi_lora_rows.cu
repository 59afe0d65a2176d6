// Multi-adapter LoRA, one token per block (decode batches, BGMV; also the
// segment layout for float32/float64 and for many short segments).
//
// Shrink: block = (token, slice, 8 ranks); each warp computes one rank's K-long
// dot product with 16-byte loads and fp32 accumulation. Warps past the adapter's
// rank only write a zero, so a rank-r adapter costs r rows of A whatever r_max is.
// Expand: block = (token, slice, 128 output columns); the scaled h row sits in
// shared memory and each thread reads its r_j contiguous elements of B and
// updates one element of y (one writer per element: no atomics).
// Cost per token is independent of the pool size (only the token's adapter is read).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "multi_lora/multi_lora_cuda.cuh"
#include "common/dispatch.cuh"

namespace lrk::multi_lora {
namespace {

constexpr int kShrinkWarps = 8;
constexpr int kExpandThreads = 128;

template <typename T>
__device__ __forceinline__ acc_t<T> warp_sum(acc_t<T> v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    shrink_rows_kernel(const T* __restrict__ x, SlicePack<T> a, acc_t<T>* __restrict__ h, int64_t M, int64_t K,
                       AdapterIndex index) {
  using A = acc_t<T>;
  const int64_t i = blockIdx.x;
  const int s = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k = int64_t(blockIdx.z) * kShrinkWarps + warp;  // the rank row of this warp
  if (k >= index.r_max) return;
  const int64_t j = index.adapter_of(i, M);
  const int64_t r = j >= 0 ? index.rank_of(j) : 0;
  A* out = h + (int64_t(s) * M + i) * index.r_max + k;
  if (k >= r) {
    if (lane == 0) *out = A(0);
    return;
  }
  const T* xr = x + i * K;
  const T* ar = a.pool[s] + (j * index.r_max + k) * K;
  A sum = A(0);
  if constexpr (kVec) {
    constexpr int V = 16 / sizeof(T);
#pragma unroll 4
    for (int64_t c = int64_t(lane) * V; c < K; c += 32 * V) {
      const uint4 xv = *reinterpret_cast<const uint4*>(xr + c);
      const uint4 av = __ldg(reinterpret_cast<const uint4*>(ar + c));
      const T* xe = reinterpret_cast<const T*>(&xv);
      const T* ae = reinterpret_cast<const T*>(&av);
#pragma unroll
      for (int e = 0; e < V; ++e) sum += to_acc(xe[e]) * to_acc(ae[e]);
    }
  } else {
    for (int64_t c = lane; c < K; c += 32) sum += to_acc(xr[c]) * to_acc(ar[c]);
  }
  sum = warp_sum<T>(sum);
  if (lane == 0) *out = sum;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kExpandThreads)
    expand_rows_kernel(T* __restrict__ y, int64_t ld_y, const acc_t<T>* __restrict__ h, SlicePack<T> b,
                       const float* __restrict__ scales, int64_t M, AdapterIndex index) {
  using A = acc_t<T>;
  LRK_DYNAMIC_SHARED(16, unsigned char, smem_raw);
  A* hs = reinterpret_cast<A*>(smem_raw);  // scale_j * h[s, i, :r], zero-padded to a whole vector
  const int64_t i = blockIdx.x;
  const int s = blockIdx.y;
  const int64_t N = b.n_out[s];
  const int64_t col0 = int64_t(blockIdx.z) * kExpandThreads;
  if (col0 >= N) return;  // block-uniform exits only, before the barrier
  const int64_t j = index.adapter_of(i, M);
  if (j < 0) return;
  const int64_t r = index.rank_of(j);
  if (r == 0) return;
  constexpr int V = 16 / sizeof(T);
  const int64_t r_pad = kVec ? (r + V - 1) / V * V : r;  // <= r_max when kVec (r_max % V == 0)
  const A scale = A(scales[j]);
  const A* hr = h + (int64_t(s) * M + i) * index.r_max;
  for (int64_t k = threadIdx.x; k < r_pad; k += kExpandThreads) hs[k] = k < r ? scale * hr[k] : A(0);
  __syncthreads();
  const int64_t col = col0 + threadIdx.x;
  if (col >= N) return;
  const T* br = b.pool[s] + (j * N + col) * index.r_max;
  A sum = A(0);
  if constexpr (kVec) {
    for (int64_t k = 0; k < r_pad; k += V) {
      const uint4 bv = __ldg(reinterpret_cast<const uint4*>(br + k));
      const T* be = reinterpret_cast<const T*>(&bv);
#pragma unroll
      for (int e = 0; e < V; ++e) {
        // Past r the pool may hold anything (even NaN), and NaN * 0 is NaN: skip, don't multiply by 0.
        if (k + e < r) sum += to_acc(be[e]) * hs[k + e];
      }
    }
  } else {
    for (int64_t k = 0; k < r; ++k) sum += to_acc(br[k]) * hs[k];
  }
  T* yp = y + i * ld_y + b.col_off[s] + col;
  *yp = from_acc<T>(to_acc(*yp) + sum);
}

unsigned grid_dim(int64_t v, int64_t limit, const char* what) {
  TORCH_CHECK(v <= limit, "multi_lora: ", what, " (", v, ") exceeds the CUDA grid limit ", limit);
  return static_cast<unsigned>(v);
}

}  // namespace

void launch_shrink_rows(const ShrinkLaunch& p, at::ScalarType dtype) {
  if (p.M == 0 || p.num_slices == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_float_type(dtype, "multi_lora", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    SlicePack<T> pack{};
    bool vec = p.K % V == 0 && cuda::aligned16(p.x);
    for (int s = 0; s < p.num_slices; ++s) {
      pack.pool[s] = static_cast<const T*>(p.pools[s]);
      vec = vec && cuda::aligned16(p.pools[s]);
    }
    const dim3 grid(grid_dim(p.M, 0x7fffffff, "tokens"), static_cast<unsigned>(p.num_slices),
                    grid_dim(cuda::ceil_div(p.index.r_max, kShrinkWarps), 65535, "r_max / 8"));
    cuda::with_bool(vec, [&](auto v) {
      cuda::launch(shrink_rows_kernel<T, decltype(v)::value>, grid, kShrinkWarps * 32, 0, stream,
          static_cast<const T*>(p.x), pack, static_cast<acc_t<T>*>(p.h), p.M, p.K, p.index);
    });
  });
}

void launch_expand_rows(const ExpandLaunch& p, at::ScalarType dtype) {
  if (p.M == 0 || p.num_slices == 0) return;
  int64_t n_max = 0;
  for (int s = 0; s < p.num_slices; ++s) n_max = std::max(n_max, p.n_out[s]);
  if (n_max == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_float_type(dtype, "multi_lora", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    SlicePack<T> pack{};
    bool vec = p.index.r_max % V == 0;
    for (int s = 0; s < p.num_slices; ++s) {
      pack.pool[s] = static_cast<const T*>(p.pools[s]);
      pack.n_out[s] = p.n_out[s];
      pack.col_off[s] = p.col_off[s];
      vec = vec && cuda::aligned16(p.pools[s]);
    }
    const int64_t r_pad = cuda::ceil_div(p.index.r_max, V) * V;
    const size_t smem = static_cast<size_t>(r_pad) * sizeof(acc_t<T>);  // <= 32 KiB for r_max <= 4096
    const dim3 grid(grid_dim(p.M, 0x7fffffff, "tokens"), static_cast<unsigned>(p.num_slices),
                    grid_dim(cuda::ceil_div(n_max, kExpandThreads), 65535, "out_features / 128"));
    cuda::with_bool(vec, [&](auto v) {
      cuda::launch(expand_rows_kernel<T, decltype(v)::value>, grid, kExpandThreads, smem, stream,
          static_cast<T*>(p.y), p.ld_y, static_cast<const acc_t<T>*>(p.h), pack, p.scales, p.M, p.index);
    });
  });
}

}  // namespace lrk::multi_lora
