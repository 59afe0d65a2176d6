// Kernels with planted bugs, and their correct versions, that the emulator
// must tell apart (tests/test_emulator.py). Built into the emulated library
// only: op lrk_emu::emu_selftest(name, x, buggy).
#include <torch/library.h>

#include <string>

#include "common/async_copy.cuh"
#include "common/cuda_utils.cuh"

namespace lrk {
namespace {

constexpr int kThreads = 64;

// y[i] = x[n-1-i] within one block through shared memory; the buggy version
// drops the barrier between the writes and the reads.
__global__ void reverse_kernel(const float* x, float* y, bool buggy) {
  LRK_SHARED(16, float, s, [kThreads]);
  const int i = threadIdx.x;
  s[i] = x[i];
  if (!buggy) __syncthreads();
  y[i] = s[kThreads - 1 - i];
}

// y[i] = 2 x[i]; the buggy version writes one element past the shared array.
__global__ void shared_overflow_kernel(const float* x, float* y, bool buggy) {
  LRK_SHARED(16, float, s, [kThreads]);
  const int i = threadIdx.x;
  s[buggy ? i + 1 : i] = x[i];
  __syncthreads();
  y[i] = 2.f * s[i];
}

// y[w] = sum of the 32 values of warp w; the buggy version shuffles from the
// next lane instead of the xor partner.
__global__ void warp_sum_kernel(const float* x, float* y, bool buggy) {
  float v = x[threadIdx.x];
  const int lane = threadIdx.x % 32;
  for (int o = 16; o > 0; o >>= 1) {
    v += buggy ? __shfl_sync(0xffffffffu, v, (lane + 1) % 32) : __shfl_xor_sync(0xffffffffu, v, o);
  }
  if (lane == 0) y[threadIdx.x / 32] = v;
}

// y[i] = s[i] + s[(i + 1) % n]; the buggy version never writes the last slot.
__global__ void unwritten_shared_kernel(const float* x, float* y, bool buggy) {
  LRK_SHARED(16, float, s, [kThreads]);
  const int i = threadIdx.x;
  if (!buggy || i < kThreads - 1) s[i] = x[i];
  __syncthreads();
  y[i] = s[i] + s[(i + 1) % kThreads];
}

// y = x staged through shared memory with cp.async; the buggy version reads
// the staged values before waiting for the copy.
__global__ void async_copy_kernel(const float* x, float* y, bool buggy) {
  LRK_SHARED(16, float, s, [kThreads]);
  const int i = threadIdx.x;
  if (i % 4 == 0) cuda::cp_async_16(&s[i], &x[i]);
  cuda::cp_async_commit();
  if (!buggy) cuda::cp_async_wait<0>();
  __syncthreads();
  y[i] = s[i];
  if (buggy) cuda::cp_async_wait<0>();
}

at::Tensor emu_selftest(const std::string& name, const at::Tensor& x, bool buggy) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 1 && x.numel() == kThreads && x.is_contiguous(),
              "emu_selftest: x must be a contiguous float32 vector of ", kThreads, " elements");
  at::Tensor y = at::full({kThreads}, std::numeric_limits<float>::quiet_NaN(), x.options());
  const float* xp = x.const_data_ptr<float>();
  float* yp = y.mutable_data_ptr<float>();
  auto stream = at::cuda::getCurrentCUDAStream();
  if (name == "missing_syncthreads") {
    cuda::launch(reverse_kernel, 1, kThreads, 0, stream, xp, yp, buggy);
  } else if (name == "shared_overflow") {
    cuda::launch(shared_overflow_kernel, 1, kThreads, 0, stream, xp, yp, buggy);
  } else if (name == "wrong_shuffle_lane") {
    cuda::launch(warp_sum_kernel, 1, kThreads, 0, stream, xp, yp, buggy);
    return y.narrow(0, 0, kThreads / 32).clone();
  } else if (name == "unwritten_shared") {
    cuda::launch(unwritten_shared_kernel, 1, kThreads, 0, stream, xp, yp, buggy);
  } else if (name == "async_copy_without_wait") {
    cuda::launch(async_copy_kernel, 1, kThreads, 0, stream, xp, yp, buggy);
  } else {
    TORCH_CHECK(false, "emu_selftest: unknown case '", name, "'");
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lrk_emu, m) { m.def("emu_selftest(str name, Tensor x, bool buggy) -> Tensor", &emu_selftest); }

}  // namespace lrk
