#pragma once
// Memory-bound "skinny" products with one small dimension (a rank), on tensor
// cores (WMMA, sm_80+), bf16/fp16 operands, fp32 accumulation into an fp32 output
// that the caller zeroes first (blocks split the long reduction and add atomically,
// or in a fixed order under torch.use_deterministic_algorithms: split_reduce.h).
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

// Both LoRA backward products from one read of X [M, K] (dy; two reads, by the two
// kernels above, under torch.use_deterministic_algorithms):
//   rows_out[M, R] += alpha * X @ Bop       Bop [K, R]   (dh = s * dy @ B)
//   cols_out[R, K] += alpha * D^T @ X       D [M, R]     (dB^T = s * h^T @ dy)
void skinny_rows_cols_gemm_cuda(const at::Tensor& X, const at::Tensor& Bop, const at::Tensor& D,
                                at::Tensor& rows_out, at::Tensor& cols_out, double alpha);

// out[M, K] = alpha * dropout(D[M, R] @ Bop[R, K]), written once (not accumulated):
// LoRA's dx term dropout_bwd(dh @ A), the mask applied on the way out. out has D's dtype.
void skinny_expand_gemm_cuda(const at::Tensor& D, const at::Tensor& Bop, at::Tensor& out, double alpha,
                             const DropoutParams& drop);

}  // namespace lrk
