"""4-bit quantized weights (QLoRA bases): fake kernels and Python entry points.

Layout and semantics: ``csrc/registration.cpp`` and ``reference_quant.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

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


# ----------------------------------------------------------------------------- fused QLoRA / QDoRA


@torch.library.register_fake("lrk::weight_4bit_sq_norm")
def _weight_4bit_sq_norm_fake(packed, absmax, code, blocksize, out_features, in_features):
    return absmax.new_empty((out_features,), dtype=torch.float64)


def _check_lora_factors(x, lora_a, lora_b, out_features, in_features):
    torch._check(x.dim() >= 1 and x.shape[-1] == in_features,
                 lambda: f"x: expected shape [..., {in_features}] (in_features), got {tuple(x.shape)}")
    torch._check(lora_a.dim() == 2 and lora_a.shape[1] == in_features,
                 lambda: f"lora_a: expected shape [rank, {in_features}], got {tuple(lora_a.shape)}")
    torch._check(lora_b.dim() == 2 and lora_b.shape[0] == out_features and lora_b.shape[1] == lora_a.shape[0],
                 lambda: f"lora_b: expected shape [{out_features}, {lora_a.shape[0]}], got {tuple(lora_b.shape)}")


@torch.library.register_fake("lrk::qlora_fused_fwd")
def _qlora_fused_fwd_fake(x, packed, absmax, code, blocksize, out_features, in_features, bias, lora_a, lora_b,
                          scale, dropout_p, seed, absmax2, code2, blocksize2, offset):
    _check_lora_factors(x, lora_a, lora_b, out_features, in_features)
    return x.new_empty(_out_shape(x, out_features)), x.new_empty(_out_shape(x, lora_a.shape[0]))


@torch.library.register_fake("lrk::qlora_fused_bwd")
def _qlora_fused_bwd_fake(grad_y, x, packed, absmax, code, blocksize, out_features, in_features, lora_a, lora_b, h,
                          scale, dropout_p, seed, need_grad_x, absmax2, code2, blocksize2, offset):
    grad_x = x.new_empty(x.shape) if need_grad_x else x.new_empty((0,))
    return grad_x, x.new_empty(lora_a.shape), x.new_empty(lora_b.shape)


@torch.library.register_fake("lrk::qdora_fused_fwd")
def _qdora_fused_fwd_fake(x, packed, absmax, code, blocksize, out_features, in_features, bias, lora_a, lora_b,
                          magnitude, scale, dropout_p, seed, weight_sq_norm, absmax2, code2, blocksize2, offset):
    _check_lora_factors(x, lora_a, lora_b, out_features, in_features)
    torch._check(magnitude.dim() == 1 and magnitude.shape[0] == out_features,
                 lambda: f"magnitude: expected shape [{out_features}], got {tuple(magnitude.shape)}")
    y = x.new_empty(_out_shape(x, out_features))
    norm_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (y, x.new_empty(_out_shape(x, lora_a.shape[0])), x.new_empty(y.shape),
            x.new_empty((out_features,), dtype=norm_dtype))


@torch.library.register_fake("lrk::qdora_fused_bwd")
def _qdora_fused_bwd_fake(grad_y, x, packed, absmax, code, blocksize, out_features, in_features, lora_a, lora_b,
                          magnitude, h, y_unscaled, weight_norm, scale, dropout_p, seed, need_grad_x, absmax2, code2,
                          blocksize2, offset):
    grad_x, grad_a, grad_b = _qlora_fused_bwd_fake(grad_y, x, packed, absmax, code, blocksize, out_features,
                                                   in_features, lora_a, lora_b, h, scale, dropout_p, seed,
                                                   need_grad_x, absmax2, code2, blocksize2, offset)
    return grad_x, grad_a, grad_b, magnitude.new_empty(magnitude.shape)


# Autograd of qlora_fused_fwd and qdora_fused_fwd: csrc/quant/qlora_autograd.cpp.


@dataclass(frozen=True)
class Weight4bit:
    """A frozen weight W [out_features, in_features] in bitsandbytes' 4-bit layout.

    ``absmax`` is float32 [blocks], or for double quantization uint8 [blocks] with
    ``absmax2``, ``code2``, ``blocksize2`` and ``offset`` (bitsandbytes' ``state2``
    and ``offset``). The tensors are the caller's: nothing is copied.
    """
    packed: Tensor
    absmax: Tensor
    code: Tensor
    blocksize: int
    out_features: int
    in_features: int
    absmax2: Optional[Tensor] = None
    code2: Optional[Tensor] = None
    blocksize2: int = 256
    offset: float = 0.0

    @property
    def double_quantized(self) -> bool:
        return self.absmax2 is not None

    @property
    def shape(self) -> tuple:
        return (self.out_features, self.in_features)

    def float_absmax(self) -> Tensor:
        """absmax in float32 (dequantized when double-quantized)."""
        if not self.double_quantized:
            return self.absmax
        return dequantize_absmax(self.absmax, self.absmax2, self.code2, self.blocksize2, self.offset)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The whole W (for references and checks; the fused ops never form it)."""
        from .reference_quant import dequantize_4bit
        return dequantize_4bit(self.packed, self.float_absmax(), self.code, self.blocksize, self.out_features,
                               self.in_features, dtype)

    def sq_norm(self) -> Tensor:
        """||W_n||^2 per row ([out_features], float64), one block of rows at a time."""
        return torch.ops.lrk.weight_4bit_sq_norm(self.packed, self.float_absmax(), self.code, self.blocksize,
                                                 self.out_features, self.in_features)

    def op_args(self) -> tuple:
        return (self.packed, self.absmax, self.code, self.blocksize, self.out_features, self.in_features)

    def nested_args(self) -> tuple:
        return (self.absmax2, self.code2, self.blocksize2, float(self.offset))

    @classmethod
    def from_bnb(cls, packed: Tensor, quant_state) -> "Weight4bit":
        """From a bitsandbytes ``Params4bit`` (its data) and ``QuantState``, sharing their tensors."""
        rows, cols = (int(s) for s in quant_state.shape)
        if getattr(quant_state, "nested", False):
            s2 = quant_state.state2
            return cls(packed, quant_state.absmax, quant_state.code, int(quant_state.blocksize), rows, cols,
                       s2.absmax, s2.code, int(s2.blocksize), float(quant_state.offset))
        return cls(packed, quant_state.absmax, quant_state.code, int(quant_state.blocksize), rows, cols)


def qlora_fused(x: Tensor, weight: Weight4bit, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """QLoRA: ``y = x @ W^T + bias + scale * (dropout(x) @ lora_a^T) @ lora_b^T`` for a frozen
    4-bit W (never dequantized in full; no gradient). Semantics otherwise as ``lrk.lora_fused``."""
    return torch.ops.lrk.qlora_fused(x, *weight.op_args(), bias, lora_a, lora_b, float(scale), float(dropout_p),
                                     seed, *weight.nested_args())


def qdora_fused(x: Tensor, weight: Weight4bit, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                magnitude: Tensor, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
                weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """QDoRA: ``lrk.dora_fused`` over a frozen 4-bit W. ``weight_sq_norm`` ([out_features],
    ``weight.sq_norm()``) may be cached by the caller: W is frozen."""
    return torch.ops.lrk.qdora_fused(x, *weight.op_args(), bias, lora_a, lora_b, magnitude, float(scale),
                                     float(dropout_p), seed, weight_sq_norm, *weight.nested_args())
