// CPU kernel of lrk::philox_dropout.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dropout.h"
#include "common/philox.h"
#include "common/autocast.h"

namespace lrk {

at::Tensor philox_dropout_cpu(const at::Tensor& x, double p, int64_t seed) {
  LRK_NO_AUTOCAST();
  check_float_tensor(x, "x");
  check_probability(p, "p");
  const DropoutParams d = make_dropout_params(p, seed);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "philox_dropout_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t scale = static_cast<acc_t>(d.scale);
    const int64_t groups = (n + 3) / 4;
    at::parallel_for(0, groups, 2048, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const Philox4 r = philox4x32_10(static_cast<uint64_t>(g), d.seed);
        for (int lane = 0; lane < 4; ++lane) {
          const int64_t e = 4 * g + lane;
          if (e >= n) break;
          const bool keep = r.v[lane] >= d.threshold;
          o[e] = keep ? static_cast<scalar_t>(static_cast<acc_t>(in[e]) * scale) : scalar_t(0);
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(lrk, CPU, m) { m.impl("philox_dropout", &philox_dropout_cpu); }

}  // namespace lrk
