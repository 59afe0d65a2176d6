#pragma once
// Reduced QR of tall-skinny matrices for the randomized range finders (kpsvd,
// the GaLore rsvd projector), on any device.
#include <ATen/ATen.h>

#include <tuple>

namespace lrk {

// a [n, l] with n >= l -> (q [n, l] with orthonormal columns, r [l, l] upper
// triangular), a = q @ r, both in a's dtype.
std::tuple<at::Tensor, at::Tensor> tall_skinny_qr(const at::Tensor& a);

// The q of tall_skinny_qr(a): an orthonormal basis of a's columns.
inline at::Tensor orthonormal_basis(const at::Tensor& a) { return std::get<0>(tall_skinny_qr(a)); }

}  // namespace lrk
