"""Pure-PyTorch references of lrk's ops: the math of ../design (ops.md), written
for clarity, computed in the caller's dtype (pass float64 for a gold standard).
Tests compare every kernel against these; docs quote them.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of a * b for a constant a and uint32 values in int64 b,
    computed on 16-bit halves so that nothing overflows int64."""
    p_hi = a * (b >> 16)        # < 2^48
    p_lo = a * (b & 0xFFFF)     # < 2^48
    t = p_hi + (p_lo >> 16)     # a * b >> 16
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi & _MASK32, lo & _MASK32


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> list[Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 counter words; key (k0, k1)."""
    k0 &= _MASK32
    k1 &= _MASK32
    for rnd in range(10):
        if rnd > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def dropout_threshold(p: float) -> int:
    t = p * 4294967296.0
    if t <= 0.0:
        return 0
    if t >= 4294967295.0:
        return _MASK32
    return int(t)


def dropout_keep_mask(shape, p: float, seed: int, device=None) -> Tensor:
    """Boolean keep mask of lrk's dropout: element e (row-major) keeps iff word e % 4
    of philox(counter=(e // 4) as 64 bits, key=seed as 64 bits) >= floor(p * 2^32)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    e = torch.arange(numel, dtype=torch.int64, device=device)
    g = e >> 2
    zeros = torch.zeros_like(g)
    seed &= 0xFFFFFFFFFFFFFFFF
    words = philox4x32_10(g & _MASK32, (g >> 32) & _MASK32, zeros, zeros, seed & _MASK32, seed >> 32)
    stacked = torch.stack(words, dim=-1)  # [numel, 4]
    word = stacked.gather(1, (e & 3).unsqueeze(1)).squeeze(1)
    return (word >= dropout_threshold(p)).reshape(tuple(shape))


def dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """lrk's dropout: x * keep / (1 - p)."""
    if p == 0:
        return x
    keep = dropout_keep_mask(x.shape, p, seed, device=x.device)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


def lora_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
               scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """y = x @ W^T + bias + scale * (dropout(x) @ A^T) @ B^T (differentiable by autograd)."""
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    h = dropout(x, dropout_p, seed) @ lora_a.t()
    return y + scale * (h @ lora_b.t())


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """||W + scale * B @ A||_2 per output row, formed densely."""
    return torch.linalg.vector_norm(weight + scale * (lora_b @ lora_a), dim=1)


def dora_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
               magnitude: Tensor, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """y = g * (x @ W^T + scale * (dropout(x) @ A^T) @ B^T) + bias, g = m / ||W + s B A||
    with the norm detached (treated as a constant in backward)."""
    g = magnitude / dora_weight_norm(weight, lora_a, lora_b, scale).detach()
    y = g * (x @ weight.t() + scale * ((dropout(x, dropout_p, seed) @ lora_a.t()) @ lora_b.t()))
    return y if bias is None else y + bias


def dora_grad_scale(grad_y: Tensor, y_unscaled: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """DoRA backward's elementwise part: grad_y * g, and sum over rows of grad_y * y_unscaled."""
    n = grad_y.shape[-1]
    return grad_y * g, (grad_y.reshape(-1, n) * y_unscaled.reshape(-1, n)).sum(0)
