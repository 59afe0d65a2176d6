"""Python side of lrk's sparse-update ops (ops.md section 4): fake (meta) kernels,
autograd formulas and thin wrappers for the SDDMM, the selection ops, SaRA's
``sparse_grad_linear_*``, SNELL's ``snell_linear`` and SNELLA's ``snella_linear``.

Schemas live in csrc/registration.cpp; kernels in csrc/sparse/.

Mask formats
------------
* Block mask: ``block_indices`` ``[n_blocks, 2]`` int32/int64 ``(block_row, block_col)``
  of ``b x b`` tiles, ``b`` in {16, 32, 64, 128}. Any order gives the same values;
  row-major sorted order (``block_mask.nonzero()``, :func:`block_mask_to_indices`,
  :func:`topk_block_indices`) is the order the CUDA kernel schedules best (blocks of
  one block row share their ``grad_y`` panel through L2). Edge tiles are zero-padded.
  Values come out as ``[n_blocks, b, b]``.
* Unstructured mask: CSR ``crow_indices [N + 1]``, ``col_indices [nnz]`` (same integer
  dtype; columns in any order within a row). Values come out as ``[nnz]``.
  :func:`mask_to_csr` converts a boolean ``[N, K]`` mask.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

_BLOCK_SIZES = (16, 32, 64, 128)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ceil_div(a, b):
    return (a + b - 1) // b


# ----------------------------------------------------------------------------- SDDMM


@torch.library.register_fake("lrk::sddmm_block")
def _sddmm_block_fake(grad_y, x, block_indices, block_size, out_dtype=None):
    torch._check(block_size in _BLOCK_SIZES, lambda: f"block_size: expected one of 16, 32, 64, 128, got {block_size}")
    torch._check(block_indices.dim() == 2 and block_indices.shape[1] == 2,
                 lambda: f"block_indices: expected shape [n_blocks, 2], got {tuple(block_indices.shape)}")
    dtype = out_dtype if out_dtype is not None else _acc_dtype(grad_y.dtype)
    return grad_y.new_empty((block_indices.shape[0], block_size, block_size), dtype=dtype)


@torch.library.register_fake("lrk::sddmm_csr")
def _sddmm_csr_fake(grad_y, x, crow_indices, col_indices, out_dtype=None):
    torch._check(crow_indices.dim() == 1 and crow_indices.shape[0] == grad_y.shape[-1] + 1,
                 lambda: f"crow_indices: expected shape [{grad_y.shape[-1] + 1}], got {tuple(crow_indices.shape)}")
    dtype = out_dtype if out_dtype is not None else _acc_dtype(grad_y.dtype)
    return grad_y.new_empty((col_indices.shape[0],), dtype=dtype)


def sddmm_block(grad_y: Tensor, x: Tensor, block_indices: Tensor, block_size: int,
                out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(grad_y^T @ x)`` at the kept ``b x b`` blocks, ``[n_blocks, b, b]``, without the
    dense product. grad_y ``[..., N]``, x ``[..., K]`` (same leading dims); fp32
    accumulation (fp64 for fp64); ``out_dtype`` None = float32 (float64), or the inputs' dtype."""
    return torch.ops.lrk.sddmm_block(grad_y, x, block_indices, int(block_size), out_dtype)


