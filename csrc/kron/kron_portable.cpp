// Portable Kronecker adapter (see kron_portable.h): ATen products only.
#include "kron/kron_portable.h"

#include <algorithm>
#include <cstdlib>

namespace lrk {
namespace {

// Upper bound on the elements of the per-chunk intermediate (Z, dZ): 2^27
// elements is 256 MiB in bf16; typical shapes (a few terms) fit in one chunk.
// LRK_KRON_MAX_INTERMEDIATE (elements) overrides it, e.g. to trade speed for memory.
int64_t intermediate_budget() {
  if (const char* env = std::getenv("LRK_KRON_MAX_INTERMEDIATE")) {
    const long long v = std::atoll(env);
    if (v > 0) return v;
  }
  return int64_t(1) << 27;
}

int64_t rows_per_chunk(const KronDims& d) {
  const int64_t per_row = std::max<int64_t>(d.n1 * d.k * d.m2, 1);
  return std::max<int64_t>(1, std::min<int64_t>(d.M, intermediate_budget() / per_row));
}

// Uc[i1, (j1, t)] = coef_t * u[t, i1, j1]: the terms side by side along the
// contraction, interleaved to match Z's (j1, t) layout. Scaled in the coef dtype.
at::Tensor scaled_u_columns(const at::Tensor& u, const at::Tensor& coef, const KronDims& d) {
  return (u.to(coef.scalar_type()) * coef.view({d.k, 1, 1}))
      .to(u.scalar_type())
      .permute({1, 2, 0})
      .reshape({d.m1, d.n1 * d.k});
}

// dst (accumulation dtype) += src (product dtype).
void accumulate(at::Tensor& dst, const at::Tensor& src) {
  if (src.scalar_type() == dst.scalar_type()) {
    dst.add_(src);
  } else {
    dst.add_(src.to(dst.scalar_type()));
  }
}

}  // namespace

at::Tensor kron_coefficients(const std::optional<at::Tensor>& sigma, int64_t k, double scale, at::ScalarType dtype,
                             const at::Device& device) {
  const auto acc = kron_acc_dtype(dtype);
  if (has_tensor(sigma)) return sigma->to(acc).mul(scale);
  return at::full({k}, scale, at::TensorOptions().dtype(acc).device(device));
}

at::Tensor kron_forward_portable(const at::Tensor& x2, const at::Tensor& u, const at::Tensor& v,
                                 const at::Tensor& coef, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, const KronDims& d) {
  const at::Tensor v_rows = v.reshape({d.k * d.m2, d.n2});  // [(t, i2), j2]
  const at::Tensor uc = scaled_u_columns(u, coef, d);       // [i1, (j1, t)]
  at::Tensor y = at::empty({d.M, d.N}, x2.options());
  const int64_t chunk = rows_per_chunk(d);
  for (int64_t r0 = 0; r0 < d.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, d.M - r0);
    const at::Tensor z = at::mm(x2.narrow(0, r0, rows).view({rows * d.n1, d.n2}), v_rows.t());
    const at::Tensor z3 = z.view({rows, d.n1 * d.k, d.m2});
    at::Tensor y3 = y.narrow(0, r0, rows).view({rows, d.m1, d.m2});
    const at::Tensor uc_b = uc.expand({rows, d.m1, d.n1 * d.k});
    if (has_tensor(bias)) {
      y3.copy_(bias->view({1, d.m1, d.m2}).expand({rows, d.m1, d.m2}));
      y3.baddbmm_(uc_b, z3);
    } else {
      at::bmm_out(y3, uc_b, z3);
    }
  }
  // The frozen base product last, adding into the adapter's result (beta = 1).
  if (has_tensor(weight)) y.addmm_(x2, weight->t());
  return y;
}

