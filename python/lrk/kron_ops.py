"""Kronecker adapters and KPSVD (ops.md section 5): fake kernels, autograd and thin
wrappers for ``torch.ops.lrk.kron_linear`` and ``torch.ops.lrk.kpsvd``.

Layout: a weight ``W [N, K]`` with ``N = m1*m2`` and ``K = n1*n2``; an adapter of
``k`` terms ``Delta = scale * sum_t sigma_t (u_t ⊗ v_t)`` with ``u [k, m1, n1]``,
``v [k, m2, n2]``, ``sigma [k]``; ``(u_t ⊗ v_t)[i1*m2 + i2, j1*n2 + j2] =
u_t[i1, j1] * v_t[i2, j2]`` (``torch.kron``'s order).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- kron_linear


def _check_kron_shapes(x, u, v, sigma, weight, bias):
    torch._check(x.dim() >= 1, lambda: "x: expected a tensor of shape [..., in_features]")
    torch._check(u.dim() == 3 and v.dim() == 3 and u.shape[0] == v.shape[0],
                 lambda: f"u, v: expected [terms, m1, n1] and [terms, m2, n2], got {tuple(u.shape)}, {tuple(v.shape)}")
    torch._check(x.shape[-1] == u.shape[2] * v.shape[2],
                 lambda: f"x: expected in_features = {u.shape[2]} * {v.shape[2]}, got shape {tuple(x.shape)}")
    n_out = u.shape[1] * v.shape[1]
    if sigma is not None:
        torch._check(sigma.dim() == 1 and sigma.shape[0] == u.shape[0],
                     lambda: f"sigma: expected shape [{u.shape[0]}], got {tuple(sigma.shape)}")
    if weight is not None:
        torch._check(weight.dim() == 2 and weight.shape[0] == n_out and weight.shape[1] == x.shape[-1],
                     lambda: f"weight: expected shape [{n_out}, {x.shape[-1]}], got {tuple(weight.shape)}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.shape[0] == n_out,
                     lambda: f"bias: expected shape [{n_out}], got {tuple(bias.shape)}")
    return n_out


@torch.library.register_fake("lrk::kron_linear")
def _kron_linear_fake(x, u, v, sigma=None, weight=None, bias=None, scale=1.0):
    n_out = _check_kron_shapes(x, u, v, sigma, weight, bias)
    return x.new_empty(tuple(x.shape[:-1]) + (n_out,))


@torch.library.register_fake("lrk::kron_linear_bwd")
def _kron_linear_bwd_fake(grad_y, x, u, v, sigma, weight, scale, output_mask):
    _check_kron_shapes(x, u, v, sigma, weight, None)
    need_x, need_u, need_v, need_sigma = output_mask

    def grad(flag, t):
        return x.new_empty(t.shape) if flag else x.new_empty((0,))

    return (grad(need_x, x), grad(need_u, u), grad(need_v, v),
            grad(need_sigma and sigma is not None, sigma if sigma is not None else x))


def _kron_linear_setup(ctx, inputs, output):
    x, u, v, sigma, weight, bias, scale = inputs
    ctx.save_for_backward(x, u, v, sigma, weight)  # no intermediate: backward recomputes x @ V^T
    ctx.scale = scale


def _kron_linear_backward(ctx, grad_y):
    x, u, v, sigma, weight = ctx.saved_tensors
    # Trailing arguments left at their defaults are not autograd inputs: pad the flags.
    need_x, need_u, need_v, need_sigma, need_w, need_bias = (tuple(ctx.needs_input_grad) + (False,) * 6)[:6]
    need_sigma = need_sigma and sigma is not None
    grad_x = grad_u = grad_v = grad_sigma = grad_w = grad_bias = None
    if need_x or need_u or need_v or need_sigma:
        gx, gu, gv, gs = torch.ops.lrk.kron_linear_bwd(grad_y, x, u, v, sigma, weight, ctx.scale,
                                                       [need_x, need_u, need_v, need_sigma])
        grad_x = gx if need_x else None
        grad_u = gu if need_u else None
        grad_v = gv if need_v else None
        grad_sigma = gs if need_sigma else None
    if need_w or need_bias:  # the base layer is usually frozen: plain products when asked for
        dy2 = grad_y.reshape(-1, grad_y.shape[-1])
        if need_w:
            grad_w = dy2.t() @ x.reshape(-1, x.shape[-1])
        if need_bias:
            grad_bias = dy2.sum(0)
    return grad_x, grad_u, grad_v, grad_sigma, grad_w, grad_bias, None


torch.library.register_autograd("lrk::kron_linear", _kron_linear_backward, setup_context=_kron_linear_setup)


def kron_linear(x: Tensor, u: Tensor, v: Tensor, sigma: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                bias: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
    """``y = x @ weight^T + bias + scale * sum_t sigma_t (u_t ⊗ v_t) x``.

    x: [..., n1*n2]; u: [k, m1, n1]; v: [k, m2, n2]; sigma: [k] or None (all ones);
    weight: [m1*m2, n1*n2] or None; bias: [m1*m2] or None. Each term is applied as
    ``u_t @ x.view(n1, n2) @ v_t^T`` per row: the Kronecker product is never formed.
    Gradients flow to x, u, v, sigma, and to weight / bias when they require grad.
    """
    return torch.ops.lrk.kron_linear(x, u, v, sigma, weight, bias, float(scale))


def kron_dense(u: Tensor, v: Tensor, sigma: Optional[Tensor] = None, scale: float = 1.0) -> Tensor:
    """The dense ``scale * sum_t sigma_t (u_t ⊗ v_t)`` [m1*m2, n1*n2] (for merging into a
    weight, never in forward): one [m1*n1, k] x [k, m2*n2] product, then the inverse of the
    KPSVD rearrangement. Differentiable by autograd."""
    k, m1, n1 = u.shape
    _, m2, n2 = v.shape
    coef = torch.full((k,), float(scale), dtype=u.dtype, device=u.device) if sigma is None else sigma * scale
    r = (u.reshape(k, m1 * n1).t() * coef) @ v.reshape(k, m2 * n2)  # R(Delta) [m1*n1, m2*n2]
    return r.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


# ----------------------------------------------------------------------------- kpsvd


@torch.library.register_fake("lrk::kpsvd")
def _kpsvd_fake(weight, m1, m2, n1, n2, rank, method="auto", oversample=20, power_iters=8, seed=0):
    torch._check(weight.dim() == 2, lambda: f"weight: expected a 2-D tensor, got shape {tuple(weight.shape)}")
    torch._check(m1 * m2 == weight.shape[0] and n1 * n2 == weight.shape[1],
                 lambda: f"m1*m2, n1*n2: expected {tuple(weight.shape)}, got ({m1 * m2}, {n1 * n2})")
    torch._check(1 <= rank <= min(m1 * n1, m2 * n2), lambda: f"rank: expected 1 <= rank <= {min(m1 * n1, m2 * n2)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return (weight.new_empty((rank,), dtype=dtype), weight.new_empty((rank, m1, n1), dtype=dtype),
            weight.new_empty((rank, m2, n2), dtype=dtype))


class KronFactors(NamedTuple):
    """A sum of Kronecker products ``sum_t sigma[t] * (u[t] ⊗ v[t])``."""
    sigma: Tensor  # [k]
    u: Tensor      # [k, m1, n1]
    v: Tensor      # [k, m2, n2]


def kpsvd(weight: Tensor, factors: tuple[int, int, int, int], rank: int, method: str = "auto",
          oversample: int = 20, power_iters: int = 8, seed: int = 0) -> KronFactors:
    """Kronecker-product SVD of ``weight [m1*m2, n1*n2]`` for ``factors = (m1, m2, n1, n2)``:
    the best sum of ``rank`` Kronecker products in Frobenius norm (Van Loan-Pitsianis).

    Returns ``KronFactors(sigma [rank], u [rank, m1, n1], v [rank, m2, n2])``, sigma
    descending, u and v of unit Frobenius norm, in float64 for float64 weights and float32
    otherwise. ``method``: "exact" (full SVD of the rearranged matrix), "randomized"
    (seeded range finder, ``oversample`` extra columns, ``power_iters`` power iterations)
    or "auto" (exact when the rearranged matrix is small). Not differentiable.
    """
    m1, m2, n1, n2 = (int(f) for f in factors)
    s, u, v = torch.ops.lrk.kpsvd(weight.detach(), m1, m2, n1, n2, int(rank), method, int(oversample),
                                  int(power_iters), int(seed))
    return KronFactors(s, u, v)
