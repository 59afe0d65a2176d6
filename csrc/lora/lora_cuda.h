#pragma once
// Entry points of lora_cuda.cu for other ops of the family (CUDA builds only).
#include <ATen/ATen.h>

#include <optional>

#include "lora/lora_checks.h"

namespace lrk {

// DoRA's forward on Hopper as one GEMM (lora/sm90/concat_k_gemm.h):
//   y_unscaled = [x | h] @ [W | s*B]^T,  y = g[n] * y_unscaled + bias[n]   (g: float32 [N])
// plus h for the backward. The inputs are the caller's, already checked (d: their
// dims). False, with nothing written, when the device, the build or the operands do
// not take that path (the caller then composes it).
bool dora_forward_hopper(const LoraDims& d, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& g, double scale,
                         double dropout_p, int64_t seed, at::Tensor& y, at::Tensor& h, at::Tensor& y_unscaled);

}  // namespace lrk