KronGrads kron_backward_portable(const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& u,
                                 const at::Tensor& v, const at::Tensor& coef, const std::optional<at::Tensor>& weight,
                                 double scale, KronGradMask mask, const KronDims& d) {
  const auto acc = coef.scalar_type();
  const auto acc_opts = x2.options().dtype(acc);
  const at::Tensor v_rows = v.reshape({d.k * d.m2, d.n2});                 // [(t, i2), j2]
  const at::Tensor uc_t = scaled_u_columns(u, coef, d).t().contiguous();   // [(j1, t), i1]
  const bool need_dz = mask.x || mask.v;  // dZ = Uc^T dY feeds dx and dv
  const bool need_g = mask.u || mask.sigma;
  // V with its rows ordered (i2, t): the Z of the u / sigma gradients is then produced
  // with (m, i2) adjacent, the reduction axis of one GEMM, without a transposed copy.
  const at::Tensor v_rows_it = need_g ? v.permute({1, 0, 2}).reshape({d.m2 * d.k, d.n2}) : at::Tensor();

  KronGrads g;
  if (mask.x) g.x = at::empty({d.M, d.K}, x2.options());
  at::Tensor dv_rows = mask.v ? at::zeros({d.k * d.m2, d.n2}, acc_opts) : at::Tensor();
  at::Tensor grad_u_cols = need_g ? at::zeros({d.m1, d.k * d.n1}, acc_opts) : at::Tensor();  // [i1, (t, j1)]

  const int64_t chunk = rows_per_chunk(d);
  for (int64_t r0 = 0; r0 < d.M; r0 += chunk) {
    const int64_t rows = std::min(chunk, d.M - r0);
    const at::Tensor dy3 = dy2.narrow(0, r0, rows).view({rows, d.m1, d.m2});
    const at::Tensor xr = x2.narrow(0, r0, rows).view({rows * d.n1, d.n2});
    if (need_dz) {
      const at::Tensor dz = at::bmm(uc_t.expand({rows, d.n1 * d.k, d.m1}), dy3);  // [rows, (j1, t), i2]
      const at::Tensor dz2 = dz.view({rows * d.n1, d.k * d.m2});
      if (mask.x) {
        at::Tensor gx = g.x.narrow(0, r0, rows).view({rows * d.n1, d.n2});
        at::mm_out(gx, dz2, v_rows);
      }
      if (mask.v) accumulate(dv_rows, at::mm(dz2.t(), xr));
    }
    if (need_g) {
      // d/dUc[i1, (t, j1)] = sum_(m, i2) dY[m, i1, i2] Zt[m, i2, (t, j1)] with
      // Zt[m, i2, (t, j1)] = sum_j2 V[t, i2, j2] X[m, j1, j2]: per row, V (rows (i2, t))
      // times X_m^T, written as [(m, i2), (t, j1)], then one GEMM over (m, i2).
      const at::Tensor xt = x2.narrow(0, r0, rows).view({rows, d.n1, d.n2}).transpose(1, 2);  // [rows, j2, j1]
      const at::Tensor zt = at::bmm(v_rows_it.expand({rows, d.m2 * d.k, d.n2}), xt);          // [rows, (i2, t), j1]
      const at::Tensor dyt = dy3.transpose(1, 2).reshape({rows * d.m2, d.m1});                 // [(m, i2), i1]
      accumulate(grad_u_cols, at::mm(dyt.t(), zt.view({rows * d.m2, d.k * d.n1})));
    }
  }
  if (mask.x && has_tensor(weight)) g.x.addmm_(dy2, *weight);
  if (mask.v) g.v = dv_rows.view({d.k, d.m2, d.n2}).to(x2.scalar_type());
  if (need_g) {
    const at::Tensor grad_uc3 = grad_u_cols.view({d.m1, d.k, d.n1}).permute({1, 0, 2});  // [t, i1, j1]
    if (mask.u) g.u = (grad_uc3 * coef.view({d.k, 1, 1})).to(x2.scalar_type()).contiguous();
    if (mask.sigma) g.sigma = (grad_uc3 * u.to(acc)).sum({1, 2}).mul_(scale).to(x2.scalar_type());
  }
  return g;
}

}  // namespace lrk
