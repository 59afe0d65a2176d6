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

  // ---- fused DoRA (ops.md section 1) ------------------------------------------
  // y = g * (x @ weight^T + scale * (dropout(x) @ lora_a^T) @ lora_b^T) + bias,
  // g = magnitude / ||weight + scale * lora_b @ lora_a||_row (a constant in backward).
  m.def(
      "dora_fused(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor magnitude, "
      "float scale=1.0, float dropout_p=0.0, int seed=0, Tensor? weight_sq_norm=None) -> Tensor");
  // Row norms of weight + scale * lora_b @ lora_a ([N], float32) without forming
  // the sum; weight_sq_norm (||weight_n||^2, float32) may be cached by the caller.
  m.def(
      "dora_weight_norm(Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
      "Tensor? weight_sq_norm=None) -> Tensor");
  // Forward: (y, h, y_unscaled, weight_norm); y_unscaled = x @ W^T + scale * h @ B^T.
  m.def(
      "dora_fused_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor magnitude, "
      "float scale, float dropout_p, int seed, Tensor? weight_sq_norm) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward: (grad_x, grad_lora_a, grad_lora_b, grad_magnitude); grad_x empty unless need_grad_x.
  m.def(
      "dora_fused_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor magnitude, "
      "Tensor h, Tensor y_unscaled, Tensor weight_norm, float scale, float dropout_p, int seed, "
      "bool need_grad_x) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- Kronecker adapters and KPSVD (ops.md section 5) -------------------------
  // y = x @ weight^T + bias + scale * sum_t sigma_t (u_t ⊗ v_t) x, computed per row as
  // u_t @ x.view(n1, n2) @ v_t^T (the Kronecker product is never formed).
  // x [..., n1*n2], u [terms, m1, n1], v [terms, m2, n2], sigma [terms] (None: all ones),
  // weight [m1*m2, n1*n2] and bias [m1*m2] optional. Autograd for x, u, v, sigma (and
  // weight, bias) is registered in Python.
  m.def(
      "kron_linear(Tensor x, Tensor u, Tensor v, Tensor? sigma=None, Tensor? weight=None, Tensor? bias=None, "
      "float scale=1.0) -> Tensor");
  // Backward: (grad_x, grad_u, grad_v, grad_sigma) for output_mask = which of them to
  // compute (x, u, v, sigma); the others are empty tensors. grad_x includes grad_y @ weight.
  m.def(
      "kron_linear_bwd(Tensor grad_y, Tensor x, Tensor u, Tensor v, Tensor? sigma, Tensor? weight, float scale, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Kronecker-product SVD (Van Loan-Pitsianis): the best sum of `rank` Kronecker
  // products sigma_t u_t ⊗ v_t approximating weight [m1*m2, n1*n2] in Frobenius norm,
  // from the truncated SVD of the rearrangement R(weight) [m1*n1, m2*n2].
  // method: "exact" (full SVD), "randomized" (seeded range finder with `oversample`
  // extra columns and `power_iters` power iterations) or "auto". Returns
  // (sigma [rank], u [rank, m1, n1], v [rank, m2, n2]) with unit-norm factors, in
  // float64 for float64 weights and float32 otherwise.
  m.def(
      "kpsvd(Tensor weight, int m1, int m2, int n1, int n2, int rank, str method=\"auto\", int oversample=20, "
      "int power_iters=8, int seed=0) -> (Tensor, Tensor, Tensor)");
}
