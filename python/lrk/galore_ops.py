"""GaLore-family ops (ops.md section 3): fake kernels and thin wrappers.

Schemas live in csrc/registration.cpp, kernels in csrc/galore/. These ops are
optimizer arithmetic: none of them is differentiable, so no autograd formula is
registered.

Conventions: ``grad`` is ``[m, n]``; a projector is ``[size, rank]`` with
``size = m`` for a left projection (``R = P^T @ grad``, ``[rank, n]``) and
``size = n`` for a right one (``R = grad @ Q``, ``[m, rank]``). galore-torch's
default side rule (``proj_type="std"``) is :func:`projects_left`. Projectors and
optimizer states are float32 (float64 for float64 gradients).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "projects_left", "philox_normal_", "svd_projector", "rsvd_projector", "random_projector", "dct_scores",
    "dct_select", "dct_basis", "quantize_int4", "dequantize_int4", "project", "galore_adamw_step",
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _proj_size(grad: Tensor, left: bool) -> int:
    return grad.shape[0] if left else grad.shape[1]


def _check_grad_rank(grad: Tensor, rank: int) -> None:
    torch._check(grad.dim() == 2, lambda: f"grad: expected a 2-D tensor, got shape {tuple(grad.shape)}")
    torch._check(1 <= rank <= min(grad.shape[0], grad.shape[1]),
                 lambda: f"rank: expected 1 <= rank <= min(m, n) for grad of shape {tuple(grad.shape)}, got {rank}")


def _groups(size: int, group_size: int) -> int:
    return 1 if group_size <= 0 else (size + group_size - 1) // group_size


# ----------------------------------------------------------------------------- fakes


@torch.library.register_fake("lrk::philox_normal_")
def _philox_normal_fake(out, seed, std=1.0):
    return None


@torch.library.register_fake("lrk::galore_svd_projector")
def _svd_projector_fake(grad, rank, left):
    _check_grad_rank(grad, rank)
    return grad.new_empty((_proj_size(grad, left), rank), dtype=_acc_dtype(grad.dtype))


@torch.library.register_fake("lrk::galore_rsvd_projector")
def _rsvd_projector_fake(grad, rank, left, oversample=8, power_iters=1, seed=0):
    return _svd_projector_fake(grad, rank, left)


@torch.library.register_fake("lrk::galore_random_projector")
def _random_projector_fake(grad, rank, left, seed):
    return _svd_projector_fake(grad, rank, left)


@torch.library.register_fake("lrk::galore_dct_scores")
def _dct_scores_fake(grad, left):
    torch._check(grad.dim() == 2, lambda: f"grad: expected a 2-D tensor, got shape {tuple(grad.shape)}")
    return grad.new_empty((_proj_size(grad, left),), dtype=_acc_dtype(grad.dtype))


@torch.library.register_fake("lrk::galore_dct_select")
def _dct_select_fake(grad, rank, left):
    _check_grad_rank(grad, rank)
    return grad.new_empty((rank,), dtype=torch.int64)


@torch.library.register_fake("lrk::galore_dct_basis")
def _dct_basis_fake(indices, size, dtype=None):
    return indices.new_empty((size, indices.shape[0]), dtype=dtype or torch.float32)


@torch.library.register_fake("lrk::galore_quantize_int4")
def _quantize_int4_fake(proj, group_size):
    size, rank = proj.shape
    groups = _groups(size, group_size)
    return (proj.new_empty((rank, (size + 1) // 2), dtype=torch.uint8),
            proj.new_empty((rank, groups), dtype=torch.float32),
            proj.new_empty((rank, groups), dtype=torch.uint8))


@torch.library.register_fake("lrk::galore_dequantize_int4")
def _dequantize_int4_fake(packed, scales, zeros, size, group_size):
    return packed.new_empty((size, packed.shape[0]), dtype=torch.float32)


@torch.library.register_fake("lrk::galore_project")
def _project_fake(grad, proj, left):
    rank = proj.shape[1]
    shape = (rank, grad.shape[1]) if left else (grad.shape[0], rank)
    return grad.new_empty(shape, dtype=proj.dtype)


@torch.library.register_fake("lrk::galore_adamw_step")
def _adamw_step_fake(param, grad, exp_avg, exp_avg_sq, proj, proj_scales, proj_zeros, quant_group_size, left, step,
                     lr, beta1, beta2, eps, weight_decay, scale, correct_bias=True, low_rank_grad=None, fira=False,
                     fira_prev_norm=None):
    return None


# ----------------------------------------------------------------------------- wrappers


def projects_left(shape) -> bool:
    """galore-torch's default side rule (``proj_type="std"``): project on the left
    (``P [m, r]``) iff ``m < n``; a square matrix goes right."""
    return shape[0] < shape[1]


def philox_normal_(out: Tensor, seed: int, std: float = 1.0) -> Tensor:
    """Fill ``out`` (contiguous) with N(0, std^2) samples that are a pure function of
    ``(seed, element index)``: the same on CPU and CUDA. Returns ``out``."""
    torch.ops.lrk.philox_normal_(out, int(seed), float(std))
    return out


def svd_projector(grad: Tensor, rank: int, left: bool) -> Tensor:
    """Exact top-``rank`` singular vectors (left: ``U[:, :r]``, right: ``V[:, :r]``),
    each column's largest-magnitude entry made positive."""
    return torch.ops.lrk.galore_svd_projector(grad, int(rank), bool(left))


