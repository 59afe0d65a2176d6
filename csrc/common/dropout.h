#pragma once
// lrk's Philox dropout (see philox.h for the mask convention).
#include <ATen/ATen.h>

namespace lrk {

// CPU: dropout(x) of a tensor of any shape (row-major logical element order).
at::Tensor philox_dropout_cpu(const at::Tensor& x, double p, int64_t seed);

#if defined(LRK_WITH_CUDA)
at::Tensor philox_dropout_cuda(const at::Tensor& x, double p, int64_t seed);
// t = dropout(t) in place; t contiguous.
void dropout_cuda_(at::Tensor& t, double p, int64_t seed);
#endif

}  // namespace lrk
