// CUDA kernels of the GaLore family: Philox Gaussian fill, int4 dequantisation,
// the elementwise Adam kernels, and the CUDA registration of galore_adamw_step.
// The step's GEMMs are ATen's (cuBLAS; TF32 when torch allows it); see
// galore_step.h for the structure and what remains to fuse.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/cuda_utils.cuh"
#include "galore/galore_checks.h"
#include "galore/galore_random.h"
#include "galore/galore_step.h"

namespace lrk {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cuda::ceil_div(work, kThreads), 16LL * cuda::sm_count())));
}

// One thread per group of 4 elements (one Philox call).
template <typename scalar_t>
__global__ void philox_normal_kernel(scalar_t* out, int64_t n, uint64_t seed, double std) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const Philox4 w = philox_gaussian_words(static_cast<uint64_t>(g), seed);
    double v[4];
    box_muller(w.v[0], w.v[1], v[0], v[1]);
    box_muller(w.v[2], w.v[3], v[2], v[3]);
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      const int64_t e = 4 * g + lane;
      if (e < n) out[e] = static_cast<scalar_t>(v[lane] * std);
    }
  }
}

void philox_normal_cuda(at::Tensor& out, int64_t seed, double std) {
  check_float_tensor(out, "out");
  TORCH_CHECK(out.is_contiguous(), "out: expected a contiguous tensor, got strides ", out.strides());
  check_finite(std, "std");
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "philox_normal_cuda", [&] {
    cuda::launch(philox_normal_kernel<scalar_t>, grid_for((n + 3) / 4), kThreads, 0, stream,
        out.mutable_data_ptr<scalar_t>(), n, static_cast<uint64_t>(seed), std);
  });
}

// out [rank, size] = scale[j, g] * (code - zero[j, g]), g = i / group.
__global__ void dequantize_int4_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales,
                                       const uint8_t* __restrict__ zeros, float* __restrict__ out, int64_t rank,
                                       int64_t size, int64_t pairs, int64_t groups, int64_t group) {
  const int64_t total = rank * size;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = e / size, i = e - j * size;
    const uint8_t byte = packed[j * pairs + (i >> 1)];
    const int code = (i & 1) ? (byte >> 4) : (byte & 0x0F);
    const int64_t slot = j * groups + i / group;
    out[e] = scales[slot] * static_cast<float>(code - static_cast<int>(zeros[slot]));
  }
}

at::Tensor dequantize_int4_t_cuda(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                                  int64_t size, int64_t group_size) {
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t rank = packed.size(0);
  at::Tensor out = at::empty({rank, size}, packed.options().dtype(at::kFloat));
  const int64_t total = rank * size;
  if (total == 0) return out;
  cuda::launch(dequantize_int4_kernel, grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream(),
      packed.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), zeros.const_data_ptr<uint8_t>(),
      out.mutable_data_ptr<float>(), rank, size, packed.size(1), scales.size(1), group_size <= 0 ? size : group_size);
  return out;
}

at::Tensor galore_dequantize_int4_cuda(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                                       int64_t size, int64_t group_size) {
  check_galore_int4(packed, scales, zeros, size, group_size, "packed");
  return dequantize_int4_t_cuda(packed, scales, zeros, size, group_size).t().contiguous();
}

template <typename acc_t>
__global__ void adam_moments_kernel(const acc_t* __restrict__ r, acc_t* __restrict__ m, acc_t* __restrict__ v,
                                    acc_t* __restrict__ out, int64_t n, acc_t b1, acc_t b2, acc_t c1, acc_t c2,
                                    acc_t eps) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t g = r[i];
    const acc_t mi = b1 * m[i] + c1 * g;
    const acc_t vi = b2 * v[i] + c2 * g * g;
    m[i] = mi;
    v[i] = vi;
    out[i] = mi / (sqrt(vi) + eps);
  }
}

