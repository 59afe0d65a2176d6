"""Gradient-driven initialisers: LoRA-GA (Wang, Chen and Li 2024) and LoRA-One
(Zhang, Liu and Chen 2025). Both need the top singular triplets of each adapted
layer's full weight gradient G [N, K], averaged over the batches of a
``train_step`` callback (forward and backward, as PEFT's ``preprocess_loraga``).

G is never stored: during ``train_step`` each adapted layer runs its base product
through an autograd function whose backward feeds ``lrk::sketch_update`` with the
layer's input x and output gradient dy (G = dy^T x), accumulating the two-sided
sketch y = G Omega [N, l1], z = G^T Psi [K, l2]: O((N + K) * (l1 + l2)) memory per
layer instead of N * K, and no weight gradient is formed at all (parameters are
frozen during the pass; a scalar probe carries the graph). ``lrk::sketch_svd``
recovers the triplets. Layers for which the sketch would not be smaller than G
accumulate G itself and take its exact SVD.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import spectral_ops

from ._layers import AdapterView, lora_layers


class _LayerSketch:
    """Accumulates the weight gradient of one layer: as a two-sided sketch, or
    whole when the layer is small (or ``exact``)."""

    def __init__(self, view: AdapterView, triplets: int, oversample: int, exact: bool, seed: int) -> None:
        n, k = view.weight_shape
        w = view.base.weight
        self.dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        self.l1 = min(triplets + oversample, n, k)
        self.l2 = min(2 * self.l1 + 1, n)
        self.full = exact or n * k <= (n + k) * (self.l1 + self.l2)
        self.count = 0
        opts = dict(device=w.device, dtype=self.dtype)
        if self.full:
            self.g = torch.zeros(n, k, **opts)
        else:
            self.omega = torch.empty(k, self.l1, **opts)
            self.psi = torch.empty(n, self.l2, **opts)
            torch.ops.lrk.philox_normal_(self.omega, seed, 1.0)
            torch.ops.lrk.philox_normal_(self.psi, seed + (1 << 40), 1.0)
            self.y = torch.zeros(n, self.l1, **opts)
            self.z = torch.zeros(k, self.l2, **opts)

    def add(self, grad_out: Tensor, x: Tensor) -> None:
        if self.full:
            self.g.addmm_(grad_out.reshape(-1, grad_out.shape[-1]).t().to(self.dtype),
                          x.reshape(-1, x.shape[-1]).to(self.dtype))
        else:
            spectral_ops.sketch_update(self.y, self.z, grad_out, x, self.omega, self.psi)
        self.count += 1  # one backward pass: the mean divides by these, as PEFT's LoRA-GA

    def memory_bytes(self) -> int:
        ts = [self.g] if self.full else [self.y, self.z, self.omega, self.psi]
        return sum(t.numel() * t.element_size() for t in ts)

    def svd(self, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top ``rank`` triplets of the mean gradient (u [N, rank], s [rank], vh [rank, K])."""
        if self.count == 0:
            raise RuntimeError("train_step ran no backward pass through this layer")
        if self.full:
            u, s, vh = spectral_ops.truncated_svd(self.g, rank, "exact")
        else:
            u, s, vh = spectral_ops.sketch_svd(self.y, self.z, self.psi, rank)
        return u, s / self.count, vh


class _SketchedLinear(torch.autograd.Function):
    """y = x W^T + b whose backward hands (dy, x) to a _LayerSketch instead of
    forming dW; ``probe`` (a scalar that requires grad) makes y require grad."""

    @staticmethod
    def forward(ctx, x, probe, weight, bias, sketch):
        ctx.save_for_backward(x, weight)
        ctx.sketch = sketch
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        ctx.sketch.add(dy, x)
        dx = dy @ weight.to(dy.dtype) if ctx.needs_input_grad[0] else None
        return dx, None, None, None, None


@contextlib.contextmanager
def _sketching(model: nn.Module, views: list[AdapterView], sketches: list[_LayerSketch]):
    """Within: the adapted layers compute their base product only (adapters off),
    through _SketchedLinear; all parameters are frozen; the model is in training
    mode. Each backward pass through a layer counts once toward its mean."""
    saved_grad = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    probe = torch.zeros((), requires_grad=True)
    try:
        for p, _ in saved_grad:
            p.requires_grad_(False)
        model.train()
        for v, sk in zip(views, sketches):
            def forward(x, *args, _v=v, _sk=sk, **kwargs):
                w = _v.weight()
                return _SketchedLinear.apply(x, probe, w.to(x.dtype), _v.base.bias, _sk)
            v.layer.forward = forward
        yield
    finally:
        for v in views:
            v.layer.__dict__.pop("forward", None)
        for p, flag in saved_grad:
            p.requires_grad_(flag)
        model.train(was_training)


def gradient_svds(model: nn.Module, train_step: Callable[[], None], triplets: int, *, oversample: int = 16,
                  exact: bool = False, seed: int = 0, adapter_name: str = "default",
                  targets: Optional[Iterable[str]] = None) -> list[tuple[AdapterView, Tensor, Tensor, Tensor, int]]:
    """(layer, u, s, vh, sketch bytes) of the mean weight gradient of every adapted
    layer over ``train_step``, with ``triplets`` (an int, or a callable of the layer
    giving one) singular triplets each."""
    views = lora_layers(model, adapter_name, targets)
    counts = [triplets(v) if callable(triplets) else int(triplets) for v in views]
    for v, t in zip(views, counts):
        v.check_rank(t, "the number of gradient singular triplets needed")
    sketches = [_LayerSketch(v, t, oversample, exact, seed + i) for i, (v, t) in enumerate(zip(views, counts))]
    with _sketching(model, views, sketches), torch.enable_grad():
        train_step()
    out = []
    for v, sk, t in zip(views, sketches, counts):
        if sk.count == 0:
            raise RuntimeError(f"{v.name}: train_step ran no backward pass through this layer")
        u, s, vh = sk.svd(t)
        out.append((v, u, s, vh, sk.memory_bytes()))
    return out