def sddmm_csr(grad_y: Tensor, x: Tensor, crow_indices: Tensor, col_indices: Tensor,
              out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``(grad_y^T @ x)`` at a CSR pattern of ``[N, K]``, ``[nnz]``, without the dense product."""
    return torch.ops.lrk.sddmm_csr(grad_y, x, crow_indices, col_indices, out_dtype)


def block_mask_to_indices(block_mask: Tensor) -> Tensor:
    """Boolean block mask ``[ceil(N/b), ceil(K/b)]`` -> row-major sorted ``[n_blocks, 2]`` int64."""
    if block_mask.dtype != torch.bool or block_mask.dim() != 2:
        raise ValueError(f"block_mask: expected a 2-D bool tensor, got {block_mask.dtype} {tuple(block_mask.shape)}")
    return block_mask.nonzero()


def mask_to_csr(mask: Tensor, index_dtype: torch.dtype = torch.int64) -> tuple[Tensor, Tensor]:
    """Boolean ``[N, K]`` mask -> ``(crow_indices [N + 1], col_indices [nnz])``, columns sorted."""
    if mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask: expected a 2-D bool tensor, got {mask.dtype} {tuple(mask.shape)}")
    coords = mask.nonzero()
    return coords_to_csr(coords[:, 0], coords[:, 1], mask.shape[0], index_dtype)


def coords_to_csr(rows: Tensor, cols: Tensor, n_rows: int, index_dtype: torch.dtype = torch.int64):
    """Row-sorted coordinates -> CSR ``(crow_indices [n_rows + 1], col_indices)`` (no host sync)."""
    bounds = torch.arange(n_rows + 1, device=rows.device, dtype=rows.dtype)
    crow = torch.searchsorted(rows.contiguous(), bounds)
    return crow.to(index_dtype), cols.to(index_dtype).contiguous()


# ----------------------------------------------------------------------------- selection


@torch.library.register_fake("lrk::abs_kth_value")
def _abs_kth_value_fake(x, k, largest=True):
    return x.new_empty(())


@torch.library.register_fake("lrk::abs_topk_mask")
def _abs_topk_mask_fake(x, k, largest=True):
    return x.new_empty(x.shape, dtype=torch.bool)


@torch.library.register_fake("lrk::block_scores")
def _block_scores_fake(weight, block_size, score="norm", threshold=0.0):
    torch._check(weight.dim() == 2, lambda: f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    shape = (_ceil_div(weight.shape[0], block_size), _ceil_div(weight.shape[1], block_size))
    return weight.new_empty(shape, dtype=_acc_dtype(weight.dtype))


def abs_kth_value(x: Tensor, k: int, largest: bool = True) -> Tensor:
    """Exact k-th largest (smallest) ``|x|`` (k from 1) by radix select: a 0-D tensor of
    x's dtype, on x's device, with no host synchronisation. Works for any size
    (``torch.quantile`` stops at 2^24 elements); NaN counts as larger than inf."""
    return torch.ops.lrk.abs_kth_value(x, int(k), bool(largest))


def abs_topk_mask(x: Tensor, k: int, largest: bool = True) -> Tensor:
    """Bool mask of exactly ``k`` entries with the largest (smallest) ``|x|``; entries
    tied with the k-th value are taken in flat (row-major) order."""
    return torch.ops.lrk.abs_topk_mask(x, int(k), bool(largest))


def block_scores(weight: Tensor, block_size: int, score: str = "norm", threshold: float = 0.0) -> Tensor:
    """Per-tile scores ``[ceil(N/b), ceil(K/b)]``: ``"norm"`` (Frobenius norm) or
    ``"count_below"`` (entries with ``|w| < threshold``, padding never counts)."""
    return torch.ops.lrk.block_scores(weight, int(block_size), score, float(threshold))


def topk_block_indices(scores: Tensor, k: int, largest: bool = True) -> Tensor:
    """Row-major sorted ``[k, 2]`` coordinates of the k best-scoring tiles (no host sync)."""
    return torch.nonzero_static(abs_topk_mask(scores, k, largest), size=int(k))


def keep_count(total: int, fraction: float) -> int:
    """How many of ``total`` entries a keep fraction selects: rounded, at least one
    when ``fraction > 0`` (the same rule as the C++ ops)."""
    k = int(math.floor(fraction * total + 0.5))  # std::round for non-negative values
    return max(min(k, total), 1 if (fraction > 0 and total > 0) else 0)


# ----------------------------------------------------------------------------- SaRA's layer op


def _linear_fake(x, weight):
    return x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],))


@torch.library.register_fake("lrk::sparse_grad_linear_block")
def _sgl_block_fake(x, weight, bias, values, block_indices, block_size):
    return _linear_fake(x, weight)


@torch.library.register_fake("lrk::sparse_grad_linear_csr")
def _sgl_csr_fake(x, weight, bias, values, crow_indices, col_indices):
    return _linear_fake(x, weight)


def _masked_values_grad(grad_y2, x2, values_dtype, sddmm):
    acc = _acc_dtype(x2.dtype)
    out_dtype = values_dtype if values_dtype in (acc, x2.dtype) else None
    return sddmm(out_dtype).to(values_dtype)


def _dense_grads(ctx, grad_y, x, weight):
    need_x, need_w, need_bias = ctx.needs_input_grad[:3]
    n, k = weight.shape
    grad_x = grad_y @ weight if need_x else None
    grad_w = grad_y.reshape(-1, n).t() @ x.reshape(-1, k) if need_w else None
    grad_bias = grad_y.reshape(-1, n).sum(0) if need_bias else None
    return grad_x, grad_w, grad_bias


def _sgl_setup(ctx, inputs, output):
    x, weight, _, values, idx_a, idx_b = inputs
    ctx.save_for_backward(x, weight, *((idx_a, idx_b) if isinstance(idx_b, Tensor) else (idx_a,)))
    ctx.block_size = idx_b if not isinstance(idx_b, Tensor) else None
    ctx.values_dtype = values.dtype


def _sgl_backward(ctx, grad_y):
    x, weight, *pattern = ctx.saved_tensors
    grad_x, grad_w, grad_bias = _dense_grads(ctx, grad_y, x, weight)
    grad_values = None
    if ctx.needs_input_grad[3]:
        n, k = weight.shape
        dy2, x2 = grad_y.reshape(-1, n), x.reshape(-1, k)
        if ctx.block_size is not None:
            grad_values = _masked_values_grad(
                dy2, x2, ctx.values_dtype,
                lambda od: torch.ops.lrk.sddmm_block(dy2, x2, pattern[0], ctx.block_size, od))
        else:
            grad_values = _masked_values_grad(
                dy2, x2, ctx.values_dtype,
                lambda od: torch.ops.lrk.sddmm_csr(dy2, x2, pattern[0], pattern[1], od))
    return grad_x, grad_w, grad_bias, grad_values, None, None


torch.library.register_autograd("lrk::sparse_grad_linear_block", _sgl_backward, setup_context=_sgl_setup)
torch.library.register_autograd("lrk::sparse_grad_linear_csr", _sgl_backward, setup_context=_sgl_setup)


def sparse_grad_linear_block(x: Tensor, weight: Tensor, bias: Optional[Tensor], values: Tensor,
                             block_indices: Tensor, block_size: int) -> Tensor:
    """``y = x @ weight^T + bias`` whose gradient for ``values`` ``[n_blocks, b, b]`` is
    ``(grad_y^T @ x)`` at the blocks. Contract: ``values`` are (a parametrisation of)
    weight's entries at the blocks and the caller keeps them written into ``weight``
    (SaRA: the trained values live in W, so the forward is the plain GEMM)."""
    return torch.ops.lrk.sparse_grad_linear_block(x, weight, bias, values, block_indices, int(block_size))


def sparse_grad_linear_csr(x: Tensor, weight: Tensor, bias: Optional[Tensor], values: Tensor,
                           crow_indices: Tensor, col_indices: Tensor) -> Tensor:
    """As :func:`sparse_grad_linear_block` for an unstructured CSR pattern (``values [nnz]``)."""
    return torch.ops.lrk.sparse_grad_linear_csr(x, weight, bias, values, crow_indices, col_indices)


# ----------------------------------------------------------------------------- SNELL


@torch.library.register_fake("lrk::snell_linear")
def _snell_linear_fake(x, weight, bias, lora_a, lora_b, kernel, sparsity, block_size=0, head_coeffs=(), gamma=1.0,
                       scale=1.0):
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"weight: expected shape [out_features, {x.shape[-1]}], got {tuple(weight.shape)}")
    return _linear_fake(x, weight)


@torch.library.register_fake("lrk::snell_linear_bwd")
def _snell_linear_bwd_fake(grad_y, x, weight, lora_a, lora_b, kernel, sparsity, block_size, head_coeffs, gamma, scale,
                           need_grad_x):
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return grad_x, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _snell_setup(ctx, inputs, output):
    x, weight, _, lora_a, lora_b, *params = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b)  # no Kmat, no mask, no index
    ctx.params = params


def _snell_backward(ctx, grad_y):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
    grad_a = grad_b = None
    if need_x or need_a or need_b:
        gx, grad_a, grad_b = torch.ops.lrk.snell_linear_bwd(grad_y, x, weight, lora_a, lora_b, *ctx.params, need_x)
    # d/dW of x @ (W + Delta)^T is the plain linear's; W is usually frozen.
    _, grad_w, grad_bias = _dense_grads(ctx, grad_y, x, weight)
    return ((gx if need_x else None), grad_w, grad_bias, grad_a if need_a else None, grad_b if need_b else None,
            None, None, None, None, None, None)


torch.library.register_autograd("lrk::snell_linear", _snell_backward, setup_context=_snell_setup)

SNELL_KERNELS = ("linear", "piecewise_linear", "rbf")


def snell_default_coeffs(heads: int = 2, scale: float = 0.1) -> list[float]:
    """SNELL's released head coefficients for the piecewise-linear kernel: ``scale * (-1)^h``."""
    return [scale * (-1) ** h for h in range(heads)]


def snell_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                 kernel: str = "piecewise_linear", sparsity: float = 0.9, block_size: int = 0,
                 head_coeffs: Sequence[float] = (), gamma: float = 1.0, scale: float = 1.0) -> Tensor:
    """SNELL: ``y = x @ (W + Delta)^T + bias``, ``Delta = sparsify(scale * kappa(lora_a, lora_b))``.

    lora_a ``[N, r]`` (output side), lora_b ``[K, r]`` (input side). kernel: ``"linear"``
    (``a_i . b_j``), ``"piecewise_linear"`` (``sum_h c_h ||a_i^h - b_j^h||``, ``head_coeffs``
    = ``c_h``, heads are equal slices of the rank), ``"rbf"`` (``exp(-gamma ||a_i - b_j||^2)``).
    Keeps the largest ``(1 - sparsity)`` fraction of ``|Kmat|`` (``block_size`` 0) or of the
    ``b x b`` tiles by norm. Nothing dense is kept for backward: it is recomputed.
    """
    return torch.ops.lrk.snell_linear(x, weight, bias, lora_a, lora_b, kernel, float(sparsity), int(block_size),
                                      [float(c) for c in head_coeffs], float(gamma), float(scale))


