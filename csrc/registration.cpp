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

  // ---- sparse updates: SDDMM, selection, SaRA, SNELL (ops.md section 4) ----------
  // Masked gradient dDelta[mask] = (grad_y^T @ x)[mask], never the dense [N, K]
  // product. grad_y [..., N] and x [..., K] share their leading dims (tokens);
  // accumulation in float32 (float64 for float64 inputs); out_dtype None gives that
  // accumulation dtype, or pass the inputs' dtype.
  // Block mask: block_indices [n_blocks, 2] int32/int64 (block_row, block_col) of
  // block_size x block_size tiles (16, 32, 64, 128); any order is correct, sorted
  // row-major (what nonzero() of a block mask gives) is the fast schedule; edge tiles
  // are zero-padded. Returns [n_blocks, block_size, block_size].
  m.def("sddmm_block(Tensor grad_y, Tensor x, Tensor block_indices, int block_size, ScalarType? out_dtype=None) -> Tensor");
  // Unstructured mask as CSR: crow_indices [N + 1], col_indices [nnz] (int32/int64,
  // columns in any order within a row). Returns the values at the pattern, [nnz].
  m.def("sddmm_csr(Tensor grad_y, Tensor x, Tensor crow_indices, Tensor col_indices, ScalarType? out_dtype=None) -> Tensor");
  // Exact k-th largest (smallest) |x| by radix select (no sort), a 0-D tensor of x's dtype.
  m.def("abs_kth_value(Tensor x, int k, bool largest=True) -> Tensor");
  // Bool mask of exactly k entries with the largest (smallest) |x|; ties go in flat order.
  m.def("abs_topk_mask(Tensor x, int k, bool largest=True) -> Tensor");
  // Per-tile scores of a 2-D tensor, [ceil(N/b), ceil(K/b)]: score "norm" (Frobenius
  // norm) or "count_below" (entries with |w| < threshold).
  m.def("block_scores(Tensor weight, int block_size, str score=\"norm\", float threshold=0.0) -> Tensor");
  // SaRA: y = x @ weight^T + bias, where values are weight's entries at the pattern
  // (the caller keeps them written into weight); autograd gives values the SDDMM.
  m.def("sparse_grad_linear_block(Tensor x, Tensor weight, Tensor? bias, Tensor values, Tensor block_indices, int block_size) -> Tensor");
  m.def("sparse_grad_linear_csr(Tensor x, Tensor weight, Tensor? bias, Tensor values, Tensor crow_indices, Tensor col_indices) -> Tensor");
  // SNELL: Delta = sparsify(scale * kappa(lora_a [N, r], lora_b [K, r])), kernel
  // "linear" | "piecewise_linear" (head_coeffs, one per head) | "rbf" (gamma);
  // block_size 0 = element competition, else block competition.
  m.def("snell_delta(Tensor lora_a, Tensor lora_b, str kernel, float sparsity, int block_size=0, float[] head_coeffs=[], float gamma=1.0, float scale=1.0) -> Tensor");
  // y = x @ (weight + Delta)^T + bias, with autograd to x, lora_a, lora_b (and bias).
  m.def("snell_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, str kernel, float sparsity, int block_size=0, float[] head_coeffs=[], float gamma=1.0, float scale=1.0) -> Tensor");
  // Backward: (grad_x, grad_lora_a, grad_lora_b); grad_x is empty unless need_grad_x.
  m.def("snell_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, str kernel, float sparsity, int block_size, float[] head_coeffs, float gamma, float scale, bool need_grad_x) -> (Tensor, Tensor, Tensor)");
}
