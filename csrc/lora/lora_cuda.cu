// CUDA kernels of the fused LoRA ops (portable: any sm_80+ GPU).
//
// bf16/fp16: the skinny products run on lrk's WMMA kernels (common/skinny_gemm),
// dropout regenerated from the Philox seed as x is loaded (no mask, no dropped
// copy of x). The low-rank term is written first and the large cuBLAS GEMM
// adds its product to it (beta = 1): the GEMM is compute-bound, so reading C in
// its epilogue is almost free, where adding the term afterwards would cost a
// full read-modify-write pass over y (or dx). fp32/fp64 take the same steps
// through ATen (exact fp32 unless the user enabled TF32).
//
// On Hopper (sm_90a builds, bf16/fp16) the low-rank term goes inside the base
// GEMM instead, as extra reduction columns: y = [x | h | 1] @ [W | s*B | bias]^T
// and dx = [dy | dh] @ [W ; A] (lora/sm90/concat_k_gemm.h), so y and dx are
// written once and never read back. The scale goes with B, not h: h is rounded
// as the portable path rounds it, where s*h would overflow fp16 for
// |h| > 65504 / s (inf, then NaN against B's zero columns). These kernels have not yet run on a GPU, so
// they are opt-in (LRK_SM90=1) until a Hopper run validates them against the
// reference; without it the portable path serves Hopper too.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "common/autocast.h"
#include "common/dropout.h"
#include "common/skinny_gemm.h"
#include "common/cuda_utils.cuh"
#include "lora/lora_checks.h"
#include "lora/lora_cuda.h"
#include "lora/lora_pack.h"
#ifdef LRK_HAVE_SM90_KERNELS
#include "lora/sm90/concat_k_gemm.h"
#endif

