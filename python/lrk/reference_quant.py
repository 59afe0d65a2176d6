"""Pure-PyTorch references of lrk's 4-bit weight ops, written for clarity: they
dequantize the whole weight, which the kernels never do.

The layout is bitsandbytes' (``bitsandbytes.functional.quantize_4bit``): the
weight W [rows, cols] is flattened row-major; element i is the high nibble of
``packed[i // 2]`` when i is even and the low nibble when i is odd; its value is
``code[nibble] * absmax[i // blocksize]``. Blocks run over the flattened weight,
so a block may span two rows when cols is not a multiple of blocksize.
Double quantization stores absmax itself in 8 bits:
``absmax[j] = code2[absmax_q[j]] * absmax2[j // blocksize2] + offset``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def unpack_4bit(packed: Tensor, numel: int) -> Tensor:
    """The 4-bit codes (int64, [numel]) of a packed uint8 tensor."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 15], dim=1).reshape(-1)[:numel].long()


def dequantize_4bit(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, rows: int, cols: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """The full weight ``[rows, cols]`` in ``dtype`` (values formed in float32, as bitsandbytes does)."""
    numel = rows * cols
    codes = unpack_4bit(packed, numel)
    scales = absmax.float().repeat_interleave(blocksize)[:numel]
    return (code.float()[codes] * scales).reshape(rows, cols).to(dtype)


def dequantize_absmax(absmax_q: Tensor, absmax2: Tensor, code2: Tensor, blocksize2: int, offset: float) -> Tensor:
    """Double quantization's float32 absmax."""
    n = absmax_q.numel()
    return code2.float()[absmax_q.long()] * absmax2.float().repeat_interleave(blocksize2)[:n] + float(offset)


def linear_4bit(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
                in_features: int) -> Tensor:
    """``x @ W^T`` in x's dtype (pass float64 x for a gold standard)."""
    w = dequantize_4bit(packed, absmax, code, blocksize, out_features, in_features, x.dtype)
    return x @ w.t()


def linear_4bit_grad_input(grad_y: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
                           out_features: int, in_features: int) -> Tensor:
    """``grad_y @ W`` in grad_y's dtype."""
    w = dequantize_4bit(packed, absmax, code, blocksize, out_features, in_features, grad_y.dtype)
    return grad_y @ w


def qlora_fused(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
                in_features: int, bias, lora_a: Tensor, lora_b: Tensor, scale: float = 1.0, dropout_p: float = 0.0,
                seed: int = 0) -> Tensor:
    """lora_fused over the dequantized W (in x's dtype; W gets no gradient)."""
    from . import reference
    w = dequantize_4bit(packed, absmax, code, blocksize, out_features, in_features, x.dtype)
    return reference.lora_fused(x, w, bias, lora_a, lora_b, scale, dropout_p, seed)


def qdora_fused(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, out_features: int,
                in_features: int, bias, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, scale: float = 1.0,
                dropout_p: float = 0.0, seed: int = 0) -> Tensor:
    """dora_fused over the dequantized W (the norm a constant in backward, as there)."""
    from . import reference
    w = dequantize_4bit(packed, absmax, code, blocksize, out_features, in_features, x.dtype)
    return reference.dora_fused(x, w, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed)
