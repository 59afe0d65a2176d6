#pragma once
// Helpers of lrk's C++ autograd Functions (csrc/lora/lora_autograd.cpp,
// csrc/quant/qlora_autograd.cpp).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <optional>
#include <string>

namespace lrk {

template <class Fn>
c10::TypedOperatorHandle<Fn> lrk_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// [..., n] -> [rows, n], with symbolic sizes under torch.compile.
inline at::Tensor rows_of(const at::Tensor& t, const c10::SymInt& n) { return t.reshape_symint({-1, n}); }

// The fused ops' _bwd ops have no derivative of their own, so backward runs
// without grad mode; under create_graph=True the gradients get a node that
// raises when differentiated (like @once_differentiable, but linked to the
// tensors they depend on, so that a second derivative reaches it instead of
// coming out as "unused", i.e. silently zero).
inline torch::autograd::variable_list once_differentiable(torch::autograd::variable_list grads,
                                                          const torch::autograd::variable_list& depends_on,
                                                          bool create_graph, const char* op) {
  if (!create_graph) return grads;
  const at::AutoGradMode enable_grad(true);
  if (!torch::autograd::compute_requires_grad(depends_on)) return grads;
  auto error = c10::make_intrusive<torch::autograd::Error>(std::string(op) + ": double backward is not supported",
                                                        torch::autograd::collect_next_edges(depends_on));
  for (auto& g : grads) {
    if (g.defined()) {
      g = g.detach();
      torch::autograd::create_gradient_edge(g, error);
    }
  }
  return grads;
}

}  // namespace lrk