def rsvd_projector(grad: Tensor, rank: int, left: bool, oversample: int = 8, power_iters: int = 1,
                   seed: int = 0) -> Tensor:
    """Randomized range finder (Halko et al.): ``Y = (A A^T)^q A Omega`` with a
    Philox Gaussian ``Omega [., rank + oversample]``, ``Q = qr(Y)``, the SVD of
    ``Q^T A``, and ``rank`` columns kept (``A = grad`` or ``grad^T``)."""
    return torch.ops.lrk.galore_rsvd_projector(grad, int(rank), bool(left), int(oversample), int(power_iters),
                                               int(seed))


def random_projector(grad: Tensor, rank: int, left: bool, seed: int) -> Tensor:
    """Seeded Gaussian ``[size, rank]`` divided by ``sqrt(rank)``; only the seed needs storing."""
    return torch.ops.lrk.galore_random_projector(grad, int(rank), bool(left), int(seed))


def dct_scores(grad: Tensor, left: bool) -> Tensor:
    """``||D_j^T grad||^2`` (left) or ``||grad D_j||^2`` (right) for every orthonormal
    DCT-II basis vector ``D_j``, through one real FFT."""
    return torch.ops.lrk.galore_dct_scores(grad, bool(left))


def dct_select(grad: Tensor, rank: int, left: bool) -> Tensor:
    """Indices (int64) of the ``rank`` best DCT-II basis vectors, best first; ties go to the lower index."""
    return torch.ops.lrk.galore_dct_select(grad, int(rank), bool(left))


def dct_basis(indices: Tensor, size: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Columns ``indices`` of the orthonormal DCT-II basis of length ``size``:
    ``D[i, k] = c_k cos(pi (2i + 1) k / (2 size))``, ``c_0 = sqrt(1/size)``, else ``sqrt(2/size)``."""
    return torch.ops.lrk.galore_dct_basis(indices, int(size), dtype)


def quantize_int4(proj: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Int4 storage of a projector ``[size, rank]``: per column, groups of ``group_size``
    rows (``<= 0``: the whole column). Returns ``(packed uint8 [rank, ceil(size/2)],
    scales float32 [rank, groups], zeros uint8 [rank, groups])``."""
    return torch.ops.lrk.galore_quantize_int4(proj, int(group_size))


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, size: int, group_size: int = 256) -> Tensor:
    """The float32 projector ``[size, rank]`` from :func:`quantize_int4`'s storage."""
    return torch.ops.lrk.galore_dequantize_int4(packed, scales, zeros, int(size), int(group_size))


def project(grad: Tensor, proj: Tensor, left: bool) -> Tensor:
    """``R = proj^T @ grad`` (left) or ``grad @ proj`` (right), in the projector's dtype."""
    return torch.ops.lrk.galore_project(grad, proj, bool(left))


def galore_adamw_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, proj: Optional[Tensor],
                      *, left: bool, step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                      eps: float = 1e-6, weight_decay: float = 0.0, scale: float = 1.0, correct_bias: bool = True,
                      proj_scales: Optional[Tensor] = None, proj_zeros: Optional[Tensor] = None,
                      quant_group_size: int = 256, low_rank_grad: Optional[Tensor] = None, fira: bool = False,
                      fira_prev_norm: Optional[Tensor] = None) -> None:
    """One GaLore AdamW step in place (galore-torch's formula; ops.md section 3).
    ``proj=None`` gives plain AdamW with the same formula on any shape."""
    torch.ops.lrk.galore_adamw_step(param, grad, exp_avg, exp_avg_sq, proj, proj_scales, proj_zeros,
                                    int(quant_group_size), bool(left), int(step), float(lr), float(beta1),
                                    float(beta2), float(eps), float(weight_decay), float(scale), bool(correct_bias),
                                    low_rank_grad, bool(fira), fira_prev_norm)
