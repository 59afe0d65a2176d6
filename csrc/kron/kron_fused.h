#pragma once
// One CUDA kernel for the whole Kronecker adapter forward (all terms), bf16/fp16,
// sm_80+: every row of x is read once into shared memory, each term's two small
// products run on tensor cores from shared memory, the sum over terms stays in
// registers, and y is written once (plus bias). For factor shapes whose sizes are
// multiples of 16, up to 64 x 64 output tiles, and factors that fit in shared
// memory (4096 x 4096 as 64x64 ⊗ 64x64: up to 7 terms on A100, 10 on H100); other
// shapes take the portable path.
#include <ATen/ATen.h>

#include <optional>

#include "kron/kron_checks.h"

namespace lrk {

// True when kron_fused_forward_cuda handles these inputs (dtype, shapes, alignment,
// shared memory of the current device), and LRK_KRON_FUSED is not "0".
bool kron_fused_supported(const at::Tensor& x2, const KronDims& d);

// y2 [M, N] = bias + sum_t coef_t (u_t ⊗ v_t) x2 row by row. x2 [M, K] contiguous,
// u, v contiguous in x2's dtype, coef [k] float32, y2 [M, N] contiguous (written).
void kron_fused_forward_cuda(const at::Tensor& x2, const at::Tensor& u, const at::Tensor& v, const at::Tensor& coef,
                             const std::optional<at::Tensor>& bias, at::Tensor& y2, const KronDims& d);

}  // namespace lrk
