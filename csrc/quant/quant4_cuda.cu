// CUDA kernels of the 4-bit weight ops (any sm_80+ GPU): linear_4bit,
// linear_4bit_grad_input and dequantize_absmax (schemas and layout in
// registration.cpp). The products pick a kernel by the number of rows:
//   M <= kQuant4SmallM: the weight-streaming kernels (quant4_small_m.cu);
//   larger M: the tiled kernels (quant4_tiled.cu), WMMA for bf16/fp16.
// Neither forms the dequantized weight. Inputs of any layout are made contiguous.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/autocast.h"
#include "common/cuda_utils.cuh"
#include "quant/quant4_checks.h"
#include "quant/quant4_cuda.h"
#include "quant/quant4_device.cuh"

namespace lrk {
namespace {

int log2_exact(int64_t v) {
  int s = 0;
  while ((int64_t(1) << s) < v) ++s;
  return s;
}

// The shared body of both products: `act` [..., reduction] -> [..., output].
at::Tensor quant4_product(const at::Tensor& act, std::string_view act_name, const at::Tensor& packed,
                          const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize, int64_t out_features,
                          int64_t in_features, bool transposed) {
  LRK_NO_AUTOCAST();
  const Weight4bitDims d =
      check_weight_4bit(packed, absmax, code, blocksize, out_features, in_features, act, act_name);
  const int64_t reduction = transposed ? out_features : in_features;
  const int64_t output = transposed ? in_features : out_features;
  const int64_t M =
      check_linear_4bit_input(act, act_name, reduction, transposed ? "out_features" : "in_features");
  TORCH_CHECK(cuda::on_kernel_device(act), act_name, ": expected a CUDA tensor, got one on ", act.device());
  const c10::cuda::CUDAGuard guard(act.device());
  at::Tensor out = at::empty({M, output}, act.options());
  if (M > 0) {
    Quant4Product p;
    p.act = act.reshape({M, reduction}).contiguous();
    p.out = out;
    p.packed = packed;
    p.absmax = absmax;
    p.code = code;
    p.rows = d.rows;
    p.cols = d.cols;
    p.blocks = d.blocks;
    p.shift = log2_exact(d.blocksize);
    p.transposed = transposed;
    if (M <= kQuant4SmallM) {
      quant4_small_m_cuda(p);
    } else {
      quant4_tiled_cuda(p);
    }
  }
  return out.reshape(with_last_dim(act, output));
}

at::Tensor linear_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const at::Tensor& code, int64_t blocksize, int64_t out_features, int64_t in_features) {
  return quant4_product(x, "x", packed, absmax, code, blocksize, out_features, in_features, false);
}

at::Tensor linear_4bit_grad_input_cuda(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                                       const at::Tensor& code, int64_t blocksize, int64_t out_features,
                                       int64_t in_features) {
  return quant4_product(grad_y, "grad_y", packed, absmax, code, blocksize, out_features, in_features, true);
}

constexpr int kAbsmaxThreads = 256;

// absmax[j] = code2[absmax_q[j]] * absmax2[j / blocksize2] + offset, in float32 as bitsandbytes.
__global__ void dequantize_absmax_kernel(const uint8_t* __restrict__ absmax_q, const float* __restrict__ absmax2,
                                         const float* __restrict__ code2, float* __restrict__ out, int64_t n,
                                         int64_t blocksize2, float offset) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < n; j += int64_t(gridDim.x) * blockDim.x) {
    // no FMA: the product is rounded before the offset is added, as the reference does
    out[j] = quant4::mul_add_rn(code2[absmax_q[j]], absmax2[j / blocksize2], offset);
  }
}

at::Tensor dequantize_absmax_cuda(const at::Tensor& absmax_q, const at::Tensor& absmax2, const at::Tensor& code2,
                                  int64_t blocksize2, double offset) {
  check_absmax_8bit(absmax_q, absmax2, code2, blocksize2, offset);
  TORCH_CHECK(cuda::on_kernel_device(absmax_q), "absmax_q: expected a CUDA tensor, got one on ", absmax_q.device());
  const c10::cuda::CUDAGuard guard(absmax_q.device());
  const at::Tensor q = absmax_q.contiguous(), a2 = absmax2.contiguous(), c2 = code2.contiguous();
  at::Tensor out = at::empty(absmax_q.sizes(), absmax_q.options().dtype(at::kFloat));
  const int64_t n = q.numel();
  if (n == 0) return out;
  const int64_t grid = std::min<int64_t>(cuda::ceil_div(n, kAbsmaxThreads), 8LL * cuda::sm_count());
  cuda::launch(dequantize_absmax_kernel, static_cast<unsigned>(grid), kAbsmaxThreads, 0,
               at::cuda::getCurrentCUDAStream(), q.const_data_ptr<uint8_t>(), a2.const_data_ptr<float>(),
               c2.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n, blocksize2, static_cast<float>(offset));
  return out;
}

}  // namespace

LRK_CUDA_KERNELS(m) {
  m.impl("linear_4bit", &linear_4bit_cuda);
  m.impl("linear_4bit_grad_input", &linear_4bit_grad_input_cuda);
  m.impl("dequantize_absmax", &dequantize_absmax_cuda);
}

}  // namespace lrk
