// Operand checks and dtype/layout dispatch of the Hopper concatenated-K GEMM.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "lora/sm90/concat_k_gemm.h"

namespace lrk::sm90 {
namespace {

bool tma_ready(const at::Tensor& t) {
  const int64_t elems_per_16_bytes = 16 / t.element_size();
  return t.dim() == 2 && t.stride(1) == 1 && t.stride(0) % elems_per_16_bytes == 0 &&
         t.stride(0) >= t.size(1) && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

}  // namespace

bool concat_k_gemm_supported(const at::Tensor& a, const at::Tensor& b, const at::Tensor* a2, int64_t k2,
                             const at::Tensor* b2, FactorLayout layout, const at::Tensor& out) {
  const auto dtype = a.scalar_type();
  if (!a.is_cuda() || (dtype != at::kBFloat16 && dtype != at::kHalf)) return false;
  for (const at::Tensor* t : {&b, a2, b2, &out}) {
    if (t == nullptr) continue;  // allocated later by the caller, as the header says
    if (t->scalar_type() != dtype || t->device() != a.device() || !tma_ready(*t)) return false;
  }
  if (!tma_ready(a)) return false;
  const auto* props = at::cuda::getDeviceProperties(a.get_device());
  if (props->major != 9 || props->minor != 0) return false;
  // The problem extents must fit the kernel's int coordinates.
  const int64_t int_max = std::numeric_limits<int>::max();
  const int64_t M = a.size(0), K = a.size(1), N = out.size(1);
  if (M <= 0 || K <= 0 || N <= 0 || M > int_max || K > int_max / 2 || N > int_max) return false;
  if (k2 <= 0 || k2 > 256 || out.size(0) != M) return false;
  if (a2 != nullptr && (a2->size(0) != M || a2->size(1) < k2)) return false;
  if (layout == FactorLayout::kOutputsByReduction) {
    return b.size(0) == N && b.size(1) == K && (b2 == nullptr || (b2->size(0) == N && b2->size(1) >= k2));
  }
  return b.size(0) == K && b.size(1) == N && (b2 == nullptr || (b2->size(0) >= k2 && b2->size(1) == N));
}

bool concat_k_gemm_supported(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                             const at::Tensor& b2, FactorLayout layout, const at::Tensor& out) {
  return concat_k_gemm_supported(a, b, &a2, k2, &b2, layout, out);
}

void concat_k_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                   const at::Tensor& b2, FactorLayout layout, at::Tensor& out) {
  TORCH_CHECK(concat_k_gemm_supported(a, b, a2, k2, b2, layout, out),
              "lrk concat_k_gemm: operands not supported (caller must check concat_k_gemm_supported)");
  const c10::cuda::CUDAGuard guard(a.device());
  const bool bf16 = a.scalar_type() == at::kBFloat16;
  if (layout == FactorLayout::kOutputsByReduction) {
    if (bf16) {
      run_concat_k_gemm<at::BFloat16, FactorLayout::kOutputsByReduction>(a, b, a2, k2, b2, out);
    } else {
      run_concat_k_gemm<at::Half, FactorLayout::kOutputsByReduction>(a, b, a2, k2, b2, out);
    }
  } else {
    if (bf16) {
      run_concat_k_gemm<at::BFloat16, FactorLayout::kReductionByOutputs>(a, b, a2, k2, b2, out);
    } else {
      run_concat_k_gemm<at::Half, FactorLayout::kReductionByOutputs>(a, b, a2, k2, b2, out);
    }
  }
}

void concat_k_gemm_dora(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                        const at::Tensor& b2, const at::Tensor& g, const std::optional<at::Tensor>& bias,
                        at::Tensor& out, at::Tensor& out_unscaled) {
  const auto layout = FactorLayout::kOutputsByReduction;
  TORCH_CHECK(concat_k_gemm_supported(a, b, a2, k2, b2, layout, out) &&
                  concat_k_gemm_supported(a, b, a2, k2, b2, layout, out_unscaled),
              "lrk concat_k_gemm_dora: operands not supported (caller must check concat_k_gemm_supported)");
  const int64_t N = out.size(1);
  TORCH_CHECK(out_unscaled.strides() == out.strides(), "lrk concat_k_gemm_dora: out_unscaled must be strided like out");
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && g.numel() == N && g.device() == a.device() &&
                  reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 == 0,
              "lrk concat_k_gemm_dora: g must be a contiguous, 16-byte aligned float32 [", N, "] on a's device");
  const at::Tensor* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == a.scalar_type() && bias->is_contiguous() && bias->numel() == N &&
                    bias->device() == a.device() && reinterpret_cast<uintptr_t>(bias->data_ptr()) % 16 == 0,
                "lrk concat_k_gemm_dora: bias must be a contiguous, 16-byte aligned [", N, "] of a's dtype");
    bias_ptr = &*bias;
  }
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.scalar_type() == at::kBFloat16) {
    run_concat_k_gemm_dora<at::BFloat16>(a, b, a2, k2, b2, g, bias_ptr, out, out_unscaled);
  } else {
    run_concat_k_gemm_dora<at::Half>(a, b, a2, k2, b2, g, bias_ptr, out, out_unscaled);
  }
}

}  // namespace lrk::sm90