def snell_delta(lora_a: Tensor, lora_b: Tensor, kernel: str = "piecewise_linear", sparsity: float = 0.9,
                block_size: int = 0, head_coeffs: Sequence[float] = (), gamma: float = 1.0,
                scale: float = 1.0) -> Tensor:
    """SNELL's sparse delta ``[N, K]`` (dense storage, float32; float64 for float64 factors),
    differentiable in lora_a and lora_b (the dense path; :func:`snell_linear` avoids it)."""
    return torch.ops.lrk.snell_delta(lora_a, lora_b, kernel, float(sparsity), int(block_size),
                                     [float(c) for c in head_coeffs], float(gamma), float(scale))


# ----------------------------------------------------------------------------- SNELLA


@torch.library.register_fake("lrk::snella_linear")
def _snella_linear_fake(x, weight, bias, lora_a, lora_b, kernel_params, kernel, sparsity, block_size=0):
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"weight: expected shape [out_features, {x.shape[-1]}], got {tuple(weight.shape)}")
    return _linear_fake(x, weight)


@torch.library.register_fake("lrk::snella_linear_bwd")
def _snella_linear_bwd_fake(grad_y, x, weight, lora_a, lora_b, kernel_params, kernel, sparsity, block_size,
                            need_grad_x):
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return (grad_x, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape),
            kernel_params.new_empty(kernel_params.shape))


