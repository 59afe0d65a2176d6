"""Pure-PyTorch references of lrk's sparse-update ops (ops.md section 4), written for
clarity: they form the dense products and sort, which the kernels never do. Computed
in the caller's dtype (pass float64 for a gold standard).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _dense_grad(grad_y: Tensor, x: Tensor) -> Tensor:
    n, k = grad_y.shape[-1], x.shape[-1]
    return grad_y.reshape(-1, n).t() @ x.reshape(-1, k)


def sddmm_block(grad_y: Tensor, x: Tensor, block_indices: Tensor, block_size: int) -> Tensor:
    """Dense ``grad_y^T @ x``, zero-padded to whole tiles, gathered at the blocks: ``[n_blocks, b, b]``."""
    b = block_size
    d = _dense_grad(grad_y, x)
    n, k = d.shape
    nbr, nbc = math.ceil(n / b), math.ceil(k / b)
    tiles = F.pad(d, (0, nbc * b - k, 0, nbr * b - n)).view(nbr, b, nbc, b).permute(0, 2, 1, 3)
    idx = block_indices.long()
    return tiles[idx[:, 0], idx[:, 1]]


def sddmm_csr(grad_y: Tensor, x: Tensor, crow_indices: Tensor, col_indices: Tensor) -> Tensor:
    """Dense ``grad_y^T @ x`` gathered at a CSR pattern: ``[nnz]``."""
    d = _dense_grad(grad_y, x)
    crow = crow_indices.long()
    rows = torch.repeat_interleave(torch.arange(d.shape[0], device=d.device), crow.diff())
    return d[rows, col_indices.long()]


def abs_kth_value(x: Tensor, k: int, largest: bool = True) -> Tensor:
    """k-th largest (smallest) ``|x|`` by a full sort."""
    return x.abs().flatten().sort(descending=largest).values[k - 1]


def abs_topk_mask(x: Tensor, k: int, largest: bool = True) -> Tensor:
    """Exactly k entries by a stable sort of ``|x|``: ties keep flat (row-major) order."""
    order = x.abs().flatten().sort(descending=largest, stable=True).indices[:k]
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[order] = True
    return mask.view(x.shape)


def block_scores(weight: Tensor, block_size: int, score: str = "norm", threshold: float = 0.0) -> Tensor:
    """Per-tile Frobenius norms, or counts of ``|w| < threshold``, by explicit loops over tiles."""
    b = block_size
    n, k = weight.shape
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    out = torch.zeros(math.ceil(n / b), math.ceil(k / b), dtype=acc)
    w = weight.to(acc).cpu()
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            t = w[i * b:(i + 1) * b, j * b:(j + 1) * b]
            out[i, j] = t.norm() if score == "norm" else (t.abs() < threshold).sum()
    return out


def snell_kernel_matrix(lora_a: Tensor, lora_b: Tensor, kernel: str, head_coeffs: Sequence[float] = (),
                        gamma: float = 1.0, scale: float = 1.0) -> Tensor:
    """``scale * kappa(a_i, b_j)`` from explicit pairwise differences ``[N, K, r]`` (small sizes only)."""
    a, b = lora_a, lora_b
    if kernel == "linear":
        return scale * (a @ b.t())
    diff = a[:, None, :] - b[None, :, :]
    if kernel == "rbf":
        return scale * torch.exp(-gamma * diff.square().sum(-1))
    if kernel == "piecewise_linear":
        heads = len(head_coeffs)
        dh = a.shape[1] // heads
        return scale * sum(c * diff[..., h * dh:(h + 1) * dh].norm(dim=-1) for h, c in enumerate(head_coeffs))
    raise ValueError(f"kernel: unknown {kernel!r}")


def _keep(total: int, sparsity: float) -> int:
    k = int(math.floor((1.0 - sparsity) * total + 0.5))
    return max(min(k, total), 1 if total > 0 else 0)


def snell_mask(kmat: Tensor, sparsity: float, block_size: int = 0) -> Tensor:
    """Competition: the largest (1 - sparsity) fraction of |Kmat| (or of its tiles by norm), as an [N, K] mask."""
    kd = kmat.detach()
    if block_size == 0:
        return abs_topk_mask(kd, _keep(kd.numel(), sparsity))
    scores = block_scores(kd, block_size).to(kd.device)
    bm = abs_topk_mask(scores, _keep(scores.numel(), sparsity))
    b = block_size
    full = bm.repeat_interleave(b, 0).repeat_interleave(b, 1)
    return full[:kd.shape[0], :kd.shape[1]]


def snell_delta(lora_a: Tensor, lora_b: Tensor, kernel: str, sparsity: float, block_size: int = 0,
                head_coeffs: Sequence[float] = (), gamma: float = 1.0, scale: float = 1.0) -> Tensor:
    """``Kmat * mask``, differentiable in lora_a and lora_b through autograd (the mask is a constant)."""
    kmat = snell_kernel_matrix(lora_a, lora_b, kernel, head_coeffs, gamma, scale)
    return kmat * snell_mask(kmat, sparsity, block_size)


def snell_linear(x: Tensor, weight: Tensor, bias, lora_a: Tensor, lora_b: Tensor, kernel: str, sparsity: float,
                 block_size: int = 0, head_coeffs: Sequence[float] = (), gamma: float = 1.0,
                 scale: float = 1.0) -> Tensor:
    """``x @ (W + Delta)^T + bias`` with the dense delta."""
    delta = snell_delta(lora_a, lora_b, kernel, sparsity, block_size, head_coeffs, gamma, scale)
    return F.linear(x, weight + delta.to(weight.dtype), bias)


def _snella_scalars(kernel: str, kernel_params: Tensor) -> dict:
    """SNELLA's kernel_params as snell_delta's keyword arguments (0-D tensors, so autograd reaches them)."""
    p = list(kernel_params.unbind())
    if kernel == "linear":
        return dict(scale=p[0])
    if kernel == "piecewise_linear":
        return dict(head_coeffs=p)
    if kernel == "rbf":
        return dict(scale=p[0], gamma=p[1])
    raise ValueError(f"kernel: unknown {kernel!r}")


def snella_delta(lora_a: Tensor, lora_b: Tensor, kernel_params: Tensor, kernel: str, sparsity: float,
                 block_size: int = 0) -> Tensor:
    """SNELLA's delta: :func:`snell_delta` with the kernel scalars taken from ``kernel_params``
    (linear ``[scale]``, piecewise_linear ``[c_h]``, rbf ``[scale, gamma]``), differentiable in them."""
    return snell_delta(lora_a, lora_b, kernel, sparsity, block_size, **_snella_scalars(kernel, kernel_params))


def snella_linear(x: Tensor, weight: Tensor, bias, lora_a: Tensor, lora_b: Tensor, kernel_params: Tensor, kernel: str,
                  sparsity: float, block_size: int = 0) -> Tensor:
    """``x @ (W + Delta)^T + bias`` with SNELLA's dense delta."""
    delta = snella_delta(lora_a, lora_b, kernel_params, kernel, sparsity, block_size)
    return F.linear(x, weight + delta.to(weight.dtype), bias)
