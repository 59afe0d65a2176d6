// concat_k_gemm kernels whose second factors are stored [K, Nout] (backward: dx = [dy | dh] @ [W ; A]).
#include "lora/sm90/concat_k_gemm_kernel.cuh"

namespace lrk::sm90 {
template void run_concat_k_gemm<at::BFloat16, FactorLayout::kReductionByOutputs>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, at::Tensor&);
template void run_concat_k_gemm<at::Half, FactorLayout::kReductionByOutputs>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, at::Tensor&);
}  // namespace lrk::sm90
