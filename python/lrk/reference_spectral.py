"""Float64 references of the spectral-initialisation ops (csrc/spectral): each
written the plain way (Householder QR, least squares, full SVD), for the tests to
compare lrk's kernels with on seeded inputs."""
from __future__ import annotations

import torch
from torch import Tensor

from .reference_galore import philox_normal

__all__ = ["canonical_row_signs", "truncated_svd", "sketch_update", "gram_sketch_update", "sketch_svd",
           "nystrom_eigh", "captured_energy"]


def canonical_row_signs(u: Tensor, vh: Tensor) -> tuple[Tensor, Tensor]:
    """The sign rule of lrk's ops (and of PEFT's incremental PCA): the entry of
    largest magnitude of each row of vh is positive; u's column flips with it."""
    idx = vh.abs().argmax(1, keepdim=True)
    sign = torch.where(vh.gather(1, idx) < 0, -1.0, 1.0).to(vh.dtype)
    return u * sign.t(), vh * sign


def truncated_svd(a: Tensor, rank: int, method: str = "randomized", oversample: int = 8, power_iters: int = 2,
                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    a = a.double()
    if method == "exact":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    else:
        k = min(rank + oversample, min(a.shape))
        omega = philox_normal((a.shape[1], k), seed, dtype=torch.float64, device=a.device)
        q = torch.linalg.qr(a @ omega)[0]
        for _ in range(power_iters):
            q = torch.linalg.qr(a @ torch.linalg.qr(a.t() @ q)[0])[0]
        ub, s, vh = torch.linalg.svd(q.t() @ a, full_matrices=False)
        u = q @ ub
    u, vh = canonical_row_signs(u[:, :rank], vh[:rank])
    return u, s[:rank], vh


def sketch_update(y: Tensor, z: Tensor, grad_out: Tensor, x: Tensor, omega: Tensor, psi: Tensor) -> None:
    g = grad_out.reshape(-1, grad_out.shape[-1]).double().t() @ x.reshape(-1, x.shape[-1]).double()  # [N, K]
    y += (g @ omega.double()).to(y.dtype)
    z += (g.t() @ psi.double()).to(z.dtype)


def gram_sketch_update(y: Tensor, x: Tensor, omega: Tensor) -> None:
    x2 = x.reshape(-1, x.shape[-1]).double()
    y += (x2.t() @ x2 @ omega.double()).to(y.dtype)


def sketch_svd(y: Tensor, z: Tensor, psi: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    q = torch.linalg.qr(y.double())[0]
    x = torch.linalg.lstsq(psi.double().t() @ q, z.double().t()).solution
    ux, s, vh = torch.linalg.svd(x, full_matrices=False)
    u, vh = canonical_row_signs(q @ ux[:, :rank], vh[:rank])
    return u, s[:rank], vh


def nystrom_eigh(y: Tensor, omega: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Plain (unshifted) Nystrom: C ~= y (omega^T y)^+ y^T, then its eigenpairs."""
    y, omega = y.double(), omega.double()
    core = omega.t() @ y
    c = y @ torch.linalg.pinv((core + core.t()) / 2, hermitian=True) @ y.t()
    evals, evecs = torch.linalg.eigh((c + c.t()) / 2)
    evals, evecs = evals.flip(0)[:rank].clamp_min(0), evecs.flip(1)[:, :rank].t()
    return evals, canonical_row_signs(torch.empty(0, rank, dtype=evecs.dtype), evecs)[1]


def captured_energy(a: Tensor, basis_rows: Tensor, rank: int) -> float:
    """||a P||_F^2 over the optimum sum of the top `rank` squared singular values,
    P the projector onto the row space spanned by basis_rows [rank, m]."""
    a = a.double()
    q = torch.linalg.qr(basis_rows.double().t())[0]
    s = torch.linalg.svdvals(a)
    return float((a @ q).square().sum() / s[:rank].square().sum())
