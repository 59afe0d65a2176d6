#pragma once
// Memory-bound "skinny" products with one small dimension (a rank), on tensor
// cores (WMMA, sm_80+), bf16/fp16 operands, fp32 accumulation into an fp32 output
// that the caller zeroes first (blocks split the long reduction and add atomically).
// An optional Philox dropout is applied to X as it is loaded (never stored).
#include <ATen/ATen.h>

#include "common/philox.h"

namespace lrk {

// out[M, R] += alpha * dropout(X)[M, K] @ Bop[R, K]^T      (LoRA shrink: h, dh)
void skinny_rows_gemm_cuda(const at::Tensor& X, const at::Tensor& Bop, at::Tensor& out, double alpha,
                           const DropoutParams& drop);

// out[R, K] += alpha * D[M, R]^T @ dropout(X)[M, K]        (reduction over rows: dA, dB^T)
void skinny_cols_gemm_cuda(const at::Tensor& D, const at::Tensor& X, at::Tensor& out, double alpha,
                           const DropoutParams& drop);

}  // namespace lrk
