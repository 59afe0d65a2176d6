"""Pure-PyTorch references of lrk's Kronecker-adapter ops (ops.md section 5),
written for clarity: the Kronecker products are formed densely with torch.kron and
the rearrangement is written index by index. Computed in the caller's dtype (pass
float64 for a gold standard); differentiable by autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def kron_delta(u: Tensor, v: Tensor, sigma: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
    """scale * sum_t sigma_t kron(u_t, v_t): [m1*m2, n1*n2]."""
    terms = [torch.kron(u[t], v[t]) * (1.0 if sigma is None else sigma[t]) for t in range(u.shape[0])]
    return scale * torch.stack(terms).sum(0)


def kron_linear(x: Tensor, u: Tensor, v: Tensor, sigma: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
    """y = x @ (weight + scale * sum_t sigma_t kron(u_t, v_t))^T + bias."""
    delta = kron_delta(u, v, sigma, scale)
    w = delta if weight is None else weight + delta
    y = x @ w.t()
    return y if bias is None else y + bias


def rearrange(weight: Tensor, m1: int, m2: int, n1: int, n2: int) -> Tensor:
    """Van Loan-Pitsianis rearrangement R [m1*n1, m2*n2]:
    R[i1*n1 + j1, i2*n2 + j2] = W[i1*m2 + i2, j1*n2 + j2], by explicit index arithmetic."""
    i1 = torch.arange(m1).view(m1, 1, 1, 1)
    j1 = torch.arange(n1).view(1, n1, 1, 1)
    i2 = torch.arange(m2).view(1, 1, m2, 1)
    j2 = torch.arange(n2).view(1, 1, 1, n2)
    rows = (i1 * m2 + i2).expand(m1, n1, m2, n2)
    cols = (j1 * n2 + j2).expand(m1, n1, m2, n2)
    return weight[rows.to(weight.device), cols.to(weight.device)].reshape(m1 * n1, m2 * n2)


def kpsvd(weight: Tensor, m1: int, m2: int, n1: int, n2: int, rank: int):
    """(sigma [rank], u [rank, m1, n1], v [rank, m2, n2]) from the full SVD of R(weight)."""
    U, S, Vh = torch.linalg.svd(rearrange(weight, m1, m2, n1, n2), full_matrices=False)
    return S[:rank], U[:, :rank].t().reshape(rank, m1, n1), Vh[:rank].reshape(rank, m2, n2)


def kpsvd_error(weight: Tensor, m1: int, m2: int, n1: int, n2: int, rank: int) -> Tensor:
    """The optimal Frobenius error of a `rank`-term Kronecker approximation:
    sqrt of the sum of the discarded squared singular values of R(weight)."""
    S = torch.linalg.svdvals(rearrange(weight, m1, m2, n1, n2))
    return S[rank:].square().sum().sqrt()