def lora_ga_(model: nn.Module, train_step: Callable[[], None], *, direction: str = "ArB2r",
             scale: str = "stable", stable_gamma: float = 16, oversample: int = 16, exact: bool = False,
             seed: int = 0, adapter_name: str = "default", targets: Optional[Iterable[str]] = None) -> dict:
    """LoRA-GA: align A and B with the top 2r singular vectors of each layer's mean
    full gradient over ``train_step`` (which runs forward and backward on a few
    batches). With PEFT's ``LoraGAConfig`` conventions (``direction``: "ArBr",
    "A2rBr", "ArB2r", "random"; ``scale``: "stable" (B *= N^(1/4) / sqrt(gamma)),
    "weight_svd", "gd_scale", "unit"), and, as PEFT does, the base weight becomes
    W - s * B @ A so that the model's output is unchanged at init.

    The gradient's singular vectors come from a sketch (see the module docstring;
    ``exact=True`` accumulates G and takes its full SVD); PEFT takes
    ``svd_lowrank(G, 4r, niter=4)``. Singular vectors differ from PEFT's by a sign
    per triplet (lrk's rule: largest entry of each row of vh positive). Returns
    {layer name: sketch bytes}.
    """
    if direction not in ("ArBr", "A2rBr", "ArB2r", "random"):
        raise ValueError(f"direction: expected 'ArBr', 'A2rBr', 'ArB2r' or 'random', got {direction!r}")
    if scale not in ("stable", "weight_svd", "gd_scale", "unit"):
        raise ValueError(f"scale: expected 'stable', 'weight_svd', 'gd_scale' or 'unit', got {scale!r}")
    results = gradient_svds(model, train_step, lambda v: 2 * v.r, oversample=oversample, exact=exact, seed=seed,
                            adapter_name=adapter_name, targets=targets)
    memory = {}
    with torch.no_grad():
        for v, u, s, vh, nbytes in results:
            r, sc = v.r, v.scaling
            if direction == "ArBr":
                ia, ib = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
            elif direction == "A2rBr":
                ia, ib = torch.arange(r, 2 * r), torch.arange(0, r)
            elif direction == "ArB2r":
                ia, ib = torch.arange(0, r), torch.arange(r, 2 * r)
            else:
                ia = ib = torch.randperm(2 * r)[:r]
            a, s_b = vh[ia], s[ib]
            b = u[:, ib] * s_b
            if scale == "stable":
                b = b * (v.out_features ** 0.25 / math.sqrt(stable_gamma))
            elif scale == "weight_svd":
                top = spectral_ops.truncated_svd(v.weight(torch.float32), 1, "randomized", 8, 4, seed)[1][0]
                if s_b[0] > 0:
                    b = b * (top / s_b[0])
            elif scale == "gd_scale":
                a, b = a / sc, b / sc
            _commit(v, a, b, subtract=True)
            memory[v.name] = nbytes
    return memory


def lora_one_(model: nn.Module, train_step: Callable[[], None], *, stable_gamma: float = 128,
              subtract_from_base: bool = False, oversample: int = 16, exact: bool = False, seed: int = 0,
              adapter_name: str = "default", targets: Optional[Iterable[str]] = None) -> dict:
    """LoRA-One: the adapter is one best rank-r step of full-gradient descent.
    With -G = U S V^T (G the mean gradient over ``train_step``):

        B = U_r diag(sqrt(S_r)) / sqrt(gamma),  A = diag(sqrt(S_r)) V_r^T / sqrt(gamma)

    so s * B @ A = -(s / gamma) [G]_r, a gradient step of length s / gamma (the
    paper uses rsLoRA's s = alpha / sqrt(r) and gamma = 128). The base weight is
    kept (the model starts one step ahead, as in the paper) unless
    ``subtract_from_base``, which makes the output at init the base model's.
    Returns {layer name: sketch bytes}.
    """
    if not (stable_gamma > 0 and math.isfinite(stable_gamma)):
        raise ValueError(f"stable_gamma: expected a finite number > 0, got {stable_gamma!r}")
    results = gradient_svds(model, train_step, lambda v: v.r, oversample=oversample, exact=exact, seed=seed,
                            adapter_name=adapter_name, targets=targets)
    memory = {}
    with torch.no_grad():
        for v, u, s, vh, nbytes in results:
            root = (s / stable_gamma).sqrt()
            b = -u * root  # -G = (-U) S V^T
            a = root.unsqueeze(1) * vh
            _commit(v, a, b, subtract=subtract_from_base)
            memory[v.name] = nbytes
    return memory


def _commit(v: AdapterView, a: Tensor, b: Tensor, subtract: bool) -> None:
    """Write A and B (in the adapter's dtype) and, if ``subtract``, W - s * B @ A
    computed from the rounded A and B (what the forward pass will use)."""
    v.set_adapter(a, b)
    if subtract:
        acc = torch.float64 if v.base.weight.dtype == torch.float64 else torch.float32
        a_r, b_r = v.lora_a().detach().to(acc), v.lora_b().detach().to(acc)
        v.set_weight(v.weight(acc) - v.scaling * (b_r @ a_r))
