// concat_k_gemm kernels whose second factors are stored [Nout, K] (forward: y = [x | h] @ [W | s*B]^T),
// with the plain epilogue and with DoRA's (g * acc + bias, acc kept).
#include "lora/sm90/concat_k_gemm_kernel.cuh"

namespace lrk::sm90 {
template void run_concat_k_gemm<at::BFloat16, FactorLayout::kOutputsByReduction>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, at::Tensor&);
template void run_concat_k_gemm<at::Half, FactorLayout::kOutputsByReduction>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, const at::Tensor&, at::Tensor&);
template void run_concat_k_gemm_dora<at::BFloat16>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                    const at::Tensor&, const at::Tensor&, const at::Tensor*,
                                                    at::Tensor&, at::Tensor&);
template void run_concat_k_gemm_dora<at::Half>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor*, at::Tensor&,
                                               at::Tensor&);
}  // namespace lrk::sm90
