"""SNELLA's across-layer competition: split a total keep budget over the SNELL layers
of a model by their importance.

SNELLA (kernelized sparse fine-tuning with bi-level parameter competition) lets
weights compete inside a layer (SNELLLinear keeps the largest ``|Kmat|``) and across
layers: the total number of kept entries is fixed and each layer's share follows
its importance. This module is the across-layer half; everything is deterministic.

* Importance (ops.md section 4, as AdaLoRA and SNELLA's released allocator): per
  element of the factors A and B, ``I = |theta * grad|``, its moving average
  ``Ibar <- beta1 Ibar + (1 - beta1) I`` and uncertainty
  ``U <- beta2 U + (1 - beta2) |I - Ibar|``; a layer's score is ``mean(Ibar * U)`` over
  A plus the same over B. :class:`SNELLImportance` keeps these (call ``update()``
  after each backward, before the gradients are cleared).
* Allocation, :func:`allocate_snell_budget`: with ``n_l`` entries in layer l and score
  ``s_l``, the budget ``B = round(total_keep_ratio * sum_l n_l)`` entries is split as
  ``k_l = clamp(lam * s_l * n_l, lo_l, hi_l)`` with ``lam`` such that ``sum_l k_l = B``
  (water filling on the importance mass ``s_l * n_l``, so equal scores give every
  layer the same keep ratio), then rounded to integers by largest remainder (ties in
  model order). ``lo_l = max(1, ceil(min_keep_ratio * n_l))`` and
  ``hi_l = floor(max_keep_ratio * n_l)``. Layers scoring 0 get ``lo_l`` unless the
  others are all full; all scores 0 counts as equal scores. Each layer's ``sparsity``
  becomes ``1 - k_l / n_l``, which keeps exactly ``k_l`` entries.
* Schedule, :func:`snell_budget_schedule`: SNELLA's cubic decay of the total keep
  ratio from an initial to a final value.

Differences from SNELLA's released allocator: there, a layer gets ``B * s_l / sum(s)``
entries whatever its size (capped at ``n_l``, the excess handed on); here the share
follows ``s_l * n_l`` so that uniform importance leaves SNELL's uniform sparsity, and
layers can be bounded from below and above. Block-competition layers keep
``round(keep_ratio * tiles)`` whole tiles, so their count matches ``k_l`` to within
about a tile. A new ``sparsity`` is a new float argument of the op: under
``torch.compile`` each reallocation recompiles, so reallocate every few hundred steps
rather than every step.
"""
from __future__ import annotations

import bisect
import math
from typing import Mapping, Optional

import torch
from torch import nn

from .snell import SNELLLinear


