// The single place where lrk's op schemas live. Kernels register per dispatch
// key in their family's files (csrc/<family>/*_cpu.cpp, *.cu); fake kernels and
// autograd are registered from Python (python/lrk/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(lrk, m) {
  // ---- common ---------------------------------------------------------------
  // dropout(x) with lrk's Philox mask: a pure function of (seed, element index).
  m.def("philox_dropout(Tensor x, float p, int seed) -> Tensor");

  // ---- fused LoRA (ops.md section 1) -------------------------------------------
  // y = x @ weight^T + bias + scale * (dropout(x) @ lora_a^T) @ lora_b^T, with autograd.
  m.def(
      "lora_fused(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale=1.0, float dropout_p=0.0, int seed=0) -> Tensor");
  // Forward: returns (y, h) with h = dropout(x) @ lora_a^T, the only activation
  // that backward needs besides x.
  m.def(
      "lora_fused_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale, float dropout_p, int seed) -> (Tensor, Tensor)");
  // Backward: returns (grad_x, grad_lora_a, grad_lora_b); grad_x is an empty
  // tensor when need_grad_x is false. grad_weight and grad_bias are plain
  // products that the autograd formula computes only when asked for.
  m.def(
      "lora_fused_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor h, float scale, float dropout_p, int seed, bool need_grad_x) -> (Tensor, Tensor, Tensor)");
}
