"""Run PEFT's LoRA / DoRA Linear layers through lrk's fused ops, in place.

``accelerate(peft_model)`` swaps the ``forward`` of each eligible
``peft.tuners.lora.layer.Linear`` instance for one that calls lrk on PEFT's own
parameter tensors (``lora_A[name].weight``, ``lora_B[name].weight``,
``lora_magnitude_vector[name].weight``, ``scaling[name]``): gradients land in
PEFT's parameters, the state dict and ``save_pretrained`` output do not change,
and ``restore`` gives the layers their own forward back.

Written against PEFT 0.21's ``Linear.forward`` and ``DoraLinearLayer.forward``.
Differences from PEFT's path, both deliberate:
- dropout masks come from lrk's Philox generator with a fresh seed per call
  (drawn from torch's default generator), not from nn.Dropout's RNG;
- DoRA with dropout in training mode applies dropout to the LoRA branch only
  (the DoRA paper's form); PEFT additionally rescales a base product computed on
  the dropped input. With dropout 0, or in eval mode, the two agree.
Adapter weights in another dtype than the base (PEFT keeps bf16 models' adapters
in fp32 by default) are computed in the base's dtype (or the autocast dtype).

QLoRA / QDoRA: PEFT's ``lora.bnb.Linear4bit`` (or its plain ``Linear``) over a
``bitsandbytes.nn.Linear4bit``
(NF4 / FP4, plain or double-quantized absmax) runs through ``qlora_fused`` /
``qdora_fused`` on bitsandbytes' own storage: the packed weight and its
``quant_state`` (absmax, code, blocksize, shape, nested state2 and offset) are
read on every call, never copied or dequantized in full. The layer computes in
the base's ``compute_dtype`` (bitsandbytes' own rule for the base product; PEFT
runs the LoRA branch in the adapter's dtype instead) and returns x's dtype.
"""
from __future__ import annotations

import types
import warnings
from typing import Optional

import torch
from torch import nn

try:
    from peft.tuners.lora.layer import Linear as _PeftLinear
    from peft.tuners.lora.layer import LoraLayer as _PeftLoraLayer
    from peft.tuners.lora.variants import DoraLinearVariant as _DoraVariant
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("lrk.integrations.peft needs PEFT (pip install peft)") from exc

from ..nn import lora as _lora
from ..quant_ops import Weight4bit

try:  # PEFT defines its 4-bit LoRA layer only when bitsandbytes is installed
    import bitsandbytes as _bnb
    from peft.tuners.lora.bnb import Linear4bit as _PeftLinear4bit
except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - depends on the environment
    _bnb = None
    _PeftLinear4bit = None

__all__ = ["accelerate", "restore", "is_accelerated"]

_HAS_DORA_OP = hasattr(torch.ops.lrk, "dora_fused")


def _unsupported_reason(layer: nn.Module) -> Optional[str]:
    """Why this LoRA layer can't take lrk's path (None if it can). Checked once, at accelerate()."""
    # PEFT wraps a bitsandbytes base in its lora.bnb.Linear4bit for models flagged
    # is_loaded_in_4bit (transformers' BitsAndBytesConfig), in its plain Linear otherwise.
    quantized = _bnb is not None and type(getattr(layer, "base_layer", None)) is _bnb.nn.Linear4bit
    if type(layer) is not _PeftLinear and not (quantized and type(layer) is _PeftLinear4bit):
        return f"layer type {type(layer).__name__}"
    if "forward" in layer.__dict__:
        return "forward already replaced on the instance (hooks?)"
    base = layer.base_layer
    if quantized:
        reason = _bnb_base_unsupported_reason(base)
        if reason is not None:
            return reason
    elif type(base) is not nn.Linear:
        return f"base layer type {type(base).__name__}"
    elif type(base.weight) not in (nn.Parameter, torch.Tensor) or not base.weight.is_floating_point():
        return "quantized or tensor-subclass base weight"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out"
    for name in layer.lora_A:
        reason = _adapter_unsupported_reason(layer, name)
        if reason is not None:
            return f"adapter {name!r}: {reason}"
    return None


def _bnb_base_unsupported_reason(base: nn.Module) -> Optional[str]:
    if type(base) is not _bnb.nn.Linear4bit:
        return f"base layer type {type(base).__name__}"
    state = getattr(base.weight, "quant_state", None)
    if not getattr(base.weight, "bnb_quantized", False) or state is None:
        return "4-bit weight not quantized yet (bitsandbytes quantizes it when the model moves to its device)"
    if state.quant_type not in ("nf4", "fp4"):
        return f"4-bit quant_type {state.quant_type!r}"
    if getattr(state, "packing_format_for_cpu", False):
        return "bitsandbytes' repacked CPU inference layout"
    return None


def _weight_4bit(base: nn.Module) -> Weight4bit:
    """bitsandbytes' storage of a Linear4bit as lrk's Weight4bit (its own tensors), read
    on every call so that a changed quant_state is what the op sees and checks."""
    data = base.weight.data
    packed = data if data.dtype == torch.uint8 else data.reshape(-1).view(torch.uint8)  # quant_storage
    return Weight4bit.from_bnb(packed, base.weight.quant_state)


def _cached_sq_norm(layer: nn.Module, weight: Weight4bit) -> torch.Tensor:
    """DoRA's ||W_n||^2 of the frozen 4-bit base, cached on the layer; recomputed
    when the storage or the quant state it came from changes."""
    key = (weight.packed.data_ptr(), weight.packed._version, weight.absmax.data_ptr(), weight.absmax._version,
           weight.shape, weight.blocksize, weight.offset)
    cached = layer.__dict__.get("_lrk_sq_norm")
    if cached is None or cached[0] != key:
        cached = (key, weight.sq_norm())
        layer.__dict__["_lrk_sq_norm"] = cached
    return cached[1]


