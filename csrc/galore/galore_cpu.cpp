// CPU kernels of the GaLore family: Philox Gaussian fill, int4 dequantisation,
// the elementwise Adam kernels, and the CPU registration of galore_adamw_step.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "galore/galore_checks.h"
#include "galore/galore_random.h"
#include "galore/galore_step.h"

namespace lrk {
namespace {

constexpr int64_t kGrain = 2048;

void philox_normal_cpu(at::Tensor& out, int64_t seed, double std) {
  check_float_tensor(out, "out");
  TORCH_CHECK(out.is_contiguous(), "out: expected a contiguous tensor, got strides ", out.strides());
  check_finite(std, "std");
  const int64_t n = out.numel();
  if (n == 0) return;
  const uint64_t key = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "philox_normal_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const int64_t groups = (n + 3) / 4;
    at::parallel_for(0, groups, kGrain / 4, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const Philox4 w = philox_gaussian_words(static_cast<uint64_t>(g), key);
        double v[4];
        box_muller(w.v[0], w.v[1], v[0], v[1]);
        box_muller(w.v[2], w.v[3], v[2], v[3]);
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t e = 4 * g + lane;
          if (e < n) o[e] = static_cast<scalar_t>(v[lane] * std);
        }
      }
    });
  });
}

// [rank, size] float32 from packed int4 (see galore_quantize_int4 for the layout).
at::Tensor dequantize_int4_t_cpu(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                                 int64_t size, int64_t group_size) {
  const int64_t rank = packed.size(0), pairs = packed.size(1), groups = scales.size(1);
  const int64_t gs = group_size <= 0 ? size : group_size;
  at::Tensor out = at::empty({rank, size}, packed.options().dtype(at::kFloat));
  const uint8_t* q = packed.const_data_ptr<uint8_t>();
  const float* sc = scales.const_data_ptr<float>();
  const uint8_t* zp = zeros.const_data_ptr<uint8_t>();
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, rank, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t i = 0; i < size; ++i) {
        const uint8_t byte = q[j * pairs + i / 2];
        const int code = (i & 1) ? (byte >> 4) : (byte & 0x0F);
        const int64_t grp = i / gs;
        o[j * size + i] = sc[j * groups + grp] * static_cast<float>(code - static_cast<int>(zp[j * groups + grp]));
      }
    }
  });
  return out;
}

at::Tensor galore_dequantize_int4_cpu(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                                      int64_t size, int64_t group_size) {
  check_galore_int4(packed, scales, zeros, size, group_size, "packed");
  return dequantize_int4_t_cpu(packed, scales, zeros, size, group_size).t().contiguous();
}

void adam_moments_cpu(const at::Tensor& r, at::Tensor& m, at::Tensor& v, at::Tensor& nrm, double beta1, double beta2,
                      double eps) {
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "galore_adam_moments_cpu", [&] {
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* mp = m.mutable_data_ptr<scalar_t>();
    scalar_t* vp = v.mutable_data_ptr<scalar_t>();
    scalar_t* np = nrm.mutable_data_ptr<scalar_t>();
    const scalar_t b1 = static_cast<scalar_t>(beta1), b2 = static_cast<scalar_t>(beta2);
    const scalar_t c1 = static_cast<scalar_t>(1.0 - beta1), c2 = static_cast<scalar_t>(1.0 - beta2);
    const scalar_t e = static_cast<scalar_t>(eps);
    at::parallel_for(0, r.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t g = rp[i];
        const scalar_t mi = b1 * mp[i] + c1 * g;
        const scalar_t vi = b2 * vp[i] + c2 * g * g;
        mp[i] = mi;
        vp[i] = vi;
        np[i] = mi / (std::sqrt(vi) + e);
      }
    });
  });
}

void adam_full_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& m, at::Tensor& v, double beta1,
                   double beta2, double eps, double step_size, double decay) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "galore_adam_full_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* wp = param.mutable_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    acc_t* mp = m.mutable_data_ptr<acc_t>();
    acc_t* vp = v.mutable_data_ptr<acc_t>();
    const acc_t b1 = static_cast<acc_t>(beta1), b2 = static_cast<acc_t>(beta2);
    const acc_t c1 = static_cast<acc_t>(1.0 - beta1), c2 = static_cast<acc_t>(1.0 - beta2);
    const acc_t e = static_cast<acc_t>(eps), s = static_cast<acc_t>(step_size), d = static_cast<acc_t>(decay);
    at::parallel_for(0, param.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t g = static_cast<acc_t>(gp[i]);
        const acc_t mi = b1 * mp[i] + c1 * g;
        const acc_t vi = b2 * vp[i] + c2 * g * g;
        mp[i] = mi;
        vp[i] = vi;
        const acc_t w = static_cast<acc_t>(wp[i]) - s * (mi / (std::sqrt(vi) + e));
        wp[i] = static_cast<scalar_t>(w - d * w);
      }
    });
  });
}

void apply_update_cpu(at::Tensor& param, const at::Tensor& update, double step_size, double decay) {
  const at::Tensor u = update.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param.scalar_type(), "galore_apply_update_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    scalar_t* wp = param.mutable_data_ptr<scalar_t>();
    const acc_t* up = u.const_data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(step_size), d = static_cast<acc_t>(decay);
    at::parallel_for(0, param.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const acc_t w = static_cast<acc_t>(wp[i]) - s * up[i];
        wp[i] = static_cast<scalar_t>(w - d * w);
      }
    });
  });
}

const GaloreKernels kCpuKernels{&adam_moments_cpu, &adam_full_cpu, &apply_update_cpu, &dequantize_int4_t_cpu};

void galore_adamw_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                           const std::optional<at::Tensor>& proj, const std::optional<at::Tensor>& proj_scales,
                           const std::optional<at::Tensor>& proj_zeros, int64_t quant_group_size, bool left,
                           int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                           double scale, bool correct_bias, const std::optional<at::Tensor>& low_rank_grad, bool fira,
                           const std::optional<at::Tensor>& fira_prev_norm) {
  galore_adamw_step_impl(kCpuKernels, param, grad, exp_avg, exp_avg_sq, proj, proj_scales, proj_zeros,
                         quant_group_size, left, step, lr, beta1, beta2, eps, weight_decay, scale, correct_bias,
                         low_rank_grad, fira, fira_prev_norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CPU, m) {
  m.impl("philox_normal_", &philox_normal_cpu);
  m.impl("galore_dequantize_int4", &galore_dequantize_int4_cpu);
  m.impl("galore_adamw_step", &galore_adamw_step_cpu);
}

}  // namespace lrk
