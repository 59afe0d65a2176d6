"""4-bit quantized weights (QLoRA bases): fake kernels and Python entry points.

Layout and semantics: ``csrc/registration.cpp`` and ``reference_quant.py``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _out_shape(t: Tensor, last: int) -> list:
    return list(t.shape[:-1]) + [last]


@torch.library.register_fake("lrk::linear_4bit")
def _linear_4bit_fake(x, packed, absmax, code, blocksize, out_features, in_features):
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"x: expected shape [..., {in_features}] (in_features), got {tuple(x.shape)}")
    return x.new_empty(_out_shape(x, out_features))


@torch.library.register_fake("lrk::linear_4bit_grad_input")
def _linear_4bit_grad_input_fake(grad_y, packed, absmax, code, blocksize, out_features, in_features):
    torch._check(grad_y.dim() >= 1 and grad_y.shape[-1] == out_features,
                 lambda: f"grad_y: expected shape [..., {out_features}] (out_features), got {tuple(grad_y.shape)}")
    return grad_y.new_empty(_out_shape(grad_y, in_features))


@torch.library.register_fake("lrk::dequantize_absmax")
def _dequantize_absmax_fake(absmax_q, absmax2, code2, blocksize2, offset):
    return absmax_q.new_empty(absmax_q.shape, dtype=torch.float32)


def linear_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
                in_features: int) -> Tensor:
    """``x @ W^T`` for a 4-bit W [out_features, in_features] (bitsandbytes' layout), never forming W."""
    return torch.ops.lrk.linear_4bit(x, packed, absmax, code, blocksize, out_features, in_features)


def linear_4bit_grad_input(grad_y: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
                           out_features: int, in_features: int) -> Tensor:
    """``grad_y @ W`` for a 4-bit W [out_features, in_features], never forming W."""
    return torch.ops.lrk.linear_4bit_grad_input(grad_y, packed, absmax, code, blocksize, out_features, in_features)


def dequantize_absmax(absmax_q: Tensor, absmax2: Tensor, code2: Tensor, blocksize2: int, offset: float) -> Tensor:
    """The float32 absmax of a double-quantized 4-bit weight (bitsandbytes' ``compress_statistics``)."""
    return torch.ops.lrk.dequantize_absmax(absmax_q, absmax2, code2, blocksize2, float(offset))
