#pragma once
// The GaLore AdamW step, written once over ATen GEMMs and a small table of
// device kernels (elementwise Adam, weight update, int4 dequantisation) that the
// CPU and CUDA files provide. The projection and back projection are GEMMs; for
// float32/float64 parameters the back projection, the weight update and the
// decoupled weight decay are one addmm (W read and written once, in the GEMM's
// epilogue). A single-pass kernel that also fuses the projection GEMM and the
// moment update is future work.
#include <ATen/ATen.h>

#include <optional>

namespace lrk {

struct GaloreKernels {
  // M = b1 M + (1-b1) R ; V = b2 V + (1-b2) R^2 ; N = M / (sqrt(V) + eps). All
  // contiguous and of the accumulation dtype; N may not alias R.
  void (*adam_moments)(const at::Tensor& r, at::Tensor& m, at::Tensor& v, at::Tensor& n, double beta1,
                       double beta2, double eps);
  // Plain AdamW on any shape: the moments as above, then t = W - step_size * N,
  // W = t - decay * t. grad has W's dtype; param contiguous.
  void (*adam_full)(at::Tensor& param, const at::Tensor& grad, at::Tensor& m, at::Tensor& v, double beta1,
                    double beta2, double eps, double step_size, double decay);
  // t = W - step_size * U ; W = t - decay * t, with U in the accumulation dtype.
  void (*apply_update)(at::Tensor& param, const at::Tensor& update, double step_size, double decay);
  // Int4 storage -> the transposed projector [rank, size], float32.
  at::Tensor (*dequantize_int4_t)(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                                  int64_t size, int64_t group_size);
};

void galore_adamw_step_impl(const GaloreKernels& kernels, at::Tensor& param, const at::Tensor& grad,
                            at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& proj,
                            const std::optional<at::Tensor>& proj_scales, const std::optional<at::Tensor>& proj_zeros,
                            int64_t quant_group_size, bool left, int64_t step, double lr, double beta1, double beta2,
                            double eps, double weight_decay, double scale, bool correct_bias,
                            const std::optional<at::Tensor>& low_rank_grad, bool fira,
                            const std::optional<at::Tensor>& fira_prev_norm);

}  // namespace lrk
