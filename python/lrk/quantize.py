"""lrk's NF4 / FP4 quantizer: a frozen weight in bitsandbytes' 4-bit layout
(``reference_quant.py``), bit for bit what ``bitsandbytes.functional.quantize_4bit``
stores on the CPU, so that a base quantized by either library feeds the other.

Per block of ``blocksize`` elements of the row-major flattened W (a block may span
rows): ``absmax`` = max |w| (float32); each w is scaled to [-1, 1] and takes the
code whose value is nearest (a value exactly between two codes takes the lower);
two codes per byte, the first in the high nibble; an odd element count pads the
last low nibble with the code of 0.

Double quantization stores absmax in 8 bits: ``offset`` = mean of absmax; the
centred absmax is quantized per block of 256 the same way against a signed
8-bit dynamic code (``dynamic_code_8bit``). These 8-bit codes equal those of
bitsandbytes' reference (PyTorch) kernel and of its nearest-code rule; its native
CPU library searches approximately and picks the neighbouring code for about
0.1% of the values (the stored absmax then differs by one 8-bit step).
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .quant_ops import Weight4bit

# The NF4 table (QLoRA's normal-float quantiles), sorted.
NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order: code i is the
# value of nibble i, so the table is not sorted; magnitudes over 6, the largest.
_FP4_MAGNITUDES = (0.0, 0.03125, 4.0, 6.0, 2.0, 3.0, 1.0, 1.5)
FP4_VALUES = tuple(m / 6 for m in _FP4_MAGNITUDES) + tuple(-m / 6 for m in _FP4_MAGNITUDES)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256  # double quantization's block of absmax values


def code_4bit(quant_type: str, device=None) -> Tensor:
    """The 16-entry float32 code table of ``"nf4"`` or ``"fp4"``."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32, device=device)
    if quant_type == "fp4":
        return torch.tensor(FP4_VALUES, dtype=torch.float32, device=device)
    raise ValueError(f"quant_type: expected 'nf4' or 'fp4', got {quant_type!r}")


@lru_cache(maxsize=None)
def _dynamic_code_values() -> tuple:
    """Signed dynamic 8-bit values: for exponent e = 0..6, the midpoints of 2^e + 1
    points evenly spaced in [0.1, 1] (float32), times 10^(e - 6), with both signs;
    then 0 and 1. Sorted."""
    values = [0.0, 1.0]
    for e in range(7):
        points = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (points[:-1] + points[1:]) / 2
        magnitudes = (10.0 ** (e - 6)) * mids
        values += magnitudes.tolist() + (-magnitudes).tolist()
    assert len(values) == 256
    return tuple(sorted(values))


def dynamic_code_8bit(device=None) -> Tensor:
    """The 256-entry float32 code of double quantization's absmax (sorted)."""
    return torch.tensor(_dynamic_code_values(), dtype=torch.float32, device=device)


def _scale_blocks(flat: Tensor, blocksize: int, store_clamped_tail: bool = True) -> tuple[Tensor, Tensor]:
    """(absmax per block, flat scaled by its block's absmax and clamped to [-1, 1]),
    in float32. Whole blocks multiply by the reciprocal of absmax, a partial last
    block divides by its absmax (bitsandbytes' rounding, kept for bit-identity);
    an all-zero block scales to zeros (its absmax is clamped to 1e-38; bitsandbytes
    stores that clamped value for a partial 4-bit block and the plain 0 for 8-bit)."""
    n = flat.numel()
    full = n - n % blocksize
    whole = flat[:full].view(-1, blocksize)
    absmax = whole.abs().amax(dim=1)
    scaled = [(whole * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)]
    if full < n:
        tail = flat[full:]
        tail_max = tail.abs().amax()
        clamped = tail_max.clamp(min=1e-38)
        scaled.append((tail / clamped).clamp(-1, 1))
        absmax = torch.cat([absmax, (clamped if store_clamped_tail else tail_max).reshape(1)])
    return absmax, torch.cat(scaled)


def _nearest_code(scaled: Tensor, sorted_code: Tensor) -> Tensor:
    """Index into sorted_code of the nearest value (a midpoint goes to the lower one)."""
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    return torch.bucketize(scaled, midpoints)


def quantize_absmax(absmax: Tensor, blocksize2: int = ABSMAX_BLOCKSIZE):
    """Double quantization: (absmax_q uint8, absmax2 float32, code2, offset) with
    absmax ~= code2[absmax_q] * absmax2[j // blocksize2] + offset."""
    offset = absmax.mean()
    code2 = dynamic_code_8bit(absmax.device)
    absmax2, scaled = _scale_blocks(absmax - offset, blocksize2, store_clamped_tail=False)
    return _nearest_code(scaled, code2).to(torch.uint8), absmax2, code2, offset


def quantize_4bit(weight: Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False) -> Weight4bit:
    """Quantizes a 2-D weight [out_features, in_features] (float32, bfloat16 or
    float16; values taken in float32) to lrk.Weight4bit in bitsandbytes' layout."""
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D tensor [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"weight: expected float32, bfloat16 or float16, got {weight.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of {BLOCKSIZES}, got {blocksize}")
    if weight.numel() == 0:
        raise ValueError("weight: expected a non-empty weight")
    code = code_4bit(quant_type, weight.device)
    order = torch.argsort(code)                    # sorted position -> nibble (identity for NF4)
    with torch.no_grad():
        flat = weight.detach().reshape(-1).float()
        absmax, scaled = _scale_blocks(flat, blocksize)
        if scaled.numel() % 2:
            scaled = torch.cat([scaled, scaled.new_zeros(1)])  # the padding nibble: the code of 0
        nibbles = order[_nearest_code(scaled, code[order])].to(torch.uint8)
        packed = ((nibbles[0::2] << 4) | nibbles[1::2]).unsqueeze(1)
        rows, cols = weight.shape
        if not double_quant:
            return Weight4bit(packed, absmax, code, blocksize, rows, cols)
        absmax_q, absmax2, code2, offset = quantize_absmax(absmax)
        return Weight4bit(packed, absmax_q, code, blocksize, rows, cols, absmax2, code2, ABSMAX_BLOCKSIZE,
                          float(offset))
