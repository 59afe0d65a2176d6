// The single place where lrk's op schemas live. Kernels register per dispatch
// key in their family's files (csrc/<family>/*_cpu.cpp, *.cu); fake kernels and
// most autograd formulas are registered from Python (python/lrk/*_ops.py), the
// fused LoRA/DoRA ones in C++ (csrc/lora/lora_autograd.cpp).
#include <torch/library.h>

// The emulated build of the CUDA kernels (csrc/emu) defines the same schemas in
// its own namespace, lrk_emu, for CPU tensors.
#ifdef LRK_EMULATED
TORCH_LIBRARY(lrk_emu, m) {
#else
TORCH_LIBRARY(lrk, m) {
#endif
  // ---- common ---------------------------------------------------------------
  // dropout(x) with lrk's Philox mask: a pure function of (seed, element index).
  m.def("philox_dropout(Tensor x, float p, SymInt seed) -> Tensor");

  // ---- fused LoRA (ops.md section 1) -------------------------------------------
  // y = x @ weight^T + bias + scale * (dropout(x) @ lora_a^T) @ lora_b^T, with autograd.
  m.def(
      "lora_fused(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale=1.0, float dropout_p=0.0, SymInt seed=0) -> Tensor");
  // Forward: returns (y, h) with h = dropout(x) @ lora_a^T, the only activation
  // that backward needs besides x.
  m.def(
      "lora_fused_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
      "float scale, float dropout_p, SymInt seed) -> (Tensor, Tensor)");
  // Backward: returns (grad_x, grad_lora_a, grad_lora_b); grad_x is an empty
  // tensor when need_grad_x is false. grad_weight and grad_bias are plain
  // products that the autograd formula computes only when asked for.
  m.def(
      "lora_fused_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor h, float scale, float dropout_p, SymInt seed, bool need_grad_x) -> (Tensor, Tensor, Tensor)");

  // ---- fused DoRA (ops.md section 1) ------------------------------------------
  // y = g * (x @ weight^T + scale * (dropout(x) @ lora_a^T) @ lora_b^T) + bias,
  // g = magnitude / ||weight + scale * lora_b @ lora_a||_row (a constant in backward).
  m.def(
      "dora_fused(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor magnitude, "
      "float scale=1.0, float dropout_p=0.0, SymInt seed=0, Tensor? weight_sq_norm=None) -> Tensor");
  // Row norms of weight + scale * lora_b @ lora_a ([N], float32) without forming
  // the sum; weight_sq_norm (||weight_n||^2, float32) may be cached by the caller.
  m.def(
      "dora_weight_norm(Tensor weight, Tensor lora_a, Tensor lora_b, float scale, "
      "Tensor? weight_sq_norm=None) -> Tensor");
  // Forward: (y, h, y_unscaled, weight_norm); y_unscaled = x @ W^T + scale * h @ B^T.
  m.def(
      "dora_fused_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor magnitude, "
      "float scale, float dropout_p, SymInt seed, Tensor? weight_sq_norm) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward: (grad_x, grad_lora_a, grad_lora_b, grad_magnitude); grad_x empty unless need_grad_x.
  // DoRA backward's elementwise part: (grad_y * g, sum over rows of grad_y * y_unscaled),
  // one pass over grad_y on CUDA; g [N] float32 or float64.
  m.def("dora_grad_scale(Tensor grad_y, Tensor y_unscaled, Tensor g) -> (Tensor, Tensor)");
  m.def(
      "dora_fused_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor magnitude, "
      "Tensor h, Tensor y_unscaled, Tensor weight_norm, float scale, float dropout_p, SymInt seed, "
      "bool need_grad_x) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- 4-bit quantized bases (QLoRA) -------------------------------------------------
  // A frozen weight W [out_features, in_features] in bitsandbytes' 4-bit layout
  // (python/lrk/reference_quant.py): element i of the row-major flattened W is the
  // high nibble of packed[i / 2] for even i and the low one for odd i; its value is
  // code[nibble] * absmax[i / blocksize] (code: the 16-entry NF4 or FP4 table).
  // The kernels dequantize tiles as they load them: W never exists in full.
  // linear_4bit: x [..., in_features] -> x @ W^T [..., out_features].
  m.def(
      "linear_4bit(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int out_features, "
      "int in_features) -> Tensor");
  // linear_4bit_grad_input: grad_y [..., out_features] -> grad_y @ W [..., in_features].
  m.def(
      "linear_4bit_grad_input(Tensor grad_y, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
      "int out_features, int in_features) -> Tensor");
  // Double quantization's absmax: code2[absmax_q[j]] * absmax2[j / blocksize2] + offset, float32.
  m.def(
      "dequantize_absmax(Tensor absmax_q, Tensor absmax2, Tensor code2, int blocksize2, float offset) -> Tensor");
  // Squared row norms ||W_n||^2 of a 4-bit W ([out_features], float64), one block of
  // rows at a time (QDoRA's frozen part of the norm, computed once and cached).
  m.def(
      "weight_4bit_sq_norm(Tensor packed, Tensor absmax, Tensor code, int blocksize, int out_features, "
      "int in_features) -> Tensor");
  // QLoRA: lora_fused over a frozen 4-bit W, which gets no gradient:
  //   y = x @ W^T + bias + scale * (dropout(x) @ lora_a^T) @ lora_b^T.
  // absmax is float32 [blocks], or double-quantized: uint8 absmax_q [blocks] in the
  // absmax slot with absmax2, code2, blocksize2 and offset (dequantize_absmax's
  // arguments), dequantized per call and never kept.
  m.def(
      "qlora_fused(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int out_features, "
      "int in_features, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale=1.0, float dropout_p=0.0, "
      "SymInt seed=0, Tensor? absmax2=None, Tensor? code2=None, int blocksize2=256, float offset=0.0) -> Tensor");
  // Forward: (y, h), h = dropout(x) @ lora_a^T as in lora_fused_fwd.
  m.def(
      "qlora_fused_fwd(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int out_features, "
      "int in_features, Tensor? bias, Tensor lora_a, Tensor lora_b, float scale, float dropout_p, SymInt seed, "
      "Tensor? absmax2, Tensor? code2, int blocksize2, float offset) -> (Tensor, Tensor)");
  // Backward: (grad_x, grad_lora_a, grad_lora_b); grad_x empty unless need_grad_x.
  m.def(
      "qlora_fused_bwd(Tensor grad_y, Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
      "int out_features, int in_features, Tensor lora_a, Tensor lora_b, Tensor h, float scale, float dropout_p, "
      "SymInt seed, bool need_grad_x, Tensor? absmax2, Tensor? code2, int blocksize2, float offset) "
      "-> (Tensor, Tensor, Tensor)");
  // QDoRA: dora_fused over a frozen 4-bit W; g = magnitude / ||W + scale * lora_b @ lora_a||_row
  // from ||W_n||^2 (weight_sq_norm, [out_features] float32/float64, computed when None)
  // and lora_a @ W^T (one linear_4bit of lora_a): W never exists in full.
  m.def(
      "qdora_fused(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int out_features, "
      "int in_features, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor magnitude, float scale=1.0, "
      "float dropout_p=0.0, SymInt seed=0, Tensor? weight_sq_norm=None, Tensor? absmax2=None, "
      "Tensor? code2=None, int blocksize2=256, float offset=0.0) -> Tensor");
  // Forward: (y, h, y_unscaled, weight_norm) as dora_fused_fwd.
  m.def(
      "qdora_fused_fwd(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int out_features, "
      "int in_features, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor magnitude, float scale, "
      "float dropout_p, SymInt seed, Tensor? weight_sq_norm, Tensor? absmax2, Tensor? code2, int blocksize2, "
      "float offset) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward: (grad_x, grad_lora_a, grad_lora_b, grad_magnitude); grad_x empty unless need_grad_x.
  m.def(
      "qdora_fused_bwd(Tensor grad_y, Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, "
      "int out_features, int in_features, Tensor lora_a, Tensor lora_b, Tensor magnitude, Tensor h, "
      "Tensor y_unscaled, Tensor weight_norm, float scale, float dropout_p, SymInt seed, bool need_grad_x, "
      "Tensor? absmax2, Tensor? code2, int blocksize2, float offset) -> (Tensor, Tensor, Tensor, Tensor)");

  // ---- batched multi-adapter LoRA for serving (ops.md section 2) -------------------
  // A pool of n adapters per output slice: lora_a[s] [n, r_max, K], lora_b[s]
  // [n, N_s, r_max]; ranks [n] (int32/int64, each <= r_max: an adapter of rank r
  // costs r), scales [n] (float32). Adapter of a token: adapter_ids [M] (per-token
  // layout, BGMV), or segments (sorted tokens, SGMV): tokens
  // [seg_offsets[s], seg_offsets[s+1]) use seg_adapters[s]. -1 = no adapter.
  // No op reads device values on the host (CUDA-graph capturable); shapes never
  // depend on values. Not differentiable (serving).
  //
  // Shrink: h[s, i, :r_j] = lora_a[s][j, :r_j] @ x[i], j the adapter of token i;
  // h is [slices, M, r_max] in float32 (float64 for float64 x), zero where no adapter.
  m.def("multi_lora_shrink(Tensor x, Tensor[] lora_a, Tensor ranks, Tensor adapter_ids) -> Tensor");
  m.def(
      "multi_lora_shrink_segments(Tensor x, Tensor[] lora_a, Tensor ranks, Tensor seg_offsets, "
      "Tensor seg_adapters) -> Tensor");
  // Expand, in place: y[i, off_s : off_s + N_s] += scales[j] * lora_b[s][j, :, :r_j] @ h[s, i, :r_j];
  // slice_offsets (one per pool, non-overlapping) default to the pools packed from column 0.
  m.def(
      "multi_lora_expand(Tensor(a!) y, Tensor h, Tensor[] lora_b, Tensor ranks, Tensor scales, "
      "Tensor adapter_ids, int[]? slice_offsets=None) -> ()");
  m.def(
      "multi_lora_expand_segments(Tensor(a!) y, Tensor h, Tensor[] lora_b, Tensor ranks, Tensor scales, "
      "Tensor seg_offsets, Tensor seg_adapters, int[]? slice_offsets=None) -> ()");

  // ---- GaLore-family low-rank gradient projection (ops.md section 3) --------
  // A projector is [size, rank] with orthonormal-ish columns: size = n (right
  // projection, R = grad @ proj) or m (left projection, R = proj^T @ grad);
  // galore-torch's default side rule is left iff m < n. Projectors and optimizer
  // states are float32 (float64 for float64 gradients).
  // Fills out (contiguous) with N(0, std^2) samples from lrk's Philox stream,
  // a pure function of (seed, element index): identical on CPU and CUDA.
  m.def("philox_normal_(Tensor(a!) out, int seed, float std=1.0) -> ()");
  // Exact reference: the top-rank singular vectors (torch.linalg.svd).
  m.def("galore_svd_projector(Tensor grad, int rank, bool left) -> Tensor");
  // Randomized range finder: Y = (A A^T)^q A Omega, Omega [., rank + oversample]
  // Philox Gaussian from seed, Q = qr(Y), small SVD of Q^T A, keep rank columns.
  m.def(
      "galore_rsvd_projector(Tensor grad, int rank, bool left, int oversample=8, int power_iters=1, "
      "int seed=0) -> Tensor");
  // Seeded Gaussian / sqrt(rank) (only the seed needs storing).
  m.def("galore_random_projector(Tensor grad, int rank, bool left, int seed) -> Tensor");
  // DCT-II selection: scores ||D_j^T grad||^2 (left) or ||grad D_j||^2 (right) of the
  // orthonormal DCT-II basis vectors D_j, computed with an FFT (no basis needed).
  m.def("galore_dct_scores(Tensor grad, bool left) -> Tensor");
  // The rank best-scoring basis indices (int64, best first; ties: lower index first).
  m.def("galore_dct_select(Tensor grad, int rank, bool left) -> Tensor");
  // Columns `indices` of the orthonormal DCT-II basis of length size: [size, len(indices)].
  m.def("galore_dct_basis(Tensor indices, int size, ScalarType? dtype=None) -> Tensor");
  // Int4 storage of a projector [size, rank]: per column, groups of group_size rows
  // (group_size <= 0: the whole column) with an fp32 scale and a uint8 zero point
  // (asymmetric, as Q-GaLore). Returns (packed uint8 [rank, ceil(size/2)], scales
  // float32 [rank, groups], zeros uint8 [rank, groups]).
  m.def("galore_quantize_int4(Tensor proj, int group_size) -> (Tensor, Tensor, Tensor)");
  m.def(
      "galore_dequantize_int4(Tensor packed, Tensor scales, Tensor zeros, int size, int group_size) -> Tensor");
  // R = proj^T @ grad (left) or grad @ proj (right), in the projector's dtype.
  m.def("galore_project(Tensor grad, Tensor proj, bool left) -> Tensor");
  // One GaLore AdamW step (galore-torch's semantics), mutating param, exp_avg and
  // exp_avg_sq in place:
  //   R = proj^T grad | grad proj (or low_rank_grad when given: e.g. all-reduced shards)
  //   M = b1 M + (1-b1) R ; V = b2 V + (1-b2) R*R ; N = M / (sqrt(V) + eps)
  //   param -= lr * sqrt(1-b2^t)/(1-b1^t) * (scale * back(N) [+ Fira residual])
  //   param -= lr * weight_decay * param
  // proj None: plain AdamW on any shape (same formula, R = grad). proj uint8: int4
  // storage (scales, zeros, quant_group_size as galore_quantize_int4), dequantised
  // inside. fira: adds phi * (grad - P P^T grad) with the norm-growth limiter; its
  // state fira_prev_norm (1 element, -1 = no previous) is updated in place.
  m.def(
      "galore_adamw_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor? proj, Tensor? proj_scales, Tensor? proj_zeros, int quant_group_size, bool left, int step, "
      "float lr, float beta1, float beta2, float eps, float weight_decay, float scale, bool correct_bias=True, "
      "Tensor? low_rank_grad=None, bool fira=False, Tensor(d!)? fira_prev_norm=None) -> ()");

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

  // ---- spectral adapter initialisation: PiSSA, LoRA-GA, LoRA-One, EVA --------------
  // Leading `rank` singular triplets of a [n, m]: (u [n, rank], s [rank], vh [rank, m]),
  // float64 for float64 a, else float32. method "exact" (full SVD) or "randomized"
  // (range finder with rank + oversample Philox-Gaussian columns from seed and
  // power_iters power iterations, Cholesky-QR2 orthonormalisation). Signs: the
  // largest-magnitude entry of each row of vh is positive (u's column flips with it).
  m.def(
      "truncated_svd(Tensor a, int rank, str method=\"randomized\", int oversample=8, int power_iters=2, "
      "int seed=0) -> (Tensor, Tensor, Tensor)");
  // Two-sided sketch of a linear layer's weight gradient G = grad_out^T @ x [N, K]
  // (grad_out [..., N], x [..., K]), without forming G: y [N, l1] += G @ omega
  // (omega [K, l1]), z [K, l2] += G^T @ psi (psi [N, l2]); sketches float32/float64.
  m.def(
      "sketch_update(Tensor(a!) y, Tensor(b!) z, Tensor grad_out, Tensor x, Tensor omega, Tensor psi) -> ()");
  // Range-finder sketch of a layer's input covariance: y [K, l] += x^T @ (x @ omega).
  m.def("gram_sketch_update(Tensor(a!) y, Tensor x, Tensor omega) -> ()");
  // Truncated SVD of G from y = G omega and z = G^T psi (l2 >= l1): (u, s, vh) as
  // truncated_svd, with its sign rule.
  m.def("sketch_svd(Tensor y, Tensor z, Tensor psi, int rank) -> (Tensor, Tensor, Tensor)");
  // Leading eigenpairs of a PSD C [K, K] from y = C omega (omega [K, l] orthonormal
  // columns), shifted Nystrom: (eigenvalues [rank] descending, eigenvectors [rank, K]).
  m.def("nystrom_eigh(Tensor y, Tensor omega, int rank) -> (Tensor, Tensor)");

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
  // SNELLA: the same with learnable kernel scalars, kernel_params (1-D): "linear"
  // [scale], "piecewise_linear" [c_0 .. c_{H-1}] (one per head), "rbf" [scale, gamma];
  // autograd also reaches kernel_params. The _bwd op returns
  // (grad_x, grad_lora_a, grad_lora_b, grad_kernel_params).
  m.def("snella_delta(Tensor lora_a, Tensor lora_b, Tensor kernel_params, str kernel, float sparsity, int block_size=0) -> Tensor");
  m.def("snella_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor kernel_params, str kernel, float sparsity, int block_size=0) -> Tensor");
  m.def("snella_linear_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor kernel_params, str kernel, float sparsity, int block_size, bool need_grad_x) -> (Tensor, Tensor, Tensor, Tensor)");
}
