"""PiSSA (Meng, Wang and Zhang 2024): the adapter starts as the principal part of
W, the frozen base keeps the residual.

    W = U S V^T;  A = diag(sqrt(S_r / s)) V_r^T,  B = U_r diag(sqrt(S_r / s)),
    W_res = W - s * B @ A        (s: the layer's scaling)

exactly PEFT's ``init_lora_weights="pissa"`` (``method="exact"``) and
``"pissa_niter_k"`` conventions, so a PEFT model initialised here saves and
loads like one initialised by PEFT. The singular vectors differ from PEFT's by a
sign per triplet (lrk makes the largest entry of each row of A positive; LAPACK
picks its own), which changes neither B @ A nor W_res.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from ... import spectral_ops
from ._layers import AdapterView, lora_layers


@torch.no_grad()
def pissa_layer_(view: AdapterView, method: str = "randomized", oversample: int = 8, power_iters: int = 2,
                 seed: int = 0) -> None:
    """PiSSA on one adapter (see the module docstring)."""
    r, s = view.r, view.scaling
    view.check_rank(r)
    dtype = view.base.weight.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = view.weight(acc)
    u, sv, vh = spectral_ops.truncated_svd(w, r, method, oversample, power_iters, seed)
    root = (sv / s).sqrt()
    a = root.unsqueeze(1) * vh
    b = u * root.unsqueeze(0)
    view.set_weight(torch.addmm(w, b, a, alpha=-s))  # W - s * B @ A in one pass over W
    view.set_adapter(a, b)


def pissa_(model: nn.Module, *, method: str = "randomized", oversample: int = 8, power_iters: int = 2,
           seed: int = 0, adapter_name: str = "default", targets: Optional[Iterable[str]] = None) -> list[str]:
    """PiSSA-initialise every LoRA layer of ``model`` (lrk ``LoRALinear`` or PEFT
    LoRA; or ``model`` itself), in place: adapters and residual base weights.

    ``method``: "randomized" (default: lrk's range finder with ``oversample`` extra
    columns and ``power_iters`` power iterations, seeded) or "exact" (full SVD,
    PEFT's ``"pissa"``). Returns the names of the layers initialised.
    """
    if method not in ("exact", "randomized"):
        raise ValueError(f"method: expected 'exact' or 'randomized', got {method!r}")
    views = lora_layers(model, adapter_name, targets)
    for v in views:
        v.check_rank(v.r)
    for i, v in enumerate(views):
        pissa_layer_(v, method, oversample, power_iters, seed + i)
    return [v.name for v in views]
