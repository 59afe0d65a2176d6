// Small-M products with a 4-bit weight (quant4_cuda.h): decode-sized inputs
// (M <= kQuant4SmallM rows) where the product is bound by reading W, so each
// packed byte is read once, for all M rows, and dequantized in registers. This
// is where 4 bits pay most: a quarter of a bf16 weight's bytes.
//   forward    out [M, rows] = act [M, cols] @ W^T: a warp per W row, lanes over
//              the row's 32-bit words (8 codes each), a warp reduction per output;
//   grad_input out [M, cols] = act [M, rows] @ W: a thread per 8 columns of W,
//              blocks over column slices and slices of W's rows; each row slice
//              writes its own partial sums (float32, float64 for float64) to a
//              workspace, summed in a fixed order afterwards (deterministic).
// When cols is a multiple of 8 (and packed 4-byte aligned) every row starts on a
// 32-bit word and the 8 codes of a word share one absmax (blocksize >= 32 is a
// multiple of 8): one word and one absmax per 8 elements. Otherwise each element
// is read on its own.
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "common/dispatch.cuh"
#include "quant/quant4_cuda.h"
#include "quant/quant4_device.cuh"

namespace lrk {
namespace {

using quant4::acc_t;
using quant4::narrow;
using quant4::widen;

constexpr int kMaxRows = static_cast<int>(kQuant4SmallM);
constexpr int kFwdWarps = 8;
constexpr int kBwdThreads = 128;
constexpr int kColsPerThread = 8;

template <typename T, bool Words>
__global__ void __launch_bounds__(kFwdWarps * 32)
    quant4_small_m_fwd_kernel(const T* __restrict__ act, const uint8_t* __restrict__ packed,
                              const float* __restrict__ absmax, const float* __restrict__ code, T* __restrict__ out,
                              int M, int64_t rows, int64_t cols, int shift) {
  using A = acc_t<T>;
  LRK_SHARED(16, float, code_s, [16]);
  quant4::stage_code_table(code_s, code);
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kFwdWarps + warp;
  if (n >= rows) return;  // warp-uniform, after the only block barrier
  const int64_t base = n * cols;

  A acc[kMaxRows];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) acc[m] = A(0);
  if constexpr (Words) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(packed) + base / 8;
    for (int64_t g = lane; g < cols / 8; g += 32) {
      const uint32_t word = __ldg(words + g);
      const float scale = __ldg(absmax + ((base + 8 * g) >> shift));
      A w[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) w[e] = static_cast<A>(code_s[quant4::nibble_of_word(word, e)] * scale);
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) {
        if (m < M) {
          const T* x = act + m * cols + 8 * g;
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[m] += w[e] * widen<A>(x[e]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < cols; k += 32) {
      const int64_t i = base + k;
      const A w = static_cast<A>(code_s[quant4::nibble_at(packed, i)] * __ldg(absmax + (i >> shift)));
#pragma unroll
      for (int m = 0; m < kMaxRows; ++m) {
        if (m < M) acc[m] += w * widen<A>(act[m * cols + k]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m < M) {  // uniform over the warp: every lane shuffles
      A v = acc[m];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == m) out[m * rows + n] = narrow<T>(v);
    }
  }
}

// Partial sums of act[:, n0:n1] @ W[n0:n1, :] for 8 columns per thread -> ws[split] [M, cols].
template <typename T, bool Words>
__global__ void __launch_bounds__(kBwdThreads)
    quant4_small_m_bwd_kernel(const T* __restrict__ act, const uint8_t* __restrict__ packed,
                              const float* __restrict__ absmax, const float* __restrict__ code,
                              acc_t<T>* __restrict__ ws, int M, int64_t rows, int64_t cols, int shift,
                              int64_t rows_per_split) {
  using A = acc_t<T>;
  LRK_SHARED(16, float, code_s, [16]);
  quant4::stage_code_table(code_s, code);
  __syncthreads();
  const int64_t k0 = (int64_t(blockIdx.x) * kBwdThreads + threadIdx.x) * kColsPerThread;
  if (k0 >= cols) return;
  const int64_t n0 = int64_t(blockIdx.y) * rows_per_split;
  const int64_t n1 = std::min(rows, n0 + rows_per_split);

  A acc[kMaxRows][kColsPerThread];
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m)
#pragma unroll
    for (int e = 0; e < kColsPerThread; ++e) acc[m][e] = A(0);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t base = n * cols + k0;
    A w[kColsPerThread];
    if constexpr (Words) {
      const uint32_t word = __ldg(reinterpret_cast<const uint32_t*>(packed) + base / 8);
      const float scale = __ldg(absmax + (base >> shift));
#pragma unroll
      for (int e = 0; e < 8; ++e) w[e] = static_cast<A>(code_s[quant4::nibble_of_word(word, e)] * scale);
    } else {
#pragma unroll
      for (int e = 0; e < kColsPerThread; ++e) {
        const int64_t i = base + e;
        w[e] = k0 + e < cols ? static_cast<A>(code_s[quant4::nibble_at(packed, i)] * __ldg(absmax + (i >> shift)))
                             : A(0);
      }
    }
#pragma unroll
    for (int m = 0; m < kMaxRows; ++m) {
      if (m < M) {
        const A g = widen<A>(act[m * rows + n]);
#pragma unroll
        for (int e = 0; e < kColsPerThread; ++e) acc[m][e] += g * w[e];
      }
    }
  }
  A* dst = ws + int64_t(blockIdx.y) * M * cols;
#pragma unroll
  for (int m = 0; m < kMaxRows; ++m) {
    if (m < M) {
#pragma unroll
      for (int e = 0; e < kColsPerThread; ++e)
        if (k0 + e < cols) dst[m * cols + k0 + e] = acc[m][e];
    }
  }
}

// Slices of W's rows for grad_input: enough blocks to fill the GPU a few times
// over, each slice at least 32 rows, and a workspace no larger than the packed
// weight (or one slice).
int64_t bwd_rows_per_split(int64_t M, int64_t rows, int64_t cols, int64_t col_blocks, int64_t acc_bytes) {
  const int64_t target = std::max<int64_t>(1, 4 * cuda::sm_count() / std::max<int64_t>(col_blocks, 1));
  const int64_t by_rows = std::max<int64_t>(1, rows / 32);
  const int64_t by_memory = std::max<int64_t>(1, cuda::ceil_div(rows * cols, 2) / (M * cols * acc_bytes));
  const int64_t splits = std::min({target, by_rows, by_memory});
  return cuda::ceil_div(rows, splits);
}

}  // namespace

