#pragma once
// lrk's Philox dropout (see philox.h for the mask convention).
#include <ATen/ATen.h>

namespace lrk {

// CPU: dropout(x) of a tensor of any shape (row-major logical element order).
at::Tensor philox_dropout_cpu(const at::Tensor& x, double p, int64_t seed);

#if defined(LRK_WITH_CUDA)
at::Tensor philox_dropout_cuda(const at::Tensor& x, double p, int64_t seed);
// out += dropout(t), elementwise; out and t contiguous, same shape and dtype.
void dropout_add_cuda_(at::Tensor& out, const at::Tensor& t, double p, int64_t seed);
#endif

}  // namespace lrk
