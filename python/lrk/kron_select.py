"""Choices around a Kronecker adapter (ops.md section 5): how many terms to keep
from a KPSVD spectrum, and how to factor a layer's shape ``(N, K)`` into
``(m1, m2, n1, n2)`` with ``N = m1*m2``, ``K = n1*n2``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor


def _spectrum(sigma: Union[Tensor, Sequence[float]]) -> Tensor:
    s = torch.as_tensor(sigma).detach().to("cpu", torch.float64).flatten().abs()
    if s.numel() == 0:
        raise ValueError("sigma: expected at least one singular value, got an empty spectrum")
    if not torch.isfinite(s).all():
        raise ValueError("sigma: expected finite singular values")
    return s.sort(descending=True).values


def energy_rank(sigma: Union[Tensor, Sequence[float]], tau: float = 0.9) -> int:
    """The smallest k with ``sum_{t<=k} sigma_t^2 >= tau * sum_t sigma_t^2`` (sigma sorted
    in descending order first). ``tau`` in (0, 1]; an all-zero spectrum gives 1."""
    if not (0.0 < tau <= 1.0):
        raise ValueError(f"tau: expected an energy fraction in (0, 1], got {tau}")
    energy = _spectrum(sigma).square()
    total = energy.sum()
    if total == 0:
        return 1
    cum = energy.cumsum(0)
    # A relative slack of a few ulps so that tau = 1 is reachable despite rounding.
    reached = cum >= tau * total * (1.0 - 4 * torch.finfo(torch.float64).eps)
    return int(reached.nonzero()[0, 0].item()) + 1


def elbow_rank(sigma: Union[Tensor, Sequence[float]]) -> int:
    """The number of terms up to and including the elbow of the spectrum: the point
    farthest from the chord joining its first and last values, measured after scaling
    both axes to [0, 1] (so the result does not depend on the scale of sigma).
    Spectra of one or two values, or flat ones, have no elbow: all terms are kept."""
    s = _spectrum(sigma)
    n = s.numel()
    if n <= 2 or s[0] == s[-1]:
        return n
    t = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    y = (s - s[-1]) / (s[0] - s[-1])  # 1 at the first value, 0 at the last
    # Distance to the chord from (0, 1) to (1, 0), i.e. the line t + y = 1.
    dist = (1.0 - t - y).abs() / math.sqrt(2.0)
    return int(dist.argmax().item()) + 1


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    if n < 1:
        raise ValueError(f"n: expected a positive integer, got {n}")
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def _split(n: int, factor: int) -> tuple[int, int]:
    """n = a * b with a <= b: a the largest divisor <= sqrt(n), or <= factor when factor > 0."""
    limit = math.isqrt(n) if factor <= 0 else min(factor, n)
    a = max(d for d in divisors(n) if d <= limit)
    return a, n // a


def choose_factorization(out_features: int, in_features: int, factor: int = -1,
                         weight: Optional[Tensor] = None, rank: Optional[int] = None) -> tuple[int, int, int, int]:
    """Factors ``(N, K) = (out_features, in_features)`` as ``(m1, m2, n1, n2)`` with
    ``N = m1*m2``, ``K = n1*n2``.

    Without ``weight``: the balanced split, each side the divisor closest to the square
    root from below (``m1 <= m2``, ``n1 <= n2``), which makes the rearranged matrix
    ``[m1*n1, m2*n2]`` as square as the shape allows (most room for terms) and the two
    products per term equally cheap; ``factor > 0`` instead takes ``m1`` (``n1``) as
    the largest divisor of N (K) not above ``factor`` (PEFT LoKr's ``decompose_factor``).

    With ``weight`` and ``rank``: among the near-balanced candidates (the split above, its
    mirror, and the neighbouring divisors), the one whose best ``rank``-term Kronecker
    approximation (KPSVD, method "auto") keeps the most of the weight's energy.
    """
    if out_features < 1 or in_features < 1:
        raise ValueError(f"out_features, in_features: expected positive sizes, got ({out_features}, {in_features})")
    m1, m2 = _split(out_features, factor)
    n1, n2 = _split(in_features, factor)
    if weight is None:
        return m1, m2, n1, n2
    if rank is None or rank < 1:
        raise ValueError(f"rank: expected a number of terms >= 1 to compare factorizations, got {rank}")
    if tuple(weight.shape) != (out_features, in_features):
        raise ValueError(f"weight: expected shape ({out_features}, {in_features}), got {tuple(weight.shape)}")
    from .kron_ops import kpsvd

    def near(n: int, a: int) -> list[int]:
        ds = divisors(n)
        i = ds.index(a)
        return sorted({ds[j] for j in range(max(0, i - 1), min(len(ds), i + 2))} | {n // a})

    w = weight.detach()
    total = w.double().square().sum().item()
    best, best_energy = (m1, m2, n1, n2), -1.0
    for a in near(out_features, m1):
        for b in near(in_features, n1):
            cand = (a, out_features // a, b, in_features // b)
            cap = min(cand[0] * cand[2], cand[1] * cand[3])
            s = kpsvd(w, cand, min(rank, cap)).sigma
            energy = s.double().square().sum().item() / max(total, 1e-300)
            if energy > best_energy + 1e-12:
                best, best_energy = cand, energy
    return best