void quant4_small_m_cuda(Quant4Product& p) {
  const int64_t M = p.M();
  TORCH_CHECK(M >= 1 && M <= kQuant4SmallM, "quant4_small_m_cuda: 1 to ", kQuant4SmallM, " rows expected, got ", M);
  const bool words = p.cols % 8 == 0 && (reinterpret_cast<uintptr_t>(p.packed.const_data_ptr()) & 3u) == 0;
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_float_type(p.act.scalar_type(), "linear_4bit", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    cuda::with_bool(words, [&](auto words_tag) {
      constexpr bool kWords = decltype(words_tag)::value;
      const T* act = reinterpret_cast<const T*>(p.act.const_data_ptr());
      if (!p.transposed) {
        const int64_t grid = cuda::ceil_div(p.rows, kFwdWarps);
        cuda::launch(quant4_small_m_fwd_kernel<T, kWords>, static_cast<unsigned>(grid), kFwdWarps * 32, 0, stream,
                     act, p.packed.const_data_ptr<uint8_t>(), p.absmax.const_data_ptr<float>(),
                     p.code.const_data_ptr<float>(), reinterpret_cast<T*>(p.out.mutable_data_ptr()),
                     static_cast<int>(M), p.rows, p.cols, p.shift);
        return;
      }
      const int64_t col_blocks = cuda::ceil_div(p.cols, int64_t(kBwdThreads) * kColsPerThread);
      const int64_t per_split = bwd_rows_per_split(M, p.rows, p.cols, col_blocks, sizeof(A));
      const int64_t splits = cuda::ceil_div(p.rows, per_split);
      at::Tensor ws = at::empty({splits, M, p.cols}, p.act.options().dtype(c10::CppTypeToScalarType<A>::value));
      cuda::launch(quant4_small_m_bwd_kernel<T, kWords>,
                   dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(splits)), kBwdThreads, 0, stream,
                   act, p.packed.const_data_ptr<uint8_t>(), p.absmax.const_data_ptr<float>(),
                   p.code.const_data_ptr<float>(), ws.mutable_data_ptr<A>(), static_cast<int>(M), p.rows, p.cols,
                   p.shift, per_split);
      p.out.copy_(splits == 1 ? ws[0] : ws.sum(0));
    });
  });
}

}  // namespace lrk
