#pragma once
// Hopper (sm_90a) GEMMs whose reduction runs over two operand pairs at once,
// out = a @ op(b) + a2[:, :k2] @ op(b2), without concatenating them in memory
// (see concat_k_mainloop.cuh). Declarations only: the portable CUDA code calls
// these when the build has sm_90a kernels (LRK_HAVE_SM90_KERNELS) and the
// device is a Hopper GPU, and never includes CUTLASS itself.
#include <ATen/ATen.h>

namespace lrk::sm90 {

// How the second factor of each product is stored (both pairs alike).
enum class FactorLayout {
  kOutputsByReduction,  // b [Nout, K], b2 [Nout, k2] rows (nn.Linear weights): out = a @ b^T + a2 @ b2^T
  kReductionByOutputs,  // b [K, Nout], b2 [k2, Nout]:                           out = a @ b   + a2 @ b2
};

// Whether the concatenated-K GEMM can take these operands: a Hopper device,
// bf16 or fp16 throughout, unit inner strides, row pitches that are multiples
// of 8 elements and 16-byte aligned bases (what TMA needs), 0 < k2 <= 256.
bool concat_k_gemm_supported(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                             const at::Tensor& b2, FactorLayout layout, const at::Tensor& out);
// The same check before the caller allocates a2 and/or b2 (passed as nullptr):
// an operand the caller then allocates contiguous, in a's dtype on a's device,
// shaped as above with a row pitch that is a multiple of 8 elements (fresh
// allocations are 16-byte aligned) always suits the kernel, so only the
// others are checked. concat_k_gemm checks every operand again.
bool concat_k_gemm_supported(const at::Tensor& a, const at::Tensor& b, const at::Tensor* a2, int64_t k2,
                             const at::Tensor* b2, FactorLayout layout, const at::Tensor& out);

// out [M, Nout] (row-major, written, never read) = a [M, K] @ op(b) + a2[:, :k2] @ op(b2),
// fp32 accumulation. a2 may be wider than k2 (padded rows): its extra columns are not read.
void concat_k_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                   const at::Tensor& b2, FactorLayout layout, at::Tensor& out);

// DoRA's forward in the same GEMM (second factors stored [Nout, K]):
//   out_unscaled = a @ b^T + a2[:, :k2] @ b2^T,   out = g[n] * out_unscaled + bias[n]
// with out computed from the fp32 accumulator (rounded once). g: float32 [Nout];
// bias: null or [Nout] in a's dtype; out_unscaled shaped and strided like out.
void concat_k_gemm_dora(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                        const at::Tensor& b2, const at::Tensor& g, const std::optional<at::Tensor>& bias,
                        at::Tensor& out, at::Tensor& out_unscaled);

// The kernels, instantiated per element type and layout in their own
// translation units (each CUTLASS kernel is a long compile).
template <class T, FactorLayout kLayout>
void run_concat_k_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                       const at::Tensor& b2, at::Tensor& out);
template <class T>
void run_concat_k_gemm_dora(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a2, int64_t k2,
                            const at::Tensor& b2, const at::Tensor& g, const at::Tensor* bias, at::Tensor& out,
                            at::Tensor& out_unscaled);

}  // namespace lrk::sm90
