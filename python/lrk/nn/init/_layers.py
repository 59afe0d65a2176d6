"""One view over the two kinds of LoRA layer that the initialisers fill in: lrk's
``LoRALinear`` and PEFT's ``lora.Linear`` (one named adapter of it), with the
conventions of both: base weight W [N, K] (PEFT's fan_in_fan_out layers store
W^T), lora_A [r, K], lora_B [N, r], output W x + scaling * B A x."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from ..lora import LoRALinear


def _is_peft_lora(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora.layer import LoraLayer
    except ImportError:  # PEFT not installed: only lrk layers exist
        return False
    return isinstance(module, LoraLayer)


class AdapterView:
    """The adapter ``adapter_name`` of a LoRA layer (lrk or PEFT)."""

    def __init__(self, name: str, layer: nn.Module, adapter_name: str = "default") -> None:
        self.name, self.layer, self.adapter_name = name, layer, adapter_name
        self.is_peft = not isinstance(layer, LoRALinear)
        if self.is_peft:
            if adapter_name not in layer.lora_A:
                raise ValueError(f"{name}: PEFT did not add the adapter {adapter_name!r} to this layer "
                                 f"(it has {sorted(layer.lora_A.keys())})")
            base = layer.get_base_layer()
            if not isinstance(base, nn.Linear) and type(base).__name__ != "Conv1D":
                raise ValueError(f"{name}: only linear layers can be initialised, got a {type(base).__name__} base")
            self.fan_in_fan_out = bool(getattr(layer, "fan_in_fan_out", False))
        else:
            base = layer.base_layer
            self.fan_in_fan_out = False
        self.base = base
        if not base.weight.is_floating_point():
            raise ValueError(f"{name}: the base weight is {base.weight.dtype}; quantized bases cannot be "
                             "initialised (initialise in float, then quantize the residual)")

    # -- shapes and scaling
    @property
    def r(self) -> int:
        return int(self.layer.r[self.adapter_name]) if self.is_peft else int(self.layer.r)

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter_name]) if self.is_peft else float(self.layer.scaling)

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        n, k = self.base.weight.shape
        return (k, n) if self.fan_in_fan_out else (n, k)

    def lora_a(self) -> nn.Parameter:
        return self.layer.lora_A[self.adapter_name].weight if self.is_peft else self.layer.lora_A

    def lora_b(self) -> nn.Parameter:
        return self.layer.lora_B[self.adapter_name].weight if self.is_peft else self.layer.lora_B

    # -- the base weight as [N, K]
    def weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        w = self.base.weight.detach()
        w = w.t() if self.fan_in_fan_out else w
        return w if dtype is None else w.to(dtype)

    @torch.no_grad()
    def set_weight(self, w_nk: Tensor) -> None:
        w = self.base.weight
        w.data = (w_nk.t() if self.fan_in_fan_out else w_nk).to(w.dtype).contiguous()

    @torch.no_grad()
    def set_adapter(self, a: Tensor, b: Tensor) -> None:
        """lora_A = a [r, K], lora_B = b [N, r], in the adapter parameters' dtype."""
        pa, pb = self.lora_a(), self.lora_b()
        pa.data = a.to(device=pa.device, dtype=pa.dtype).contiguous()
        pb.data = b.to(device=pb.device, dtype=pb.dtype).contiguous()

    def check_rank(self, rank: int, what: str = "r") -> None:
        n, k = self.weight_shape
        if rank > min(n, k):
            raise ValueError(f"{self.name}: {what} = {rank} exceeds min(out_features, in_features) = {min(n, k)} "
                             f"of this {n} x {k} layer")


def lora_layers(model: nn.Module, adapter_name: str = "default",
                targets: Optional[Iterable[str]] = None) -> list[AdapterView]:
    """Every lrk LoRALinear and PEFT LoRA layer of ``model`` (``model`` itself when
    it is one), or those named in ``targets`` (qualified names, or suffixes after a
    dot): a target that is not a LoRA layer is an error."""
    if isinstance(model, LoRALinear) or _is_peft_lora(model):
        return [AdapterView(type(model).__name__, model, adapter_name)]
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) or _is_peft_lora(m)]
    if targets is not None:
        targets = list(targets)
        modules = dict(model.named_modules())
        chosen = []
        for t in targets:
            names = [n for n in modules if n == t or n.endswith("." + t)]
            if not names:
                raise ValueError(f"targets: no module of {type(model).__name__} is named {t!r}")
            for n in names:
                m = modules[n]
                if not (isinstance(m, LoRALinear) or _is_peft_lora(m)):
                    raise ValueError(f"targets: {n!r} is a {type(m).__name__} without a LoRA adapter "
                                     "(PEFT did not adapt it: add it to target_modules)")
                chosen.append((n, m))
        layers = chosen
    if not layers:
        raise ValueError(f"model: {type(model).__name__} has no LoRA layer (lrk LoRALinear or PEFT LoRA)")
    views = []
    for n, m in layers:
        if _is_peft_lora(m) and adapter_name not in m.lora_A:
            if targets is not None:
                views.append(AdapterView(n, m, adapter_name))  # raises with the reason
            continue  # a PEFT layer of another adapter, or an unsupported kind
        views.append(AdapterView(n, m, adapter_name))
    if not views:
        raise ValueError(f"adapter_name: no LoRA layer of {type(model).__name__} has an adapter {adapter_name!r}")
    return views