def _snella_setup(ctx, inputs, output):
    x, weight, _, lora_a, lora_b, kernel_params, *params = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, kernel_params)  # no Kmat, no mask, no index
    ctx.params = params


def _snella_backward(ctx, grad_y):
    x, weight, lora_a, lora_b, kernel_params = ctx.saved_tensors
    need_x, need_w, need_bias, need_a, need_b, need_k = ctx.needs_input_grad[:6]
    gx = grad_a = grad_b = grad_k = None
    if need_x or need_a or need_b or need_k:
        gx, grad_a, grad_b, grad_k = torch.ops.lrk.snella_linear_bwd(grad_y, x, weight, lora_a, lora_b, kernel_params,
                                                                     *ctx.params, need_x)
    _, grad_w, grad_bias = _dense_grads(ctx, grad_y, x, weight)
    return ((gx if need_x else None), grad_w, grad_bias, grad_a if need_a else None, grad_b if need_b else None,
            grad_k if need_k else None, None, None, None)


torch.library.register_autograd("lrk::snella_linear", _snella_backward, setup_context=_snella_setup)


def snella_kernel_params_size(kernel: str, heads: int = 2) -> int:
    """Length of ``kernel_params`` for a kernel: linear 1 ``[scale]``, piecewise_linear
    ``heads`` ``[c_0 .. c_{H-1}]``, rbf 2 ``[scale, gamma]``."""
    if kernel not in SNELL_KERNELS:
        raise ValueError(f"kernel: expected one of {SNELL_KERNELS}, got {kernel!r}")
    return {"linear": 1, "piecewise_linear": heads, "rbf": 2}[kernel]