def snell_layers(model: nn.Module) -> dict[str, SNELLLinear]:
    """The SNELLLinear modules of ``model`` by qualified name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SNELLLinear)}


def _layers_or_raise(model: nn.Module) -> dict[str, SNELLLinear]:
    layers = snell_layers(model)
    if not layers:
        raise ValueError("model: expected at least one SNELLLinear layer (see lrk.nn.apply_snell), found none")
    return layers


class SNELLImportance:
    """Moving averages of the importance ``|theta * grad|`` of every SNELL layer's
    factors and of its uncertainty; :meth:`scores` gives one number per layer.
    Memory: two float32 (float64) tensors the size of each layer's A and B; they go
    into checkpoints through :meth:`state_dict` / :meth:`load_state_dict`.

    Args:
        model: holds the SNELLLinear layers (found once, at construction).
        beta1: smoothing of the importance, in [0, 1) (SNELLA's scripts: 0.85).
        beta2: smoothing of the uncertainty, in [0, 1).
    """

    def __init__(self, model: nn.Module, beta1: float = 0.85, beta2: float = 0.85):
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not (0.0 <= beta < 1.0):
                raise ValueError(f"{name}: expected a value in [0, 1), got {beta}")
        self.model = model
        self.layers = _layers_or_raise(model)
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.steps = 0
        # name -> [(Ibar, U) of lora_a or None, (Ibar, U) of lora_b or None]
        self._state: dict[str, list] = {name: [None, None] for name in self.layers}

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current gradients of the factors in (factors without a gradient are skipped)."""
        for name, layer in self.layers.items():
            state = self._state[name]
            for i, p in enumerate((layer.lora_a, layer.lora_b)):
                if p.grad is None:
                    continue
                acc = torch.float64 if p.dtype == torch.float64 else torch.float32
                ipt = torch.nan_to_num((p.detach().to(acc) * p.grad.to(acc)).abs(), nan=0.0)
                if state[i] is None:
                    state[i] = (torch.zeros_like(ipt), torch.zeros_like(ipt))
                avg, unc = state[i]
                avg.mul_(self.beta1).add_(ipt, alpha=1.0 - self.beta1)
                unc.mul_(self.beta2).add_((ipt - avg).abs_(), alpha=1.0 - self.beta2)
        self.steps += 1

    @torch.no_grad()
    def scores(self) -> dict[str, float]:
        """Per layer: ``mean(Ibar * U)`` over lora_a plus over lora_b (0 before any update)."""
        out = {}
        for name, state in self._state.items():
            out[name] = sum(float((avg * unc).mean()) for avg, unc in (s for s in state if s is not None))
        return out

    def state_dict(self) -> dict:
        """Tensors and plain numbers only (loads with ``torch.load(weights_only=True)``):
        the betas, the update count and, per layer and factor, the two moving averages."""
        state = {"beta1": self.beta1, "beta2": self.beta2, "steps": self.steps, "layers": {}}
        for name, per_factor in self._state.items():
            state["layers"][name] = {
                factor: {"avg": s[0].clone(), "unc": s[1].clone()}
                for factor, s in zip(("lora_a", "lora_b"), per_factor) if s is not None}
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restores :meth:`state_dict`'s content; a resumed run then updates and scores exactly as
        an uninterrupted one. The layer names and factor shapes must match this model's."""
        missing = set(self.layers) - set(state["layers"])
        unknown = set(state["layers"]) - set(self.layers)
        if missing or unknown:
            raise ValueError(f"state_dict: layers differ from the model's (missing {sorted(missing)}, "
                             f"unknown {sorted(unknown)})")
        restored = {}
        for name, layer in self.layers.items():
            per_factor = [None, None]
            for i, factor in enumerate(("lora_a", "lora_b")):
                saved = state["layers"][name].get(factor)
                if saved is None:
                    continue
                shape = getattr(layer, factor).shape
                if saved["avg"].shape != shape or saved["unc"].shape != shape:
                    raise ValueError(f"state_dict: {name}.{factor} averages have shape {tuple(saved['avg'].shape)}, "
                                     f"the layer's factor {tuple(shape)}")
                device = getattr(layer, factor).device
                per_factor[i] = (saved["avg"].to(device).clone(), saved["unc"].to(device).clone())
            restored[name] = per_factor
        self.beta1, self.beta2 = float(state["beta1"]), float(state["beta2"])
        self.steps = int(state["steps"])
        self._state = restored

    def allocate(self, total_keep_ratio: float, min_keep_ratio: float = 0.0,
                 max_keep_ratio: float = 1.0) -> dict[str, float]:
        """:func:`allocate_snell_budget` with these scores."""
        return allocate_snell_budget(self.model, total_keep_ratio, self.scores(), min_keep_ratio, max_keep_ratio)


def _ceil(v: float) -> int:
    return math.ceil(v - 1e-9 * max(1.0, abs(v)))  # 0.1 * 30 is 3, not 4


def _floor(v: float) -> int:
    return math.floor(v + 1e-9 * max(1.0, abs(v)))


def _water_fill(weights: list[float], lo: list[int], hi: list[int], budget: int, sizes: list[int]) -> list[float]:
    """Real ``x_l = clamp(lam * w_l, lo_l, hi_l)`` with ``sum x = budget``, for
    ``sum lo <= budget <= sum hi``. Layers of weight 0 stay at ``lo_l`` until all the
    others are full, then share the rest by size."""
    idx = range(len(weights))
    pos = [i for i in idx if weights[i] > 0]
    if not pos:
        pos, weights = list(idx), [float(n) for n in sizes]
    zero = [i for i in idx if i not in set(pos)]
    x = [float(lo[i]) for i in idx]
    full = sum(hi[i] for i in pos) + sum(lo[i] for i in zero)
    if budget >= full:
        for i in pos:
            x[i] = float(hi[i])
        if zero and budget > full:
            rest = _water_fill([float(sizes[i]) for i in zero], [lo[i] for i in zero], [hi[i] for i in zero],
                               budget - sum(hi[i] for i in pos), [sizes[i] for i in zero])
            for i, v in zip(zero, rest):
                x[i] = v
        return x
    base = sum(lo[i] for i in zero)

    def filled(lam: float) -> float:  # nondecreasing, linear between breakpoints
        return base + sum(min(max(lam * weights[i], lo[i]), hi[i]) for i in pos)

    breaks = sorted({0.0} | {lo[i] / weights[i] for i in pos} | {hi[i] / weights[i] for i in pos})
    # The first breakpoint where the fill reaches the budget (binary search: monotone).
    j = bisect.bisect_left(range(len(breaks)), True, key=lambda t: filled(breaks[t]) >= budget)
    if j == 0:
        lam = breaks[0]
    else:
        a, b = breaks[j - 1], breaks[j]
        fa, fb = filled(a), filled(b)
        lam = b if fb == fa else a + (budget - fa) * (b - a) / (fb - fa)
    for i in pos:
        x[i] = min(max(lam * weights[i], lo[i]), hi[i])
    return x


def _round_to_budget(x: list[float], lo: list[int], hi: list[int], budget: int) -> list[int]:
    """Integers within [lo, hi] summing to ``budget``: floors, then +1 by largest
    fractional part (ties: lower index); float drift is absorbed the same way."""
    k = [min(max(math.floor(v), lo[i]), hi[i]) for i, v in enumerate(x)]
    order = sorted(range(len(x)), key=lambda i: (-(x[i] - math.floor(x[i])), i))
    diff = budget - sum(k)
    while diff > 0:
        for i in order:
            if diff > 0 and k[i] < hi[i]:
                k[i] += 1
                diff -= 1
    while diff < 0:
        for i in reversed(order):
            if diff < 0 and k[i] > lo[i]:
                k[i] -= 1
                diff += 1
    return k


def allocate_snell_budget(model: nn.Module, total_keep_ratio: float, scores: Optional[Mapping[str, float]] = None,
                          min_keep_ratio: float = 0.0, max_keep_ratio: float = 1.0) -> dict[str, float]:
    """Split ``round(total_keep_ratio * sum n_l)`` kept entries over the SNELLLinear
    layers of ``model`` in proportion to ``score * n_l`` (bounded by ``min_keep_ratio``
    and ``max_keep_ratio`` per layer, at least one entry each), set each layer's
    ``sparsity`` to match, and return the keep ratios by layer name.

    ``scores``: a non-negative finite number for every SNELL layer (by qualified name,
    e.g. :meth:`SNELLImportance.scores`); None gives equal scores.
    """
    layers = _layers_or_raise(model)
    if not (math.isfinite(total_keep_ratio) and 0.0 < total_keep_ratio <= 1.0):
        raise ValueError(f"total_keep_ratio: expected a value in (0, 1], got {total_keep_ratio}")
    if not (math.isfinite(min_keep_ratio) and 0.0 <= min_keep_ratio <= 1.0):
        raise ValueError(f"min_keep_ratio: expected a value in [0, 1], got {min_keep_ratio}")
    if not (math.isfinite(max_keep_ratio) and 0.0 < max_keep_ratio <= 1.0 and max_keep_ratio >= min_keep_ratio):
        raise ValueError(f"max_keep_ratio: expected a value in (0, 1] and >= min_keep_ratio = {min_keep_ratio}, "
                         f"got {max_keep_ratio}")
    names = list(layers)
    if scores is None:
        s = [1.0] * len(names)
    else:
        missing = [n for n in names if n not in scores]
        unknown = [n for n in scores if n not in layers]
        if missing or unknown:
            raise ValueError(f"scores: expected one score per SNELL layer; missing {missing}, unknown {unknown}")
        s = [float(scores[n]) for n in names]
        bad = {n: v for n, v in zip(names, s) if not (math.isfinite(v) and v >= 0.0)}
        if bad:
            raise ValueError(f"scores: expected non-negative finite numbers, got {bad}")
    sizes = [layers[n].out_features * layers[n].in_features for n in names]
    lo = [max(1, _ceil(min_keep_ratio * n)) for n in sizes]
    hi = [_floor(max_keep_ratio * n) for n in sizes]
    for name, a, b in zip(names, lo, hi):
        if a > b:
            raise ValueError(f"max_keep_ratio: layer {name!r} cannot keep between {a} and {b} entries "
                             f"(min_keep_ratio = {min_keep_ratio}, max_keep_ratio = {max_keep_ratio})")
    budget = int(math.floor(total_keep_ratio * sum(sizes) + 0.5))
    if not (sum(lo) <= budget <= sum(hi)):
        raise ValueError(f"total_keep_ratio: {total_keep_ratio} keeps {budget} entries, outside "
                         f"[{sum(lo)}, {sum(hi)}] that min_keep_ratio = {min_keep_ratio} and "
                         f"max_keep_ratio = {max_keep_ratio} allow")
    weights = [v * n for v, n in zip(s, sizes)]
    kept = _round_to_budget(_water_fill(weights, lo, hi, budget, sizes), lo, hi, budget)
    ratios = {}
    for name, k, n in zip(names, kept, sizes):
        layers[name].sparsity = 1.0 - k / n
        ratios[name] = k / n
    return ratios


def snell_budget_schedule(step: int, total_steps: int, initial_keep_ratio: float, final_keep_ratio: float,
                          warmup_steps: int = 0, final_steps: int = 0) -> float:
    """SNELLA's (and AdaLoRA's) cubic schedule of the total keep ratio:
    ``initial_keep_ratio`` for the first ``warmup_steps``, ``final_keep_ratio`` for the
    last ``final_steps``, and in between
    ``final + (initial - final) * (1 - progress)^3``."""
    if total_steps <= warmup_steps + final_steps:
        raise ValueError(f"total_steps: expected more than warmup_steps + final_steps = "
                         f"{warmup_steps + final_steps}, got {total_steps}")
    for name, v in (("initial_keep_ratio", initial_keep_ratio), ("final_keep_ratio", final_keep_ratio)):
        if not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise ValueError(f"{name}: expected a value in (0, 1], got {v}")
    if step <= warmup_steps:
        return float(initial_keep_ratio)
    if step > total_steps - final_steps:
        return float(final_keep_ratio)
    progress = (step - warmup_steps) / (total_steps - final_steps - warmup_steps)
    return float(final_keep_ratio + (initial_keep_ratio - final_keep_ratio) * (1.0 - progress) ** 3)
