"""A frozen linear layer stored in 4 bits (NF4 / FP4, bitsandbytes' layout): the
base of QLoRA / QDoRA adapters (``lrk.nn.LoRALinear``).

The weight lives as buffers (packed codes, absmax or its double-quantized triple,
the code table), so ``.to(device)`` and the state dict carry it; it is never
dequantized in full by the forward (``lrk.quant_ops.linear_4bit``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..quant_ops import Weight4bit, linear_4bit
from ..quantize import quantize_4bit

__all__ = ["Linear4bit"]


class Linear4bit(nn.Module):
    """``y = x @ W^T + bias`` with a frozen 4-bit W [out_features, in_features].

    ``compute_dtype``: the dtype of the products and of the output (that of the
    nn.Linear it came from by default); under autocast the autocast dtype.
    """

    def __init__(self, weight: Weight4bit, bias: Optional[Tensor] = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = int(weight.in_features)
        self.out_features = int(weight.out_features)
        self.blocksize = int(weight.blocksize)
        self.blocksize2 = int(weight.blocksize2)
        self.offset = float(weight.offset)
        self.compute_dtype = compute_dtype
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("code", weight.code)
        self.register_buffer("absmax2", weight.absmax2)
        self.register_buffer("code2", weight.code2)
        self.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False) if bias is not None else None
        self._sq_norm: Optional[Tensor] = None  # ||W_n||^2 (float64), computed once: W is frozen

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64,
                    double_quant: bool = False, compute_dtype: Optional[torch.dtype] = None) -> "Linear4bit":
        """Quantizes ``linear.weight`` (lrk.quantize.quantize_4bit, bit-identical to
        bitsandbytes); the bias stays in the compute dtype."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        dtype = compute_dtype or (weight.dtype if weight.dtype != torch.float64 else torch.float32)
        source = weight if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else weight.float()
        return cls(quantize_4bit(source, quant_type, blocksize, double_quant), linear.bias, dtype)

    # The scalars of the format travel in the state dict beside the buffers (a float
    # offset, not a tensor: reading a device tensor's value each call would sync).
    def get_extra_state(self) -> dict:
        return {"blocksize": self.blocksize, "blocksize2": self.blocksize2, "offset": self.offset,
                "in_features": self.in_features, "out_features": self.out_features}

    def set_extra_state(self, state: dict) -> None:
        if (state["in_features"], state["out_features"]) != (self.in_features, self.out_features):
            raise ValueError(f"Linear4bit: state of a {state['out_features']} x {state['in_features']} weight, "
                             f"this layer is {self.out_features} x {self.in_features}")
        self.blocksize, self.blocksize2, self.offset = int(state["blocksize"]), int(state["blocksize2"]), \
            float(state["offset"])
        self._sq_norm = None  # new weight: the cached norms are stale

    @property
    def weight4bit(self) -> Weight4bit:
        return Weight4bit(self.packed, self.absmax, self.code, self.blocksize, self.out_features, self.in_features,
                          self.absmax2, self.code2, self.blocksize2, self.offset)

    @property
    def weight(self) -> Tensor:
        """The packed codes (a dtype probe on ``.weight`` sees uint8, as with bitsandbytes)."""
        return self.packed

    def weight_sq_norm(self) -> Tensor:
        """||W_n||^2 per row, float64, cached (recomputed if the buffers moved)."""
        if self._sq_norm is None or self._sq_norm.device != self.packed.device:
            self._sq_norm = self.weight4bit.sq_norm()
        return self._sq_norm

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The whole W in ``dtype`` (the compute dtype by default), for checks and merging elsewhere."""
        return self.weight4bit.dequantize(dtype or self.compute_dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype
        if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:
            dtype = torch.get_autocast_dtype(x.device.type)
        w = self.weight4bit
        y = linear_4bit(x.to(dtype), w.packed, w.float_absmax(), w.code, w.blocksize, w.out_features, w.in_features)
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self) -> str:
        kind = "double-quantized " if self.absmax2 is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, {kind}compute_dtype={self.compute_dtype}")