def snella_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                  kernel_params: Tensor, kernel: str = "piecewise_linear", sparsity: float = 0.9,
                  block_size: int = 0) -> Tensor:
    """SNELLA: :func:`snell_linear` with learnable kernel scalars, differentiable in
    ``kernel_params`` too (1-D, on the factors' device, any float dtype):

    * ``"linear"``: ``[scale]``, ``Kmat = scale * a_i . b_j``;
    * ``"piecewise_linear"``: ``[c_0, ..., c_{H-1}]``, ``Kmat = sum_h c_h ||a_i^h - b_j^h||``
      (H heads, equal slices of the rank);
    * ``"rbf"``: ``[scale, gamma]``, ``Kmat = scale * exp(-gamma ||a_i - b_j||^2)``
      (gamma must stay positive; checked for CPU tensors only, as reading a GPU value
      would synchronise: :class:`lrk.nn.SNELLLinear` keeps it positive through ``log gamma``).

    The competition mask is a constant for autograd, as in SNELL; the scalars'
    gradient is summed over the kept entries only (``O(nnz * r)``, nothing dense kept).
    """
    return torch.ops.lrk.snella_linear(x, weight, bias, lora_a, lora_b, kernel_params, kernel, float(sparsity),
                                       int(block_size))


def snella_delta(lora_a: Tensor, lora_b: Tensor, kernel_params: Tensor, kernel: str = "piecewise_linear",
                 sparsity: float = 0.9, block_size: int = 0) -> Tensor:
    """SNELLA's sparse delta ``[N, K]`` (dense storage, float32; float64 for float64
    factors), differentiable in lora_a, lora_b and kernel_params (the dense path)."""
    return torch.ops.lrk.snella_delta(lora_a, lora_b, kernel_params, kernel, float(sparsity), int(block_size))
