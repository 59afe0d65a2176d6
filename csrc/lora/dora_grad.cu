// dora_grad_scale_cuda (see dora_grad.h). Each thread owns 8 adjacent columns
// (one 16-byte load per row when N % 8 == 0) over a range of rows, keeps their
// sums in registers and adds them to column_sums once (atomically; in
// deterministic mode into its row split's slice of a workspace, common/split_reduce.h).
#include <c10/cuda/CUDAGuard.h>

#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "common/split_reduce.h"
#include "lora/dora_grad.h"

namespace lrk {
namespace {

constexpr int kThreads = 128;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    dora_grad_scale_kernel(const T* __restrict__ dy, const T* __restrict__ yu, const float* __restrict__ g,
                           T* __restrict__ dys, float* __restrict__ column_sums, int64_t M, int64_t N,
                           int64_t rows_per_block, int64_t split_stride) {
  const int64_t col0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * 8;
  if (col0 >= N) return;
  const int64_t row_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t row_end = std::min<int64_t>(M, row_begin + rows_per_block);
  float gv[8], sums[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    gv[j] = col0 + j < N ? g[col0 + j] : 0.f;
    sums[j] = 0.f;
  }
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t e0 = row * N + col0;
    T a[8], b[8], out[8];
    if constexpr (kVec) {
      *reinterpret_cast<uint4*>(a) = *reinterpret_cast<const uint4*>(dy + e0);
      *reinterpret_cast<uint4*>(b) = *reinterpret_cast<const uint4*>(yu + e0);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        a[j] = col0 + j < N ? dy[e0 + j] : cuda::from_float<T>(0.f);
        b[j] = col0 + j < N ? yu[e0 + j] : cuda::from_float<T>(0.f);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float d = cuda::to_float(a[j]);
      sums[j] += d * cuda::to_float(b[j]);
      out[j] = cuda::from_float<T>(d * gv[j]);
    }
    if constexpr (kVec) {
      *reinterpret_cast<uint4*>(dys + e0) = *reinterpret_cast<const uint4*>(out);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (col0 + j < N) dys[e0 + j] = out[j];
      }
    }
  }
  column_sums += blockIdx.y * split_stride;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (col0 + j >= N || row_begin >= row_end) continue;
    if (split_stride == 0) {
      atomicAdd(column_sums + col0 + j, sums[j]);
    } else {
      column_sums[col0 + j] += sums[j];  // this split's own slice: one writer
    }
  }
}

}  // namespace

void dora_grad_scale_cuda(const at::Tensor& grad_y, const at::Tensor& y_unscaled, const at::Tensor& g,
                          at::Tensor& grad_y_scaled, at::Tensor& column_sums) {
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.is_contiguous() && y_unscaled.is_contiguous() &&
                  grad_y_scaled.is_contiguous() && y_unscaled.sizes() == grad_y.sizes() &&
                  grad_y_scaled.sizes() == grad_y.sizes(),
              "dora_grad_scale: contiguous [M, N] grad_y, y_unscaled and grad_y_scaled expected");
  TORCH_CHECK(y_unscaled.scalar_type() == grad_y.scalar_type() && grad_y_scaled.scalar_type() == grad_y.scalar_type(),
              "dora_grad_scale: grad_y, y_unscaled and grad_y_scaled must share a dtype");
  const int64_t M = grad_y.size(0), N = grad_y.size(1);
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && g.numel() == N &&
                  column_sums.scalar_type() == at::kFloat && column_sums.is_contiguous() && column_sums.numel() == N,
              "dora_grad_scale: float32 g and column_sums of ", N, " elements expected");
  if (M == 0 || N == 0) return;
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const bool vec = N % 8 == 0 && cuda::aligned16(grad_y.const_data_ptr()) &&
                   cuda::aligned16(y_unscaled.const_data_ptr()) && cuda::aligned16(grad_y_scaled.const_data_ptr());
  // About four blocks per multiprocessor, each over a range of rows.
  const int64_t col_blocks = cuda::ceil_div(N, 8LL * kThreads);
  const int64_t row_splits = std::clamp<int64_t>(cuda::ceil_div(4LL * cuda::sm_count(), col_blocks), 1, 65535);
  const int64_t rows_per_block = cuda::ceil_div(M, row_splits);
  const int64_t splits = cuda::ceil_div(M, rows_per_block);
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(splits));
  TORCH_CHECK(col_blocks <= 0x7fffffff, "dora_grad_scale: N = ", N, " is beyond the grid's reach");
  auto stream = at::cuda::getCurrentCUDAStream();
  cuda::with_half_type(grad_y.scalar_type(), "dora_grad_scale: grad_y", [&](auto tag) {
    using T = decltype(tag);
    cuda::with_bool(vec, [&](auto v) {
      reduce_splits_into(column_sums, splits, [&](float* dst, int64_t split_stride) {
        cuda::launch(dora_grad_scale_kernel<T, decltype(v)::value>, grid, kThreads, 0, stream,
            reinterpret_cast<const T*>(grad_y.const_data_ptr()), reinterpret_cast<const T*>(y_unscaled.const_data_ptr()),
            g.const_data_ptr<float>(), reinterpret_cast<T*>(grad_y_scaled.mutable_data_ptr()), dst, M, N,
            rows_per_block, split_stride);
      });
    });
  });
}

// The CUDA kernel of lrk::dora_grad_scale: one pass over grad_y for bf16/fp16
// with float32 g, ATen otherwise.
std::tuple<at::Tensor, at::Tensor> dora_grad_scale_op_cuda(const at::Tensor& grad_y, const at::Tensor& y_unscaled,
                                                           const at::Tensor& g) {
  check_dora_grad_scale_inputs(grad_y, y_unscaled, g);
  if (!is_half_precision(grad_y.scalar_type()) || g.scalar_type() != at::kFloat) {
    return dora_grad_scale_aten(grad_y, y_unscaled, g);
  }
  const int64_t N = grad_y.size(-1), M = N == 0 ? 0 : grad_y.numel() / N;
  at::Tensor scaled = at::empty({M, N}, grad_y.options());
  at::Tensor column_sums = at::zeros({N}, g.options());
  dora_grad_scale_cuda(grad_y.reshape({M, N}).contiguous(), y_unscaled.reshape({M, N}).contiguous(), g.contiguous(),
                       scaled, column_sums);
  return {scaled.view(grad_y.sizes()), column_sums};
}

LRK_CUDA_KERNELS(m) { m.impl("dora_grad_scale", &dora_grad_scale_op_cuda); }

}  // namespace lrk
