#pragma once
// How the partial sums of a reduction split over a CUDA grid meet in their fp32
// output. By default the splits add into the output with atomicAdd: fast, but the
// order of the additions, hence the result's low bits, depends on timing. Under
// torch.use_deterministic_algorithms(True) each split instead writes its partial
// into its own slice of a zeroed fp32 workspace [splits, numel], and at::sum over
// the split dimension (a fixed-order reduction) adds them into the output: the same
// bits on every run. Host-only.
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdint>

namespace lrk {

inline bool deterministic_mode() { return at::globalContext().deterministicAlgorithms(); }

// Calls launch(float* dst, int64_t split_stride) once. split_stride == 0: dst is `out`
// and the kernel adds its splits atomically; otherwise split s adds into
// dst + s * split_stride (a workspace zeroed here, no atomics), and the workspace is
// then summed into `out` (contiguous fp32) in split order.
template <typename Launch>
void reduce_splits_into(const at::Tensor& out, int64_t splits, Launch&& launch) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous(), "reduce_splits_into: contiguous float32 output expected");
  if (splits <= 1 || !deterministic_mode()) {
    launch(out.mutable_data_ptr<float>(), int64_t{0});
    return;
  }
  const int64_t n = out.numel();
  at::Tensor ws = at::zeros({splits, n}, out.options());
  launch(ws.mutable_data_ptr<float>(), n);
  out.view({n}).add_(ws.sum(0));
}

}  // namespace lrk