def _adapter_unsupported_reason(layer: nn.Module, name: str) -> Optional[str]:
    variant = layer.lora_variant.get(name)
    if variant is not None and type(variant) is not _DoraVariant:
        return f"LoRA variant {type(variant).__name__}"
    if variant is not None and not _HAS_DORA_OP:
        return "DoRA, and this lrk build has no dora_fused"
    if layer.lora_bias.get(name, False):
        return "lora_bias"
    if type(layer.lora_dropout[name]) not in (nn.Dropout, nn.Identity):
        return f"dropout type {type(layer.lora_dropout[name]).__name__}"
    return None


def _fast_path_operands(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> Optional[tuple]:
    """(base layer, lora_A, lora_B, magnitude or None, dropout module, scale) of the
    adapter to run through lrk for this call, or None for PEFT's own forward. Each
    module attribute is looked up once: at small batch sizes a layer's step is
    host-bound, and this runs on every call.

    Call-time state: merged or disabled adapters, several active adapters, extra
    arguments (adapter_names, ...), adapters added after accelerate(), hooks on
    the base layer, devices or dtypes that lrk's op would not take.
    """
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = layer.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    lora_a_modules = layer.lora_A
    if name not in lora_a_modules or _adapter_unsupported_reason(layer, name) is not None:
        return None
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, nn.Dropout) and dropout.p >= 1.0:
        return None
    base = layer.base_layer
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return None
    w = base.weight
    device = w.device
    if not x.is_floating_point() or x.device != device:
        return None
    quantized = _bnb is not None and type(base) is _bnb.nn.Linear4bit
    if quantized and getattr(w.quant_state, "packing_format_for_cpu", False):
        return None  # bitsandbytes repacked it for its CPU inference kernel (another layout)
    if x.dtype != w.dtype and not quantized and not torch.is_autocast_enabled(device.type):
        return None  # F.linear would reject it too: let PEFT's path say so
    lora_a, lora_b = lora_a_modules[name].weight, layer.lora_B[name].weight
    magnitudes = layer.lora_magnitude_vector
    magnitude = magnitudes[name].weight if name in magnitudes else None
    if lora_a.device != device or lora_b.device != device or (magnitude is not None and magnitude.device != device):
        return None
    return base, lora_a, lora_b, magnitude, dropout, layer.scaling[name]


def _lrk_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Bound to a PEFT Linear instance as its forward by accelerate()."""
    operands = _fast_path_operands(self, x, args, kwargs)
    if operands is None:
        return type(self).forward(self, x, *args, **kwargs)
    base, lora_a, lora_b, magnitude, dropout, scale = operands
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    seed = _lora.fresh_seed() if p > 0.0 else 0
    if _bnb is not None and type(base) is _bnb.nn.Linear4bit:
        weight = _weight_4bit(base)
        sq_norm = _cached_sq_norm(self, weight) if magnitude is not None else None
        y = _lora.quantized_adapter_forward(x, weight, base.bias, lora_a, lora_b, magnitude, scale, p, seed,
                                            base.compute_dtype or x.dtype, sq_norm)
        return y if y.dtype == x.dtype or torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)
    return _lora.adapter_forward(x, base.weight, base.bias, lora_a, lora_b, magnitude, scale, p, seed)


def is_accelerated(layer: nn.Module) -> bool:
    fwd = layer.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and fwd.__func__ is _lrk_forward


def accelerate(peft_model: nn.Module) -> list[str]:
    """Route every eligible PEFT LoRA/DoRA Linear layer of ``peft_model`` through lrk.

    Eligible: exactly ``peft.tuners.lora.layer.Linear`` over a plain ``nn.Linear``
    with a floating-point weight, or it or ``peft.tuners.lora.bnb.Linear4bit`` over a
    quantized ``bitsandbytes.nn.Linear4bit`` (NF4 / FP4), not fan_in_fan_out, every adapter plain LoRA or
    DoRA without lora_bias, dropout nn.Dropout or nn.Identity. Other LoRA layers
    (Embedding, Conv, 8-bit bases, other variants ...) keep PEFT's forward and
    are named in one warning. At call time the layer falls back to PEFT's forward
    when merged, disabled, with several active adapters, or given extra arguments.

    Returns the qualified names of the accelerated layers (including ones
    accelerated before). Idempotent.
    """
    done, skipped = [], []
    for qual_name, module in peft_model.named_modules():
        if not isinstance(module, _PeftLoraLayer):
            continue
        if is_accelerated(module):
            done.append(qual_name)
            continue
        reason = _unsupported_reason(module)
        if reason is not None:
            skipped.append(f"{qual_name} ({reason})")
            continue
        module.forward = types.MethodType(_lrk_forward, module)
        done.append(qual_name)
    if skipped:
        warnings.warn("lrk.integrations.peft.accelerate: left on PEFT's own forward: " + "; ".join(skipped),
                      stacklevel=2)
    return done


def restore(peft_model: nn.Module) -> list[str]:
    """Give every layer that accelerate() changed its own forward back; returns their names."""
    restored = []
    for qual_name, module in peft_model.named_modules():
        if is_accelerated(module):
            del module.forward  # the instance attribute: the class's forward shows through again
            restored.append(qual_name)
    return restored