void adam_moments_cuda(const at::Tensor& r, at::Tensor& m, at::Tensor& v, at::Tensor& nrm, double beta1, double beta2,
                       double eps) {
  const int64_t n = r.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "galore_adam_moments_cuda", [&] {
    cuda::launch(adam_moments_kernel<scalar_t>, grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream(),
        r.const_data_ptr<scalar_t>(), m.mutable_data_ptr<scalar_t>(), v.mutable_data_ptr<scalar_t>(),
        nrm.mutable_data_ptr<scalar_t>(), n, static_cast<scalar_t>(beta1), static_cast<scalar_t>(beta2),
        static_cast<scalar_t>(1.0 - beta1), static_cast<scalar_t>(1.0 - beta2), static_cast<scalar_t>(eps));
  });
}

template <typename scalar_t, typename acc_t>
__global__ void adam_full_kernel(scalar_t* __restrict__ w, const scalar_t* __restrict__ grad, acc_t* __restrict__ m,
                                 acc_t* __restrict__ v, int64_t n, acc_t b1, acc_t b2, acc_t c1, acc_t c2, acc_t eps,
                                 acc_t step_size, acc_t decay) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t g = static_cast<acc_t>(grad[i]);
    const acc_t mi = b1 * m[i] + c1 * g;
    const acc_t vi = b2 * v[i] + c2 * g * g;
    m[i] = mi;
    v[i] = vi;
    const acc_t t = static_cast<acc_t>(w[i]) - step_size * (mi / (sqrt(vi) + eps));
    w[i] = static_cast<scalar_t>(t - decay * t);
  }
}

void adam_full_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& m, at::Tensor& v, double beta1,
                    double beta2, double eps, double step_size, double decay) {
  const int64_t n = param.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "galore_adam_full_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::launch(adam_full_kernel<scalar_t, acc_t>, grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream(),
        param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), m.mutable_data_ptr<acc_t>(),
        v.mutable_data_ptr<acc_t>(), n, static_cast<acc_t>(beta1), static_cast<acc_t>(beta2),
        static_cast<acc_t>(1.0 - beta1), static_cast<acc_t>(1.0 - beta2), static_cast<acc_t>(eps),
        static_cast<acc_t>(step_size), static_cast<acc_t>(decay));
  });
}

template <typename scalar_t, typename acc_t>
__global__ void apply_update_kernel(scalar_t* __restrict__ w, const acc_t* __restrict__ u, int64_t n, acc_t step_size,
                                    acc_t decay) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t t = static_cast<acc_t>(w[i]) - step_size * u[i];
    w[i] = static_cast<scalar_t>(t - decay * t);
  }
}

void apply_update_cuda(at::Tensor& param, const at::Tensor& update, double step_size, double decay) {
  const int64_t n = param.numel();
  if (n == 0) return;
  const at::Tensor u = update.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "galore_apply_update_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    cuda::launch(apply_update_kernel<scalar_t, acc_t>, grid_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream(),
        param.mutable_data_ptr<scalar_t>(), u.const_data_ptr<acc_t>(), n, static_cast<acc_t>(step_size),
        static_cast<acc_t>(decay));
  });
}

const GaloreKernels kCudaKernels{&adam_moments_cuda, &adam_full_cuda, &apply_update_cuda, &dequantize_int4_t_cuda};

void galore_adamw_step_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                            const std::optional<at::Tensor>& proj, const std::optional<at::Tensor>& proj_scales,
                            const std::optional<at::Tensor>& proj_zeros, int64_t quant_group_size, bool left,
                            int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                            double scale, bool correct_bias, const std::optional<at::Tensor>& low_rank_grad, bool fira,
                            const std::optional<at::Tensor>& fira_prev_norm) {
  check_float_tensor(param, "param");
  const c10::cuda::CUDAGuard guard(param.device());
  galore_adamw_step_impl(kCudaKernels, param, grad, exp_avg, exp_avg_sq, proj, proj_scales, proj_zeros,
                         quant_group_size, left, step, lr, beta1, beta2, eps, weight_decay, scale, correct_bias,
                         low_rank_grad, fira, fira_prev_norm);
}

}  // namespace

LRK_CUDA_KERNELS(m) {
  m.impl("philox_normal_", &philox_normal_cuda);
  m.impl("galore_dequantize_int4", &galore_dequantize_int4_cuda);
  m.impl("galore_adamw_step", &galore_adamw_step_cuda);
}

}  // namespace lrk
