// CUDA kernels of lrk's Philox dropout: lrk::philox_dropout, and the in-place
// variant that the LoRA backward applies to its dx term.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/cuda_utils.cuh"
#include "common/dropout.h"
#include "common/philox.h"
#include "common/autocast.h"

namespace lrk {
namespace {

// One thread per group of 4 consecutive elements: one Philox call per group.
// out = dropout(in); in and out may be the same buffer.
template <typename scalar_t, typename acc_t>
__global__ void dropout_kernel(const scalar_t* in, scalar_t* out, int64_t n,
                               uint64_t seed, uint32_t threshold, acc_t scale) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * blockDim.x) {
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(g), seed);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t e = 4 * g + lane;
      if (e < n) {
        out[e] = static_cast<scalar_t>(r.v[lane] >= threshold ? static_cast<acc_t>(in[e]) * scale : acc_t(0));
      }
    }
  }
}

void run_dropout(const at::Tensor& in, at::Tensor& out, double p, int64_t seed) {
  const int64_t n = in.numel();
  if (n == 0) return;
  const DropoutParams d = make_dropout_params(p, seed);
  constexpr int kThreads = 256;
  const int64_t groups = (n + 3) / 4;
  const int blocks = static_cast<int>(std::min<int64_t>(cuda::ceil_div(groups, kThreads), 16LL * cuda::sm_count()));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "lrk_dropout", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(dropout_kernel<scalar_t, acc_t>, blocks, kThreads, 0, stream,
        in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, d.seed, d.threshold,
        static_cast<acc_t>(d.scale));
  });
}

}  // namespace

at::Tensor philox_dropout_cuda(const at::Tensor& x, double p, int64_t seed) {
  LRK_NO_AUTOCAST();
  check_float_tensor(x, "x");
  check_probability(p, "p");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  run_dropout(xc, out, p, seed);
  return out;
}

void dropout_cuda_(at::Tensor& t, double p, int64_t seed) {
  TORCH_CHECK(t.is_contiguous(), "dropout_cuda_: a contiguous tensor expected");
  run_dropout(t, t, p, seed);
}

LRK_CUDA_KERNELS(m) { m.impl("philox_dropout", &philox_dropout_cuda); }

}  // namespace lrk
