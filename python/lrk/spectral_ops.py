"""Spectral-initialisation ops: fake kernels and thin wrappers.

Schemas live in csrc/registration.cpp, kernels in csrc/spectral/. They are the
per-layer numerical steps of ``lrk.nn.init`` (PiSSA, LoRA-GA, LoRA-One, EVA):

- :func:`truncated_svd`: exact or randomized (range finder, Cholesky-QR2) SVD;
- :func:`sketch_update` / :func:`sketch_svd`: a two-sided sketch of a layer's
  weight gradient accumulated over batches without forming the gradient, and the
  SVD recovered from it;
- :func:`gram_sketch_update` / :func:`nystrom_eigh`: a streaming range finder of a
  layer's input covariance and its leading eigenpairs.

Not differentiable. Factors are float32 (float64 for float64 inputs). Signs: the
largest-magnitude entry of each right singular vector (eigenvector) is positive.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["truncated_svd", "sketch_update", "gram_sketch_update", "sketch_svd", "nystrom_eigh"]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_rank(rank: int, limit: int, what: str) -> None:
    torch._check(1 <= rank <= limit, lambda: f"rank: expected 1 <= rank <= {what} = {limit}, got {rank}")


@torch.library.register_fake("lrk::truncated_svd")
def _truncated_svd_fake(a, rank, method="randomized", oversample=8, power_iters=2, seed=0):
    torch._check(a.dim() == 2, lambda: f"a: expected a 2-D tensor, got shape {tuple(a.shape)}")
    _check_rank(rank, min(a.shape[0], a.shape[1]), "min(a.shape)")
    dt = _acc(a.dtype)
    return a.new_empty((a.shape[0], rank), dtype=dt), a.new_empty((rank,), dtype=dt), \
        a.new_empty((rank, a.shape[1]), dtype=dt)


@torch.library.register_fake("lrk::sketch_update")
def _sketch_update_fake(y, z, grad_out, x, omega, psi):
    return None


@torch.library.register_fake("lrk::gram_sketch_update")
def _gram_sketch_update_fake(y, x, omega):
    return None


@torch.library.register_fake("lrk::sketch_svd")
def _sketch_svd_fake(y, z, psi, rank):
    _check_rank(rank, min(y.shape[0], y.shape[1], z.shape[0]), "min(N, K, y.shape[1])")
    dt = _acc(y.dtype)
    return y.new_empty((y.shape[0], rank), dtype=dt), y.new_empty((rank,), dtype=dt), \
        y.new_empty((rank, z.shape[0]), dtype=dt)


@torch.library.register_fake("lrk::nystrom_eigh")
def _nystrom_eigh_fake(y, omega, rank):
    _check_rank(rank, min(y.shape[0], y.shape[1]), "min(y.shape)")
    dt = _acc(y.dtype)
    return y.new_empty((rank,), dtype=dt), y.new_empty((rank, y.shape[0]), dtype=dt)


def truncated_svd(a: Tensor, rank: int, method: str = "randomized", oversample: int = 8, power_iters: int = 2,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Leading ``rank`` singular triplets of ``a`` [n, m]: (u [n, rank], s [rank], vh [rank, m])."""
    return torch.ops.lrk.truncated_svd(a, int(rank), str(method), int(oversample), int(power_iters), int(seed))


def sketch_update(y: Tensor, z: Tensor, grad_out: Tensor, x: Tensor, omega: Tensor, psi: Tensor) -> None:
    """In place: ``y += G @ omega``, ``z += G^T @ psi`` for ``G = grad_out^T @ x`` (never formed)."""
    torch.ops.lrk.sketch_update(y, z, grad_out, x, omega, psi)


def gram_sketch_update(y: Tensor, x: Tensor, omega: Tensor) -> None:
    """In place: ``y += x^T @ (x @ omega)`` (x [..., K], flattened to tokens)."""
    torch.ops.lrk.gram_sketch_update(y, x, omega)


def sketch_svd(y: Tensor, z: Tensor, psi: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Truncated SVD of G from ``y = G @ omega`` and ``z = G^T @ psi``."""
    return torch.ops.lrk.sketch_svd(y, z, psi, int(rank))


def nystrom_eigh(y: Tensor, omega: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Leading eigenpairs (values [rank], vectors [rank, K]) of a PSD C from ``y = C @ omega``."""
    return torch.ops.lrk.nystrom_eigh(y, omega, int(rank))