namespace lrk {
namespace {

bool use_skinny_kernels(const at::Tensor& x) { return is_half_precision(x.scalar_type()); }

// h = dropout(x) @ A^T in float32, on the skinny kernel (bf16/fp16 x).
at::Tensor shrink_fp32(const LoraDims& d, const at::Tensor& x2, const at::Tensor& a, double dropout_p, int64_t seed) {
  at::Tensor h32 = at::zeros({d.M, d.r}, x2.options().dtype(at::kFloat));  // split-K blocks add into it
  skinny_rows_gemm_cuda(x2, a, h32, 1.0, make_dropout_params(dropout_p, seed));
  return h32;
}

// Whether to try the Hopper concatenated-K GEMMs (they still check their operands).
bool hopper_path_wanted(const at::Tensor& x) {
#ifdef LRK_HAVE_SM90_KERNELS
  const char* opt_in = std::getenv("LRK_SM90");  // read per call: tests compare both paths
  if (opt_in == nullptr || std::strcmp(opt_in, "1") != 0) return false;
  const auto* props = at::cuda::getDeviceProperties(x.get_device());
  return use_skinny_kernels(x) && props->major == 9 && props->minor == 0;
#else
  (void)x;
  return false;
#endif
}

#ifdef LRK_HAVE_SM90_KERNELS
// The extra reduction columns of y = [x | h (| 1)] @ [W | s*B (| bias)]^T: `packed`
// [M, pitch] (filled later from h32) and `factor` [N, pitch], k2 of their columns read.
struct ConcatColumns {
  at::Tensor packed, factor;
  int64_t k2;
};

// Whether B's rows serve as the factor as they are: unscaled, nothing appended, a pitch TMA accepts.
bool factor_as_is(const LoraDims& d, double scale, bool has_bias) {
  return !has_bias && scale == 1.0 && tma_pitch(d.r) == d.r;
}

// Whether the Hopper GEMM takes these operands, from what exists before
// concat_columns: the operands it would allocate are left to the check's
// nullptr form (fresh, contiguous, pitch a multiple of 8), so that nothing is
// allocated or copied on a call that then takes the portable path.
bool concat_columns_supported(const LoraDims& d, const at::Tensor& x2, const at::Tensor& w, const at::Tensor& b,
                              double scale, bool has_bias, const at::Tensor& y) {
  return sm90::concat_k_gemm_supported(x2, w, nullptr, d.r + (has_bias ? 1 : 0),
                                       factor_as_is(d, scale, has_bias) ? &b : nullptr,
                                       sm90::FactorLayout::kOutputsByReduction, y);
}

ConcatColumns concat_columns(const LoraDims& d, const at::Tensor& x2, const at::Tensor& b, double scale,
                             const std::optional<at::Tensor>& bias_column) {
  const bool has_bias = bias_column.has_value() && bias_column->defined();
  const int64_t k2 = d.r + (has_bias ? 1 : 0);
  const int64_t pitch = tma_pitch(k2);
  at::Tensor factor = b;
  if (!factor_as_is(d, scale, has_bias)) {
    // Columns past k2 are padding that TMA never reads (it zero-fills past the extent).
    factor = at::empty({d.N, pitch}, b.options());
    at::Tensor factor_b = factor.narrow(1, 0, d.r);
    if (scale == 1.0) {
      factor_b.copy_(b);
    } else {
      at::mul_out(factor_b, b, scale);  // s*B computed in fp32, rounded once: N*r elements
    }
    if (has_bias) factor.select(1, d.r).copy_(*bias_column);
  }
  return {at::empty({d.M, pitch}, x2.options()), factor, k2};
}

// Fills cols.packed with [h (| 1)] from h32 and returns h rounded, for backward.
at::Tensor pack_low_rank(const LoraDims& d, const at::Tensor& h32, ConcatColumns& cols) {
  if (cols.packed.size(1) == d.r) {  // no padding, no ones column: the packed rows are h itself
    pack_rows_cuda(h32, false, cols.packed, nullptr);
    return cols.packed;
  }
  at::Tensor h = at::empty({d.M, d.r}, cols.packed.options());
  pack_rows_cuda(h32, cols.k2 > d.r, cols.packed, &h);
  return h;
}

// y = [x | h | 1] @ [W | s*B | bias]^T in one GEMM; also h (rounded) for backward.
// False (nothing written) when the operands do not suit the kernel.
bool forward_hopper(const LoraDims& d, const at::Tensor& x2, const at::Tensor& w,
                    const std::optional<at::Tensor>& bias, const at::Tensor& b, const at::Tensor& h32,
                    double scale, at::Tensor& y, at::Tensor& h) {
  if (!concat_columns_supported(d, x2, w, b, scale, bias.has_value() && bias->defined(), y)) return false;
  ConcatColumns cols = concat_columns(d, x2, b, scale, bias);
  h = pack_low_rank(d, h32, cols);
  sm90::concat_k_gemm(x2, w, cols.packed, cols.k2, cols.factor, sm90::FactorLayout::kOutputsByReduction, y);
  return true;
}

// dx = [dy | dh] @ [W ; A] in one GEMM (no dropout: its mask applies to dh @ A alone).
// dh is [M, r]; when its pitch does not suit TMA, a padded copy is made from dh32.
bool grad_x_hopper(const LoraDims& d, const at::Tensor& dy, const at::Tensor& w, const at::Tensor& a,
                   const at::Tensor& dh32, const at::Tensor& dh, at::Tensor& gx) {
  const bool padded = tma_pitch(d.r) != d.r;
  const auto layout = sm90::FactorLayout::kReductionByOutputs;
  // Checked before the padded copy is allocated (the check's nullptr form).
  if (!sm90::concat_k_gemm_supported(dy, w, padded ? nullptr : &dh, d.r, &a, layout, gx)) return false;
  at::Tensor dh_rows = dh;
  if (padded) {
    dh_rows = at::empty({d.M, tma_pitch(d.r)}, dh.options());
    pack_rows_cuda(dh32, false, dh_rows, nullptr);
  }
  sm90::concat_k_gemm(dy, w, dh_rows, d.r, a, layout, gx);
  return true;
}
#endif

std::tuple<at::Tensor, at::Tensor> lora_fused_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                       double scale, double dropout_p, int64_t seed) {
  LRK_NO_AUTOCAST();
  const LoraDims d = check_lora_inputs(x, weight, bias, lora_a, lora_b, scale, dropout_p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor a = lora_a.contiguous();
  const at::Tensor b = lora_b.contiguous();

  at::Tensor h;
  at::Tensor y = at::empty({d.M, d.N}, x.options());
  if (use_skinny_kernels(x)) {
    const at::Tensor h32 = shrink_fp32(d, x2, a, dropout_p, seed);
#ifdef LRK_HAVE_SM90_KERNELS
    if (hopper_path_wanted(x) && forward_hopper(d, x2, w, bias, b, h32, scale, y, h)) {
      return {y.reshape(with_last_dim(x, d.N)), h.reshape(with_last_dim(x, d.r))};
    }
#endif
    h = h32.to(x.scalar_type());
  } else {
    const at::Tensor x_drop = dropout_p > 0 ? philox_dropout_cuda(x2, dropout_p, seed) : x2;
    h = at::mm(x_drop, a.t());
  }
  // y = bias + scale * h @ B^T, then y += x @ W^T.
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(y, bias->expand({d.M, d.N}), h, b.t(), /*beta=*/1.0, /*alpha=*/scale);
  } else {
    at::addmm_out(y, y, h, b.t(), /*beta=*/0.0, /*alpha=*/scale);  // beta = 0: y's contents are ignored
  }
  y.addmm_(x2, w.t());
  return {y.reshape(with_last_dim(x, d.N)), h.reshape(with_last_dim(x, d.r))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_fused_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& h, double scale, double dropout_p, int64_t seed,
    bool need_grad_x) {
  LRK_NO_AUTOCAST();
  const LoraDims d = check_lora_bwd_inputs(grad_y, x, weight, lora_a, lora_b, h, scale, dropout_p);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor dy = grad_y.reshape({d.M, d.N}).contiguous();
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor h2 = h.reshape({d.M, d.r}).contiguous();
  const at::Tensor a = lora_a.contiguous();
  const auto dtype = x.scalar_type();

  at::Tensor dh, dh32, grad_a, grad_b;
  if (use_skinny_kernels(x)) {
    const auto f32 = x.options().dtype(at::kFloat);
    // The three fp32 accumulators (blocks add into them atomically), zeroed by one memset.
    at::Tensor acc32 = at::zeros({d.M * d.r + d.r * d.N + d.r * d.K}, f32);
    dh32 = acc32.narrow(0, 0, d.M * d.r).view({d.M, d.r});
    at::Tensor gbt32 = acc32.narrow(0, d.M * d.r, d.r * d.N).view({d.r, d.N});
    at::Tensor ga32 = acc32.narrow(0, d.M * d.r + d.r * d.N, d.r * d.K).view({d.r, d.K});
    // dh = s * dy @ B and dB^T = s * h^T @ dy from one read of dy.
    skinny_rows_cols_gemm_cuda(dy, lora_b.contiguous(), h2, dh32, gbt32, scale);
    dh = dh32.to(dtype);
    skinny_cols_gemm_cuda(dh, x2, ga32, 1.0, make_dropout_params(dropout_p, seed));  // dA = dh^T @ x~
    grad_a = ga32.to(dtype);
    grad_b = at::empty({d.N, d.r}, x.options()).copy_(gbt32.t());  // cast and transpose in one pass
  } else {
    dh = at::mm(dy, lora_b).mul_(scale);
    grad_b = at::mm(dy.t(), h2).mul_(scale);
    const at::Tensor x_drop = dropout_p > 0 ? philox_dropout_cuda(x2, dropout_p, seed) : x2;
    grad_a = at::mm(dh.t(), x_drop);
  }

  at::Tensor grad_x = at::empty({0}, x.options());
  if (need_grad_x) {
#ifdef LRK_HAVE_SM90_KERNELS
    if (dropout_p == 0 && hopper_path_wanted(x)) {
      at::Tensor gx = at::empty({d.M, d.K}, x.options());
      if (grad_x_hopper(d, dy, weight.contiguous(), a, dh32, dh, gx)) {
        return {gx.reshape(x.sizes()), grad_a, grad_b};
      }
    }
#endif
    // dx = dropout(dh @ A) + dy @ W, the big GEMM last (beta = 1).
    at::Tensor gx;
    if (use_skinny_kernels(x)) {  // the low-rank term written once, its mask applied on the way out
      gx = at::empty({d.M, d.K}, x.options());
      skinny_expand_gemm_cuda(dh, a, gx, 1.0, make_dropout_params(dropout_p, seed));
    } else {
      gx = at::mm(dh, a);
      if (dropout_p > 0) dropout_cuda_(gx, dropout_p, seed);
    }
    gx.addmm_(dy, weight);
    grad_x = gx.reshape(x.sizes());
  }
  return {grad_x, grad_a, grad_b};
}

}  // namespace

bool dora_forward_hopper(const LoraDims& d, const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const at::Tensor& g, double scale, double dropout_p, int64_t seed, at::Tensor& y,
                         at::Tensor& h, at::Tensor& y_unscaled) {
#ifdef LRK_HAVE_SM90_KERNELS
  if (!x.is_cuda() || !hopper_path_wanted(x) || g.scalar_type() != at::kFloat) return false;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias && (!bias->is_contiguous() || !cuda::aligned16(bias->const_data_ptr()))) return false;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({d.M, d.K}).contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = lora_b.contiguous();
  at::Tensor y2 = at::empty({d.M, d.N}, x.options());
  if (!concat_columns_supported(d, x2, w, b, scale, false, y2)) return false;
  ConcatColumns cols = concat_columns(d, x2, b, scale, std::nullopt);  // bias: in the epilogue
  const at::Tensor h2 = pack_low_rank(d, shrink_fp32(d, x2, lora_a.contiguous(), dropout_p, seed), cols);
  at::Tensor yu2 = at::empty({d.M, d.N}, x.options());
  sm90::concat_k_gemm_dora(x2, w, cols.packed, cols.k2, cols.factor, g.contiguous(), bias, y2, yu2);
  y = y2.reshape(with_last_dim(x, d.N));
  y_unscaled = yu2.reshape(with_last_dim(x, d.N));
  h = h2.reshape(with_last_dim(x, d.r));
  return true;
#else
  (void)d, (void)x, (void)weight, (void)bias, (void)lora_a, (void)lora_b, (void)g, (void)scale, (void)dropout_p, (void)seed;
  (void)y, (void)h, (void)y_unscaled;
  return false;
#endif
}

LRK_CUDA_KERNELS(m) {
  m.impl("lora_fused_fwd", &lora_fused_fwd_cuda);
  m.impl("lora_fused_bwd", &lora_fused_bwd_cuda);
}

}  // namespace lrk
