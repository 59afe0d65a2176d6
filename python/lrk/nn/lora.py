"""LoRA / DoRA adapters on a frozen nn.Linear, computed by lrk's fused ops.

Naming, initialisation and scaling follow PEFT (``lora_A`` [r, in], ``lora_B``
[out, r], ``lora_magnitude_vector`` [out], scale alpha/r or alpha/sqrt(r)), so
that weights move between the two by renaming keys only. ``adapter_forward`` and
``fresh_seed`` are shared with ``lrk.integrations.peft``.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..quant_ops import Weight4bit, qdora_fused, qlora_fused
from ._targets import BaseLayerView, check_targets, find_targets, replace_targets
from .linear4bit import Linear4bit

__all__ = ["LoRALinear", "apply_lora", "adapter_forward", "quantized_adapter_forward", "fresh_seed"]


def fresh_seed() -> int:
    """A dropout seed drawn from torch's default CPU generator, so that
    ``torch.manual_seed`` makes a run reproducible. Under torch.compile the
    ``.item()`` is a graph break (or an error with fullgraph=True)."""
    return int(torch.randint(0, 2**62, ()).item())


def _compute_dtype(x: Tensor, weight: Tensor, autocast: bool) -> torch.dtype:
    # lrk's ops take one dtype for all operands. Under autocast that is the
    # autocast dtype (as F.linear would use); float64 is never downcast, as in autocast.
    if autocast and x.dtype != torch.float64 and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def adapter_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                    magnitude: Optional[Tensor], scale: float, dropout_p: float, seed: int) -> Tensor:
    """One LoRA (``magnitude`` None) or DoRA layer through lrk's fused op.

    Adapter tensors are cast to the compute dtype (the base weight's, or the
    autocast dtype), so fp32 adapters on a bf16 base work and their gradients
    come back in their own dtype through the cast; a float32 magnitude stays
    float32 (dora_fused takes it with half operands). ``x`` must already match
    the base weight outside autocast, as for ``nn.Linear``.
    """
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = _compute_dtype(x, weight, autocast)

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    x, weight, bias, lora_a, lora_b = cast(x), cast(weight), cast(bias), cast(lora_a), cast(lora_b)
    half = dtype in (torch.bfloat16, torch.float16)
    if not (half and magnitude is not None and magnitude.dtype == torch.float32):
        magnitude = cast(magnitude)
    if autocast:
        # Operands are cast already; autocast must not reach the ATen calls inside
        # lrk's CPU kernels (it would split their fp32 accumulators from bf16 operands).
        with torch.autocast(x.device.type, enabled=False):
            return _fused(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed)
    return _fused(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed)


def _fused(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed):
    if magnitude is None:
        return torch.ops.lrk.lora_fused(x, weight, bias, lora_a, lora_b, float(scale), float(dropout_p), int(seed))
    return torch.ops.lrk.dora_fused(x, weight, bias, lora_a, lora_b, magnitude, float(scale),
                                    float(dropout_p), int(seed))


def quantized_adapter_forward(x: Tensor, weight: Weight4bit, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                              magnitude: Optional[Tensor], scale: float, dropout_p: float, seed: int,
                              compute_dtype: torch.dtype, weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """``adapter_forward`` over a frozen 4-bit base (QLoRA / QDoRA): x, bias and the
    adapter run in ``compute_dtype`` (or the autocast dtype), W stays in 4 bits.
    ``weight_sq_norm`` (DoRA, ``weight.sq_norm()``) may be cached by the caller."""
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = compute_dtype
    if autocast and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    x, bias, lora_a, lora_b = cast(x), cast(bias), cast(lora_a), cast(lora_b)
    if magnitude is not None and not (dtype in (torch.bfloat16, torch.float16) and magnitude.dtype == torch.float32):
        magnitude = cast(magnitude)
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        if magnitude is None:
            return qlora_fused(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
        return qdora_fused(x, weight, bias, lora_a, lora_b, magnitude, scale, dropout_p, seed, weight_sq_norm)


class LoRALinear(BaseLayerView, nn.Module):
    """``y = base(x) + s * (dropout(x) @ A^T) @ B^T`` on a frozen ``nn.Linear``;
    with ``use_dora=True``: ``y = g * (x @ W^T + s * (dropout(x) @ A^T) @ B^T) + bias``,
    ``g = lora_magnitude_vector / ||W + s * B @ A||`` (row norms, a constant in backward).

    ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).
    ``init_lora_weights``: True (A Kaiming-uniform, B zero: the layer starts as the
    base layer), "gaussian" (A normal with std 1/r, B zero) or False (A and B both
    with nn.Linear's default init, a non-zero adapter; for tests), as PEFT does.

    Dropout (training mode only) draws a fresh seed per call from torch's default
    generator. With DoRA it applies to the LoRA branch only, as in the DoRA paper;
    PEFT's DoRA in training mode with dropout instead also computes the
    magnitude-rescaled base term on the dropped input (an extra full GEMM), so the
    two differ when dropout > 0 (they agree exactly with dropout 0 or in eval mode).

    ``merge()`` folds the adapter into ``base_layer.weight`` (for inference: while
    merged, forward is the base layer alone and the adapter gets no gradient);
    ``unmerge()`` takes it out again.

    QLoRA / QDoRA: ``base`` may be a frozen 4-bit ``lrk.nn.Linear4bit``
    (``LoRALinear.from_linear(linear, r, quantize="nf4")`` builds one); the adapter
    then lives in the base's compute dtype and runs through ``qlora_fused`` /
    ``qdora_fused`` (W never dequantized in full). Such a layer cannot merge.
    """

    def __init__(self, base: nn.Linear, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False,
                 init_lora_weights: Union[bool, str] = True) -> None:
        super().__init__()
        _check_arguments(base, r, lora_alpha, lora_dropout, init_lora_weights)
        self.base_layer = base
        self.quantized = isinstance(base, Linear4bit)
        if not self.quantized:
            base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.r = int(r)
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = bool(use_rslora)
        self.use_dora = bool(use_dora)
        self.scaling = self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
        dtype = base.compute_dtype if self.quantized else base.weight.dtype
        factory = dict(device=base.weight.device, dtype=dtype)
        self.lora_A = nn.Parameter(torch.empty(self.r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, self.r, **factory))
        self._init_adapter(init_lora_weights)
        if self.use_dora:
            # PEFT's init: the norm of W + s*B@A, which is ||W|| for a zero B.
            self.lora_magnitude_vector = nn.Parameter(self._adapted_row_norm().to(dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self._merged = False
        self._merged_norm: Optional[Tensor] = None  # DoRA: the norm merge() used, needed to unmerge

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, quantize: Optional[str] = None, blocksize: int = 64,
                    double_quant: bool = False, **kwargs) -> "LoRALinear":
        """A LoRALinear on ``linear``, or with ``quantize="nf4"`` / ``"fp4"`` on a 4-bit
        copy of it (``Linear4bit.from_linear``: QLoRA, or QDoRA with use_dora=True)."""
        if quantize is not None:
            linear = Linear4bit.from_linear(linear, quantize, blocksize, double_quant)
        return cls(linear, r, **kwargs)

    @torch.no_grad()
    def _init_adapter(self, init_lora_weights: Union[bool, str]) -> None:
        if init_lora_weights is True or init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:  # "gaussian"
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        if self._merged:
            return self.base_layer(x)
        p = self.lora_dropout if self.training else 0.0
        seed = fresh_seed() if p > 0.0 else 0  # no RNG draw in eval mode
        if self.quantized:
            base = self.base_layer
            return quantized_adapter_forward(x, base.weight4bit, base.bias, self.lora_A, self.lora_B,
                                             self.lora_magnitude_vector, self.scaling, p, seed, base.compute_dtype,
                                             base.weight_sq_norm() if self.use_dora else None)
        return adapter_forward(x, self.base_layer.weight, self.base_layer.bias, self.lora_A, self.lora_B,
                               self.lora_magnitude_vector, self.scaling, p, seed)

    # ------------------------------------------------------------------ merge / unmerge

    def _delta_weight(self) -> Tensor:
        """s * B @ A in float32 (float64 for float64 weights), for merging."""
        acc = torch.float64 if self.base_layer.weight.dtype == torch.float64 else torch.float32
        return self.scaling * (self.lora_B.detach().to(acc) @ self.lora_A.detach().to(acc))

    def _adapted_row_norm(self) -> Tensor:
        if self.quantized:  # ||W + s*B@A|| from qdora's forward on no tokens: W stays in 4 bits
            base = self.base_layer
            x = self.lora_A.new_empty((0, self.in_features))
            w, nested = base.weight4bit.op_args(), base.weight4bit.nested_args()
            return torch.ops.lrk.qdora_fused_fwd(x, *w, None, self.lora_A.detach(), self.lora_B.detach(),
                                                 self.lora_A.new_ones(self.out_features), self.scaling, 0.0, 0,
                                                 base.weight_sq_norm(), *nested)[3]
        w = self.base_layer.weight.detach()
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        return torch.linalg.vector_norm(w.to(acc) + self._delta_weight(), dim=1)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into base_layer.weight: W + s*B@A, or for DoRA
        g * (W + s*B@A) with the current g. A no-op (with a warning) when merged."""
        if self.quantized:
            raise ValueError("LoRALinear.merge(): the base is a 4-bit Linear4bit; merging would requantize it "
                             "(dequantize the base into an nn.Linear first)")
        if self._merged:
            warnings.warn("LoRALinear.merge(): already merged, nothing to do")
            return
        w = self.base_layer.weight
        delta = self._delta_weight()
        merged = w.to(delta.dtype) + delta
        if self.use_dora:
            norm = torch.linalg.vector_norm(merged, dim=1)
            merged = (self.lora_magnitude_vector.detach().to(norm.dtype) / norm).unsqueeze(1) * merged
            self._merged_norm = norm
        w.copy_(merged.to(w.dtype))
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge(): W = W' - s*B@A, or W'/g - s*B@A with the g that merge used.
        A no-op (with a warning) when not merged."""
        if not self._merged:
            warnings.warn("LoRALinear.unmerge(): not merged, nothing to do")
            return
        w = self.base_layer.weight
        delta = self._delta_weight()
        orig = w.to(delta.dtype)
        if self.use_dora:
            g = self.lora_magnitude_vector.detach().to(delta.dtype) / self._merged_norm
            orig = orig / g.unsqueeze(1)
            self._merged_norm = None
        w.copy_((orig - delta).to(w.dtype))
        self._merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha:g}, scaling={self.scaling:.4g}, lora_dropout={self.lora_dropout:g}, "
                f"use_rslora={self.use_rslora}, use_dora={self.use_dora}, merged={self._merged}"
                + (", quantized base" if self.quantized else ""))


def _check_arguments(base, r, lora_alpha, lora_dropout, init_lora_weights) -> None:
    if not isinstance(base, (nn.Linear, Linear4bit)):
        raise ValueError(f"base: expected an nn.Linear, got {type(base).__name__} (or a 4-bit lrk.nn.Linear4bit)")
    if isinstance(base, nn.Linear) and not base.weight.is_floating_point():
        raise ValueError(f"base: expected a floating-point weight, got {base.weight.dtype} "
                         "(quantized layers are not supported)")
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"r: expected an int, got {r!r}")
    if r < 1:
        raise ValueError(f"r: expected a rank of at least 1, got {r}")
    if r > min(base.in_features, base.out_features):
        raise ValueError(f"r: rank {r} is larger than min(in_features, out_features) = "
                         f"min({base.in_features}, {base.out_features})")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
        raise ValueError(f"lora_alpha: expected a finite number, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) \
            or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout!r}")
    if not (init_lora_weights is True or init_lora_weights is False or init_lora_weights == "gaussian"):
        raise ValueError(f"init_lora_weights: expected True, False or 'gaussian', got {init_lora_weights!r}")


# ---------------------------------------------------------------------------- model surgery


def apply_lora(model: nn.Module, target_modules: Union[str, Sequence[str]], r: int, lora_alpha: float = 8,
               lora_dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
               init_lora_weights: Union[bool, str] = True) -> nn.Module:
    """Replace every nn.Linear of ``model`` whose qualified name matches
    ``target_modules`` (PEFT's rule: a list of name suffixes such as
    ``["q_proj", "v_proj"]``, or a regex string matched against the full name)
    by a LoRALinear, freeze every other parameter, and return ``model`` (changed in place).

    Raises ValueError when nothing matches, or when a matching module is not an nn.Linear.
    """
    targets = find_targets(model, check_targets(target_modules), strict=True, adapter_type=LoRALinear)
    replace_targets(model, targets, lambda module: LoRALinear(
        module, r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_rslora=use_rslora, use_dora=use_dora,
        init_lora_weights=init_lora_weights))
    return model
