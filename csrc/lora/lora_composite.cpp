// lrk::lora_fused for users: the forward op's first output. Registered as
// CompositeImplicitAutograd so autograd (lora_autograd.cpp, on lora_fused_fwd)
// keeps h from the forward for the backward, and torch.compile traces through it.
// The seed stays symbolic (SymInt) so a compiled step can draw it inside the graph.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace lrk {
namespace {

at::Tensor lora_fused(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& lora_a, const at::Tensor& lora_b, double scale, double dropout_p,
                      c10::SymInt seed) {
  static auto fwd = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("lrk::lora_fused_fwd", "")
                        .typed<std::tuple<at::Tensor, at::Tensor>(
                            const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, const at::Tensor&, double, double, c10::SymInt)>();
  return std::get<0>(fwd.call(x, weight, bias, lora_a, lora_b, scale, dropout_p, std::move(seed)));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrk, CompositeImplicitAutograd, m) { m.impl("lora_fused", &lora_fused); }

}  // namespace lrk
