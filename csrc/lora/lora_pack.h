#pragma once
// Small operands for the Hopper LoRA path (lora_cuda.cu): the rank-r factors
// laid out as the extra K columns of the concatenated GEMM, with row pitches
// that TMA accepts (multiples of 8 elements).
#include <ATen/ATen.h>

namespace lrk {

// Row pitch of an operand of `cols` columns that TMA can read: a multiple of 8.
inline int64_t tma_pitch(int64_t cols) { return (cols + 7) / 8 * 8; }

// From src [M, c] (fp32), in the dtype of `packed` [M, >= c + ones_column]:
//   packed[m, :] = [src[m, :] | 1 if ones_column | 0 ...]
//   plain[m, :]  = src[m, :]   (when plain is given: [M, c], contiguous)
// Each value is rounded once, unscaled: LoRA's scale goes with B (lora_cuda.cu),
// since s * h can leave fp16's range where h does not.
void pack_rows_cuda(const at::Tensor& src, bool ones_column, at::Tensor& packed, at::Tensor* plain);

}  // namespace lrk
