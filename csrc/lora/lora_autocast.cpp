// Autocast kernels of the fused LoRA/DoRA forward ops: under torch.autocast they
// run in the autocast dtype, as nn.Linear does, casting every floating input once.
// DoRA's magnitude may stay float32 (the op accepts it with half operands), and the
// cached ||W||^2 stays float32.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common/autocast.h"

namespace lrk {
namespace {

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> lora_fused_fwd_autocast(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                           double scale, double dropout_p, c10::SymInt seed) {
  LRK_NO_AUTOCAST();
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrk::lora_fused_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, double, double, c10::SymInt)>();
  return op.call(autocast_input(x, kDevice), autocast_input(weight, kDevice), autocast_input(bias, kDevice),
                 autocast_input(lora_a, kDevice), autocast_input(lora_b, kDevice), scale, dropout_p, std::move(seed));
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_fused_fwd_autocast(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
    const at::Tensor& lora_b, const at::Tensor& magnitude, double scale, double dropout_p, c10::SymInt seed,
    const std::optional<at::Tensor>& weight_sq_norm) {
  LRK_NO_AUTOCAST();
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lrk::dora_fused_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double, double, c10::SymInt,
                           const std::optional<at::Tensor>&)>();
  const at::Tensor x_cast = autocast_input(x, kDevice);
  const at::Tensor m = magnitude.scalar_type() == at::kFloat ? magnitude : autocast_input(magnitude, kDevice);
  return op.call(x_cast, autocast_input(weight, kDevice), autocast_input(bias, kDevice),
                 autocast_input(lora_a, kDevice), autocast_input(lora_b, kDevice), m, scale, dropout_p, std::move(seed),
                 weight_sq_norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, AutocastCPU, m) {
  m.impl("lora_fused_fwd", &lora_fused_fwd_autocast<c10::DeviceType::CPU>);
  m.impl("dora_fused_fwd", &dora_fused_fwd_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(lrk, AutocastCUDA, m) {
  m.impl("lora_fused_fwd", &lora_fused_fwd_autocast<c10::DeviceType::CUDA>);
  m.impl("dora_fused_fwd", &dora_fused_fwd_autocast<c10::DeviceType::CUDA>);
}

}  // namespace lrk
