// Autocast kernels of the fused QLoRA/QDoRA forward ops: under torch.autocast they
// run in the autocast dtype, as nn.Linear (and lora_fused) do, casting x, bias and
// the LoRA factors once. The quantized weight's tensors (uint8 codes, float32
// absmax and code tables), a float32 magnitude and the cached ||W||^2 stay as they are.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/autocast.h"
#include "common/autograd_util.h"

namespace lrk {
namespace {

using OptTensor = std::optional<at::Tensor>;

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> qlora_fused_fwd_autocast(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
    int64_t out_features, int64_t in_features, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scale, double dropout_p, c10::SymInt seed, const OptTensor& absmax2,
    const OptTensor& code2, int64_t blocksize2, double offset) {
  LRK_NO_AUTOCAST();
  static auto op = lrk_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
      const OptTensor&, const at::Tensor&, const at::Tensor&, double, double, c10::SymInt, const OptTensor&,
      const OptTensor&, int64_t, double)>("lrk::qlora_fused_fwd");
  return op.call(autocast_input(x, kDevice), packed, absmax, code, blocksize, out_features, in_features,
                 autocast_input(bias, kDevice), autocast_input(lora_a, kDevice), autocast_input(lora_b, kDevice), scale,
                 dropout_p, std::move(seed), absmax2, code2, blocksize2, offset);
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qdora_fused_fwd_autocast(
    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
    int64_t out_features, int64_t in_features, const OptTensor& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, double scale, double dropout_p, c10::SymInt seed,
    const OptTensor& weight_sq_norm, const OptTensor& absmax2, const OptTensor& code2, int64_t blocksize2,
    double offset) {
  LRK_NO_AUTOCAST();
  static auto op = lrk_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
      const OptTensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double, double, c10::SymInt,
      const OptTensor&, const OptTensor&, const OptTensor&, int64_t, double)>("lrk::qdora_fused_fwd");
  const at::Tensor m = magnitude.scalar_type() == at::kFloat ? magnitude : autocast_input(magnitude, kDevice);
  return op.call(autocast_input(x, kDevice), packed, absmax, code, blocksize, out_features, in_features,
                 autocast_input(bias, kDevice), autocast_input(lora_a, kDevice), autocast_input(lora_b, kDevice), m,
                 scale, dropout_p, std::move(seed), weight_sq_norm, absmax2, code2, blocksize2, offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, AutocastCPU, m) {
  m.impl("qlora_fused_fwd", &qlora_fused_fwd_autocast<c10::DeviceType::CPU>);
  m.impl("qdora_fused_fwd", &qdora_fused_fwd_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(lrk, AutocastCUDA, m) {
  m.impl("qlora_fused_fwd", &qlora_fused_fwd_autocast<c10::DeviceType::CUDA>);
  m.impl("qdora_fused_fwd", &qdora_fused_fwd_autocast<c10::DeviceType::CUDA>);
}

}  // namespace lrk
