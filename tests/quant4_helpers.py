"""Test inputs of the 4-bit weight ops: random 4-bit weights in bitsandbytes' layout
(any code table, any absmax), and weights quantized by bitsandbytes itself."""
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from lrk import reference_quant as rq


@dataclass
class Weight4bit:
    """A 4-bit weight [rows, cols]: the arguments of linear_4bit, and the optional
    double-quantized absmax (absmax_q, absmax2, code2, blocksize2, offset)."""
    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    rows: int
    cols: int
    nested: Optional[tuple] = None

    def args(self):
        return (self.packed, self.absmax, self.code, self.blocksize, self.rows, self.cols)

    def to(self, device):
        nested = None
        if self.nested is not None:
            q, a2, c2, b2, off = self.nested
            nested = (q.to(device), a2.to(device), c2.to(device), b2, off)
        return Weight4bit(self.packed.to(device), self.absmax.to(device), self.code.to(device), self.blocksize,
                          self.rows, self.cols, nested)

    def dense(self, dtype=torch.float64):
        """The dequantized weight (float32 values widened to dtype), on the CPU."""
        return rq.dequantize_4bit(self.packed.cpu(), self.absmax.cpu(), self.code.cpu(), self.blocksize, self.rows,
                                  self.cols, dtype)


def random_weight_4bit(rows, cols, blocksize=64, device="cpu", generator=None):
    """Random codes, a random 16-entry table with both signs, absmax of varied sizes;
    the packed bytes as a [bytes, 1] column, as bitsandbytes stores them."""
    g = generator or torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    numel = rows * cols
    packed = torch.randint(0, 256, ((numel + 1) // 2, 1), generator=g, dtype=torch.uint8)
    blocks = (numel + blocksize - 1) // blocksize
    absmax = torch.rand(blocks, generator=g) * 2 + 0.05
    code = torch.sort(torch.randn(16, generator=g)).values / 2
    return Weight4bit(packed, absmax, code, blocksize, rows, cols).to(device)


def bnb_weight_4bit(w: torch.Tensor, quant_type="nf4", blocksize=64, double_quant=False):
    """W quantized by bitsandbytes (on the CPU), with its own dequantized weight."""
    F = pytest.importorskip("bitsandbytes.functional")
    packed, state = F.quantize_4bit(w.float(), blocksize=blocksize, quant_type=quant_type,
                                    compress_statistics=double_quant)
    rows, cols = w.shape
    nested = None
    if double_quant:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
        nested = (state.absmax, state.state2.absmax, state.state2.code, state.state2.blocksize,
                  float(state.offset))
    else:
        absmax = state.absmax
    weight = Weight4bit(packed, absmax, state.code, state.blocksize, rows, cols, nested)
    return weight, F.dequantize_4bit(packed, state).float(), state
