"""Pure-PyTorch references of the GaLore-family ops (ops.md section 3), written
for clarity: dense DCT basis and GEMMs instead of FFTs, Python Philox, eager
moment updates in galore-torch's order. Tests compare the lrk ops against these.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .reference import _MASK32, philox4x32_10

GAUSSIAN_STREAM = 0x6A1043  # counter word 2 of the Gaussian stream (csrc/galore/galore_random.h)


def projects_left(shape) -> bool:
    """galore-torch's proj_type="std": left (P [m, r]) iff m < n."""
    return shape[0] < shape[1]


def philox_normal(shape, seed: int, std: float = 1.0, dtype=torch.float32, device=None) -> Tensor:
    """lrk's Gaussian stream: element e takes words (2p, 2p+1), p = (e % 4) // 2, of
    philox(counter = (e // 4 as 64 bits, GAUSSIAN_STREAM, 0), key = seed) and applies
    Box-Muller in float64 (cos for even e, sin for odd e)."""
    numel = math.prod(int(s) for s in shape)
    e = torch.arange(numel, dtype=torch.int64)
    g = e >> 2
    seed &= 0xFFFFFFFFFFFFFFFF
    words = philox4x32_10(g & _MASK32, (g >> 32) & _MASK32, torch.full_like(g, GAUSSIAN_STREAM), torch.zeros_like(g),
                          seed & _MASK32, seed >> 32)
    w = torch.stack(words, dim=-1).double()  # [numel, 4]
    pair = (e & 3) >> 1
    w_radius = w.gather(1, (2 * pair).unsqueeze(1)).squeeze(1)
    w_angle = w.gather(1, (2 * pair + 1).unsqueeze(1)).squeeze(1)
    u1 = (w_radius + 1.0) / 4294967296.0
    u2 = w_angle / 4294967296.0
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = 2.0 * math.pi * u2
    value = torch.where((e & 1) == 0, radius * torch.cos(angle), radius * torch.sin(angle))
    return (value * std).to(dtype).reshape(tuple(shape)).to(device)


def _oriented(grad: Tensor, left: bool) -> Tensor:
    g = grad.double() if grad.dtype == torch.float64 else grad.float()
    return g if left else g.t()


def canonical_signs(p: Tensor) -> Tensor:
    """Each column's largest-magnitude entry (the first on ties) made positive."""
    idx = p.abs().argmax(0, keepdim=True)
    lead = p.gather(0, idx)
    return p * torch.where(lead < 0, -1.0, 1.0).to(p.dtype)


def svd_projector(grad: Tensor, rank: int, left: bool) -> Tensor:
    u = torch.linalg.svd(_oriented(grad, left), full_matrices=False)[0]
    return canonical_signs(u[:, :rank])


def rsvd_projector(grad: Tensor, rank: int, left: bool, oversample: int = 8, power_iters: int = 1,
                   seed: int = 0) -> Tensor:
    a = _oriented(grad, left)
    k = min(rank + oversample, min(a.shape))
    omega = philox_normal((a.shape[1], k), seed, dtype=a.dtype, device=a.device)
    y = a @ omega
    for _ in range(power_iters):
        y = torch.linalg.qr(y)[0]
        z = torch.linalg.qr(a.t() @ y)[0]
        y = a @ z
    q = torch.linalg.qr(y)[0]
    ub = torch.linalg.svd(q.t() @ a, full_matrices=False)[0]
    return canonical_signs(q @ ub[:, :rank])


def random_projector(grad: Tensor, rank: int, left: bool, seed: int) -> Tensor:
    size = grad.shape[0] if left else grad.shape[1]
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return philox_normal((size, rank), seed, 1.0 / math.sqrt(rank), dtype=dtype, device=grad.device)


def dct_basis(size: int, dtype=torch.float64, device=None) -> Tensor:
    """The orthonormal DCT-II basis D [size, size] (columns are basis vectors)."""
    i = torch.arange(size, dtype=torch.float64, device=device).unsqueeze(1)
    k = torch.arange(size, dtype=torch.float64, device=device).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    d[:, 0] = math.sqrt(1.0 / size)
    return d.to(dtype)


def dct_scores(grad: Tensor, left: bool) -> Tensor:
    g = grad.double()
    d = dct_basis(g.shape[0] if left else g.shape[1], device=g.device)
    return (d.t() @ g).square().sum(1) if left else (g @ d).square().sum(0)


def dct_select(grad: Tensor, rank: int, left: bool) -> Tensor:
    """Best first; ties to the lower index (a stable descending sort)."""
    return torch.sort(dct_scores(grad, left), stable=True, descending=True)[1][:rank]


def quantize_int4(proj: Tensor, group_size: int = 256):
    """Q-GaLore's asymmetric 4-bit codes per column group, range widened to contain 0."""
    size, rank = proj.shape
    gs = size if group_size <= 0 else min(group_size, size)
    groups = -(-size // gs)
    pt = proj.t().float()
    scales = torch.empty(rank, groups)
    zeros = torch.empty(rank, groups)
    codes = torch.empty(rank, size)
    for gi in range(groups):
        blk = pt[:, gi * gs:(gi + 1) * gs]
        hi = blk.amax(1).clamp_min(0)
        lo = blk.amin(1).clamp_max(0)
        s = (hi - lo).clamp_min(1e-5) / 15.0
        z = torch.clamp(torch.round(-lo / s), 0, 15)
        scales[:, gi], zeros[:, gi] = s, z
        codes[:, gi * gs:(gi + 1) * gs] = torch.clamp(torch.round(blk / s[:, None]) + z[:, None], 0, 15)
    return codes.to(torch.uint8), scales, zeros.to(torch.uint8)


def dequantize_codes(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int = 256) -> Tensor:
    """[size, rank] float32 from unpacked codes [rank, size]."""
    rank, size = codes.shape
    gs = size if group_size <= 0 else min(group_size, size)
    s = scales.repeat_interleave(gs, 1)[:, :size]
    z = zeros.float().repeat_interleave(gs, 1)[:, :size]
    return (s * (codes.float() - z)).t()


def unpack_int4(packed: Tensor, size: int) -> Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :size]


def adamw_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, proj: Optional[Tensor], left: bool,
               step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-6,
               weight_decay: float = 0.0, scale: float = 1.0, correct_bias: bool = True,
               fira: bool = False, fira_prev_norm: Optional[Tensor] = None) -> None:
    """galore-torch's AdamW step (and Fira's option) in place, eagerly, with a dense projector."""
    acc = exp_avg.dtype
    g = grad.to(acc)
    if proj is None:
        r = g
    else:
        r = proj.t() @ g if left else g @ proj
    exp_avg.mul_(beta1).add_(r, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    step_size = lr
    if correct_bias:
        step_size = lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
    norm_grad = exp_avg / denom
    if proj is not None:
        back = proj @ norm_grad if left else norm_grad @ proj.t()
        update = scale * back
        if fira:
            dim = 0 if left else 1
            phi = norm_grad.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
            resid = (g - (proj @ r if left else r @ proj.t())) * phi
            snorm = resid.norm()
            if fira_prev_norm.item() >= 0:
                limiter = max(snorm.item() / (fira_prev_norm.item() + 1e-8), 1.01) / 1.01
                resid = resid / limiter
                fira_prev_norm.fill_(snorm.item() / limiter)
            else:
                fira_prev_norm.fill_(snorm.item())
            update = update + resid
    else:
        update = norm_grad
    p = param.to(acc)
    p = p - step_size * update
    p = p - (lr * weight_decay) * p
    param.copy_(p.to(param.dtype))
