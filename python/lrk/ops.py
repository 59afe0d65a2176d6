"""Python side of lrk's ops: fake (meta) kernels, autograd formulas and thin wrappers.

Schemas live in csrc/registration.cpp; CPU and CUDA kernels in csrc/<family>/.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- dropout


@torch.library.register_fake("lrk::philox_dropout")
def _philox_dropout_fake(x: Tensor, p: float, seed: int) -> Tensor:
    return x.new_empty(x.shape)


def _philox_dropout_setup(ctx, inputs, output):
    _, ctx.p, ctx.seed = inputs


def _philox_dropout_backward(ctx, grad):
    # The mask is a function of (seed, index): the gradient is the same dropout.
    return torch.ops.lrk.philox_dropout(grad, ctx.p, ctx.seed), None, None


torch.library.register_autograd(
    "lrk::philox_dropout", _philox_dropout_backward, setup_context=_philox_dropout_setup)


def philox_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    """Dropout with lrk's counter-based mask: a pure function of (seed, element index)."""
    return torch.ops.lrk.philox_dropout(x, p, seed)


# ----------------------------------------------------------------------------- fused LoRA


@torch.library.register_fake("lrk::lora_fused_fwd")
def _lora_fused_fwd_fake(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    torch._check(x.dim() >= 1, lambda: "x: expected a tensor of shape [..., in_features]")
    torch._check(weight.dim() == 2 and weight.shape[1] == x.shape[-1],
                 lambda: f"weight: expected shape [out_features, {x.shape[-1]}], got {tuple(weight.shape)}")
    torch._check(lora_a.dim() == 2 and lora_a.shape[1] == x.shape[-1],
                 lambda: f"lora_a: expected shape [rank, {x.shape[-1]}], got {tuple(lora_a.shape)}")
    torch._check(lora_b.dim() == 2 and lora_b.shape[0] == weight.shape[0] and lora_b.shape[1] == lora_a.shape[0],
                 lambda: f"lora_b: expected shape [{weight.shape[0]}, {lora_a.shape[0]}], got {tuple(lora_b.shape)}")
    lead = tuple(x.shape[:-1])
    return x.new_empty(lead + (weight.shape[0],)), x.new_empty(lead + (lora_a.shape[0],))


@torch.library.register_fake("lrk::lora_fused_bwd")
def _lora_fused_bwd_fake(grad_y, x, weight, lora_a, lora_b, h, scale, dropout_p, seed, need_grad_x):
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return grad_x, x.new_empty(lora_a.shape), x.new_empty(lora_b.shape)


# Autograd of lora_fused_fwd and dora_fused_fwd: csrc/lora/lora_autograd.cpp (in C++
# for host overhead; backward calls lora_fused_bwd / dora_fused_bwd below).


def lora_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
               scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """``y = x @ weight^T + bias + scale * (dropout(x) @ lora_a^T) @ lora_b^T``.

    x: [..., K]; weight: [N, K]; bias: [N] or None; lora_a: [r, K]; lora_b: [N, r].
    The dropout mask is regenerated from ``seed`` in backward (use a new seed each step).
    Gradients flow to x, lora_a, lora_b, and to weight / bias when they require grad.
    """
    return torch.ops.lrk.lora_fused(x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), seed)


# ----------------------------------------------------------------------------- fused DoRA


@torch.library.register_fake("lrk::dora_fused_fwd")
def _dora_fused_fwd_fake(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, weight_sq_norm):
    y_unscaled, h = _lora_fused_fwd_fake(x, weight, None, lora_a, lora_b, scale, dropout_p, seed)
    torch._check(magnitude.dim() == 1 and magnitude.shape[0] == weight.shape[0],
                 lambda: f"magnitude: expected shape [{weight.shape[0]}], got {tuple(magnitude.shape)}")
    return (x.new_empty(y_unscaled.shape), h, y_unscaled,
            x.new_empty((weight.shape[0],), dtype=torch.float64 if weight.dtype == torch.float64 else torch.float32))


@torch.library.register_fake("lrk::dora_grad_scale")
def _dora_grad_scale_fake(grad_y, y_unscaled, g):
    return torch.empty_like(grad_y, memory_format=torch.contiguous_format), g.new_empty((grad_y.shape[-1],))


@torch.library.register_fake("lrk::dora_fused_bwd")
def _dora_fused_bwd_fake(grad_y, x, weight, lora_a, lora_b, magnitude, h, y_unscaled, weight_norm, scale,
                         dropout_p, seed, need_grad_x):
    grad_x, grad_a, grad_b = _lora_fused_bwd_fake(grad_y, x, weight, lora_a, lora_b, h, scale, dropout_p, seed,
                                                  need_grad_x)
    return grad_x, grad_a, grad_b, magnitude.new_empty(magnitude.shape)


def dora_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
               magnitude: Tensor, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
               weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """DoRA: ``y = g * (x @ W^T + scale * (dropout(x) @ A^T) @ B^T) + bias`` with
    ``g = magnitude / ||W + scale * B @ A||`` (row norms, a constant in backward).

    Dropout applies to the LoRA branch only (the DoRA paper's form); PEFT in
    training mode with dropout also rescales a second base product computed on the
    dropped x, which costs a full extra GEMM. ``weight_sq_norm`` ([N], the squared
    row norms of a frozen W in float32, float64 for float64 W) may be cached by the caller.
    """
    return torch.ops.lrk.dora_fused(x, weight, bias, lora_a, lora_b, magnitude, float(scale), float(dropout_p),
                                    seed, weight_sq_norm)


def dora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                     weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """Row norms ``||W + scale * B @ A||_2`` ([N], float32; float64 for float64 W) without forming the sum."""
    return torch.ops.lrk.dora_weight_norm(weight, lora_a, lora_b, float(scale), weight_sq_norm)
