// pack_rows_cuda (see lora_pack.h).
#include <c10/cuda/CUDAGuard.h>

#include "common/cuda_utils.cuh"
#include "common/dispatch.cuh"
#include "lora/lora_pack.h"

namespace lrk {
namespace {

template <typename T>
__global__ void pack_rows_kernel(const float* __restrict__ src, int64_t rows, int cols, bool ones_column, int pitch,
                                 T* __restrict__ packed, T* __restrict__ plain) {
  const int64_t n = rows * pitch;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / pitch;
    const int j = static_cast<int>(i - m * pitch);
    T value = cuda::from_float<T>(0.f);
    if (j < cols) {
      value = cuda::from_float<T>(src[m * cols + j]);
      if (plain != nullptr) plain[m * cols + j] = value;
    } else if (j == cols && ones_column) {
      value = cuda::from_float<T>(1.f);
    }
    packed[i] = value;
  }
}

}  // namespace

void pack_rows_cuda(const at::Tensor& src, bool ones_column, at::Tensor& packed, at::Tensor* plain) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.dim() == 2 && src.is_contiguous(),
              "pack_rows: src must be a contiguous 2-D float32 tensor");
  const int64_t rows = src.size(0), cols = src.size(1);
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.size(0) == rows &&
                  packed.size(1) >= cols + (ones_column ? 1 : 0),
              "pack_rows: packed must be contiguous [", rows, ", >= ", cols + (ones_column ? 1 : 0), "]");
  if (plain != nullptr) {
    TORCH_CHECK(plain->is_contiguous() && plain->sizes() == src.sizes() &&
                    plain->scalar_type() == packed.scalar_type(),
                "pack_rows: plain must be contiguous, shaped like src, typed like packed");
  }
  if (packed.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(src.device());
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>(cuda::ceil_div(packed.numel(), threads), 8LL * cuda::sm_count());
  cuda::with_half_type(packed.scalar_type(), "pack_rows: packed", [&](auto tag) {
    using T = decltype(tag);
    cuda::launch(pack_rows_kernel<T>, blocks, threads, 0, at::cuda::getCurrentCUDAStream(),
        src.data_ptr<float>(), rows, static_cast<int>(cols), ones_column, static_cast<int>(packed.size(1)),
        reinterpret_cast<T*>(packed.data_ptr()), plain != nullptr ? reinterpret_cast<T*>(plain->data_ptr()) : nullptr);
  });
}

}  // namespace lrk
