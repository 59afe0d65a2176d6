#pragma once
// Truncated SVD by a randomized range finder (Halko, Martinsson and Tropp), on
// any device: kpsvd's randomized path and the GaLore rsvd projector.
#include <ATen/ATen.h>

#include <tuple>

namespace lrk {

// The leading `rank` singular triplets of a [n, m] from the sketch a @ omega
// (omega [m, l], rank <= l <= min(n, m), drawn by the caller so that every
// device sees the same numbers) and `power_iters` power iterations:
// (u [n, rank], s [rank], vh [rank, m]) in a's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> randomized_svd(const at::Tensor& a, const at::Tensor& omega,
                                                              int64_t rank, int64_t power_iters);

}  // namespace lrk
