// Projector refresh ops of the GaLore family (ops.md section 3): exact SVD,
// randomized range finder, DCT-II selection, seeded random projection, int4
// storage and the projection itself. Each is a composition of ATen ops that is
// already the efficient formulation on a GPU (GEMMs, QR and SVD of small
// matrices, one FFT), so one implementation, registered as
// CompositeExplicitAutograd, serves every device; the random numbers come from
// lrk::philox_normal_, whose CPU and CUDA kernels draw the same values.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>

#include "common/randomized_svd.h"
#include "galore/galore_checks.h"

namespace lrk {
namespace {

constexpr double kPi = 3.14159265358979323846264338327950288;

void check_projector_inputs(const at::Tensor& grad, int64_t rank) {
  check_galore_grad(grad);
  check_galore_rank(rank, grad);
}

// The matrix whose leading left singular vectors form the projector: grad for a
// left projection, grad^T for a right one.
at::Tensor oriented(const at::Tensor& grad, bool left) {
  const at::Tensor g = grad.to(galore_acc_dtype(grad.scalar_type()));
  return left ? g : g.t();
}

// Singular vectors are defined up to sign; fix each column's sign so that its
// entry of largest magnitude (the first one on ties) is positive. With kept
// moments across refreshes, a flipped column would reverse its momentum.
at::Tensor canonical_signs(at::Tensor p) {
  const at::Tensor idx = p.abs().argmax(0, true);  // [1, rank]
  const at::Tensor lead = p.gather(0, idx);
  return p.mul_(at::where(lead < 0, -1.0, 1.0).to(p.scalar_type()));
}

void fill_gaussian(at::Tensor& out, int64_t seed, double std) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrk::philox_normal_", "")
                       .typed<void(at::Tensor&, int64_t, double)>();
  op.call(out, seed, std);
}

at::Tensor galore_svd_projector(const at::Tensor& grad, int64_t rank, bool left) {
  check_projector_inputs(grad, rank);
  const at::Tensor a = oriented(grad, left);
  const at::Tensor u = std::get<0>(at::linalg_svd(a, false));
  return canonical_signs(u.narrow(1, 0, rank).contiguous());
}

at::Tensor galore_rsvd_projector(const at::Tensor& grad, int64_t rank, bool left, int64_t oversample,
                                 int64_t power_iters, int64_t seed) {
  check_projector_inputs(grad, rank);
  TORCH_CHECK(oversample >= 0, "oversample: expected an integer >= 0, got ", oversample);
  TORCH_CHECK(power_iters >= 0 && power_iters <= 64, "power_iters: expected an integer in [0, 64], got ", power_iters);
  const at::Tensor a = oriented(grad, left);  // [size, other]
  const int64_t k = std::min(rank + oversample, std::min(a.size(0), a.size(1)));
  at::Tensor omega = at::empty({a.size(1), k}, a.options().memory_format(at::MemoryFormat::Contiguous));
  fill_gaussian(omega, seed, 1.0);
  return canonical_signs(std::get<0>(randomized_svd(a, omega, rank, power_iters)));
}

at::Tensor galore_random_projector(const at::Tensor& grad, int64_t rank, bool left, int64_t seed) {
  check_projector_inputs(grad, rank);
  at::Tensor out = at::empty({galore_proj_size(grad, left), rank},
                             grad.options().dtype(galore_acc_dtype(grad.scalar_type())));
  fill_gaussian(out, seed, 1.0 / std::sqrt(static_cast<double>(rank)));
  return out;
}

// Scores of the orthonormal DCT-II basis vectors along dim d of g (length N):
// score_k = c_k^2 * sum over the other dim of X_k^2, X = unnormalised DCT-II of
// each line. Makhoul's algorithm: v = (x0, x2, x4, ..., x5, x3, x1), V = FFT(v),
// X_k = cos(pi k / 2N) Re V_k + sin(pi k / 2N) Im V_k, with V_k = conj(V_{N-k})
// above N/2, so one real FFT suffices and the squares sum on its half spectrum.
at::Tensor dct_scores(const at::Tensor& g, int64_t d) {
  const int64_t len = g.size(d);
  const auto idx_opts = g.options().dtype(at::kLong);
  // Even entries in order, then odd entries reversed.
  const at::Tensor pos = at::arange(len, idx_opts);
  const at::Tensor perm = at::where(pos < (len + 1) / 2, 2 * pos, 2 * (len - 1 - pos) + 1);
  const at::Tensor spec = at::fft_rfft(g.index_select(d, perm), std::nullopt, d);  // half spectrum along d
  const at::Tensor re = at::real(spec), im = at::imag(spec);
  const int64_t other = 1 - d;
  const at::Tensor s_rr = at::sum(re * re, {other}).to(at::kDouble);
  const at::Tensor s_ii = at::sum(im * im, {other}).to(at::kDouble);
  const at::Tensor s_ri = at::sum(re * im, {other}).to(at::kDouble);
  const at::Tensor k = at::arange(len, idx_opts);
  const at::Tensor upper = k > len / 2;
  const at::Tensor src = at::where(upper, len - k, k);
  const at::Tensor sign = at::where(upper, -1.0, 1.0).to(at::kDouble);
  const at::Tensor angle = k.to(at::kDouble) * (kPi / (2.0 * static_cast<double>(len)));
  const at::Tensor ca = at::cos(angle), sa = at::sin(angle);
  const at::Tensor norm2 = at::full_like(angle, 2.0 / len).masked_fill_(k == 0, 1.0 / len);
  const at::Tensor scores = norm2 * (ca * ca * s_rr.index_select(0, src) +
                                     2.0 * sign * ca * sa * s_ri.index_select(0, src) +
                                     sa * sa * s_ii.index_select(0, src));
  return scores.to(g.scalar_type());
}

at::Tensor galore_dct_scores(const at::Tensor& grad, bool left) {
  check_galore_grad(grad);
  return dct_scores(grad.to(galore_acc_dtype(grad.scalar_type())), left ? 0 : 1);
}

// Best first; a stable sort keeps the lower index first among equal scores.
at::Tensor galore_dct_select(const at::Tensor& grad, int64_t rank, bool left) {
  check_projector_inputs(grad, rank);
  const at::Tensor scores = galore_dct_scores(grad, left);
  const at::Tensor order = std::get<1>(at::sort(scores, true, 0, true));
  return order.narrow(0, 0, rank).contiguous();
}

at::Tensor galore_dct_basis(const at::Tensor& indices, int64_t size, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(size >= 1, "size: expected a basis length >= 1, got ", size);
  TORCH_CHECK(indices.scalar_type() == at::kLong, "indices: expected dtype int64, got ", indices.scalar_type());
  check_dim(indices, "indices", 1);
  const at::ScalarType out_dtype = dtype.value_or(at::kFloat);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kDouble, "dtype: expected float32 or float64, got ",
              out_dtype);
  if (indices.numel() > 0) {
    const int64_t lo = indices.min().item<int64_t>(), hi = indices.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < size, "indices: expected values in [0, ", size, "), got values in [", lo, ", ", hi,
                "]");
  }
  // Angle pi (2i+1) k / 2N reduced exactly modulo 2 pi in integers (4N steps).
  const at::Tensor i = at::arange(size, indices.options());
  const at::Tensor steps = ((2 * i + 1).unsqueeze(1) * indices.unsqueeze(0)).remainder(4 * size);
  const at::Tensor angle = steps.to(at::kDouble) * (kPi / (2.0 * static_cast<double>(size)));
  const at::Tensor norm = at::full(indices.sizes(), std::sqrt(2.0 / size), indices.options().dtype(at::kDouble))
                              .masked_fill_(indices == 0, std::sqrt(1.0 / size))
                              .unsqueeze(0);
  return (at::cos(angle) * norm).to(out_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> galore_quantize_int4(const at::Tensor& proj, int64_t group_size) {
  check_float_tensor(proj, "proj");
  check_dim(proj, "proj", 2);
  TORCH_CHECK(proj.size(0) >= 1 && proj.size(1) >= 1, "proj: expected a non-empty [size, rank] matrix, got shape ",
              proj.sizes());
  const int64_t size = proj.size(0), rank = proj.size(1);
  const int64_t gs = group_size <= 0 ? size : std::min(group_size, size);
  const int64_t groups = galore_quant_groups(size, group_size);
  TORCH_CHECK(groups == (size + gs - 1) / gs, "group_size: inconsistent group count");
  const at::Tensor pt = proj.t().to(at::kFloat).contiguous();  // [rank, size]
  const int64_t pad = groups * gs - size;
  const double inf = std::numeric_limits<double>::infinity();
  // The range always contains 0, so that the zero point is a valid code and a
  // group whose entries share one sign is still covered (Q-GaLore's plain
  // min/max clamps such groups).
  const at::Tensor hi = at::constant_pad_nd(pt, {0, pad}, -inf).view({rank, groups, gs}).amax(2).clamp_min(0.0);
  const at::Tensor lo = at::constant_pad_nd(pt, {0, pad}, inf).view({rank, groups, gs}).amin(2).clamp_max(0.0);
  // Asymmetric 4-bit codes as Q-GaLore: q = clamp(round(x / s) + z, 0, 15), x ~ s (q - z).
  const at::Tensor scales = (hi - lo).clamp_min(1e-5) / 15.0;
  const at::Tensor zeros = at::clamp(at::round(-lo / scales), 0, 15);
  const at::Tensor s_el = scales.repeat_interleave(gs, 1).narrow(1, 0, size);
  const at::Tensor z_el = zeros.repeat_interleave(gs, 1).narrow(1, 0, size);
  at::Tensor codes = at::clamp(at::round(pt / s_el) + z_el, 0, 15).to(at::kByte);
  if (size % 2) codes = at::constant_pad_nd(codes, {0, 1}, 0);
  const at::Tensor pairs = codes.view({rank, -1, 2});
  const at::Tensor packed =
      at::bitwise_or(pairs.select(2, 0), at::bitwise_left_shift(pairs.select(2, 1), 4)).contiguous();
  return {packed, scales.contiguous(), zeros.to(at::kByte).contiguous()};
}

at::Tensor galore_project(const at::Tensor& grad, const at::Tensor& proj, bool left) {
  check_galore_grad(grad);
  const auto acc = galore_acc_dtype(grad.scalar_type());
  TORCH_CHECK(proj.scalar_type() == acc, "proj: expected dtype ", acc, " (for a ", grad.scalar_type(),
              " grad), got ", proj.scalar_type());
  check_same_device(proj, "proj", grad, "grad");
  check_dim(proj, "proj", 2);
  check_size(proj, "proj", 0, galore_proj_size(grad, left),
             left ? "m = grad.shape[0] (left projection)" : "n = grad.shape[1] (right projection)");
  const at::Tensor g = grad.to(acc);
  return left ? at::mm(proj.t(), g) : at::mm(g, proj);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CompositeExplicitAutograd, m) {
  m.impl("galore_svd_projector", &galore_svd_projector);
  m.impl("galore_rsvd_projector", &galore_rsvd_projector);
  m.impl("galore_random_projector", &galore_random_projector);
  m.impl("galore_dct_scores", &galore_dct_scores);
  m.impl("galore_dct_select", &galore_dct_select);
  m.impl("galore_dct_basis", &galore_dct_basis);
  m.impl("galore_quantize_int4", &galore_quantize_int4);
  m.impl("galore_project", &galore_project);
}

}  // namespace lrk
