"""Kronecker adapters on a frozen nn.Linear (SoKA-style), computed by lrk's ops.

``y = base(x) + scale * sum_t sigma_t (u_t ⊗ v_t) x`` with ``u [k, m1, n1]``,
``v [k, m2, n2]``, ``sigma [k]``, ``out_features = m1*m2``, ``in_features = n1*n2``,
through ``torch.ops.lrk.kron_linear`` (one op for the base GEMM and the adapter; the
Kronecker product is never formed).
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..kron_ops import kpsvd, kron_dense
from ..kron_select import choose_factorization, elbow_rank, energy_rank
from ._targets import BaseLayerView, check_targets, find_targets, replace_targets

__all__ = ["KronLinear", "apply_kron", "prune_kron", "load_peft_lokr"]

_LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    # One dtype for every operand of the op: the base weight's, or the autocast
    # dtype (float64 is never downcast, as under autocast).
    if torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, weight.dtype):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class KronLinear(BaseLayerView, nn.Module):
    """A frozen ``nn.Linear`` plus a Kronecker adapter of ``terms`` terms:
    ``y = base(x) + scale * sum_t kron_sigma[t] * (kron_u[t] ⊗ kron_v[t]) x``.

    ``factors = (m1, m2, n1, n2)`` with ``m1*m2 = out_features``, ``n1*n2 = in_features``;
    by default ``lrk.kron_select.choose_factorization`` (the balanced split).

    ``init``:
      - ``"kpsvd"``: the adapter starts as the ``terms`` principal Kronecker components of
        the base weight (its KPSVD) and the base weight is replaced by the residual
        ``W - sum_t sigma_t u_t ⊗ v_t`` (as PiSSA does with the SVD), so the layer's output
        is unchanged at the start while the trainable part holds the dominant structure.
      - ``"zero"``: ``kron_u`` random, ``kron_v`` zero, ``kron_sigma`` one: the adapter
        starts at exactly 0. As with LoRA's zero ``B``, only ``kron_v`` has a non-zero
        gradient at the first step; ``kron_u`` and ``kron_sigma`` follow once it moved.
    Parameters are created in ``dtype`` (default: the base weight's); they are cast to the
    compute dtype (the base weight's, or autocast's) in forward.

    ``prune()`` rotates the terms into the KPSVD of the current adapter (exact, from
    the factors alone) and drops the weak ones by the energy or elbow rule; ``merge()``
    folds the adapter into the base weight; ``from_peft_lokr()`` and
    ``from_lokr_state_dict()`` load PEFT LoKr adapters.
    """

    def __init__(self, base: nn.Linear, terms: int, factors: Optional[Sequence[int]] = None, scale: float = 1.0,
                 init: str = "kpsvd", kpsvd_method: str = "auto", seed: int = 0,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if not base.weight.is_floating_point():
            raise TypeError(f"base: expected a floating-point weight, got {base.weight.dtype}")
        n_out, n_in = base.out_features, base.in_features
        factors = tuple(int(f) for f in (factors or choose_factorization(n_out, n_in)))
        if len(factors) != 4:
            raise ValueError(f"factors: expected (m1, m2, n1, n2), got {factors}")
        m1, m2, n1, n2 = factors
        if min(factors) < 1 or m1 * m2 != n_out or n1 * n2 != n_in:
            raise ValueError(f"factors: expected (m1, m2, n1, n2) with m1*m2 = out_features = {n_out} and "
                             f"n1*n2 = in_features = {n_in}, got {factors}")
        cap = min(m1 * n1, m2 * n2)
        if not (1 <= int(terms) <= cap):
            raise ValueError(f"terms: expected 1 <= terms <= min(m1*n1, m2*n2) = {cap}, got {terms}")
        if init not in ("kpsvd", "zero"):
            raise ValueError(f"init: expected 'kpsvd' or 'zero', got {init!r}")
        if not math.isfinite(scale) or scale == 0:
            raise ValueError(f"scale: expected a finite non-zero number, got {scale}")
        self.base_layer = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.factors = factors
        self.scale = float(scale)
        factory = dict(device=base.weight.device, dtype=dtype or base.weight.dtype)
        k = int(terms)
        self.kron_u = nn.Parameter(torch.empty(k, m1, n1, **factory))
        self.kron_v = nn.Parameter(torch.empty(k, m2, n2, **factory))
        self.kron_sigma = nn.Parameter(torch.empty(k, **factory))
        self._merged = False
        if init == "kpsvd":
            self._init_kpsvd(kpsvd_method, seed)
        else:
            self._init_zero(seed)

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def _init_kpsvd(self, method: str, seed: int) -> None:
        w = self.base_layer.weight
        f = kpsvd(w, self.factors, self.terms, method=method, seed=seed)
        principal = kron_dense(f.u, f.v, f.sigma)  # in float32 / float64
        w.copy_((w.to(principal.dtype) - principal).to(w.dtype))
        self.kron_u.copy_(f.u)
        self.kron_v.copy_(f.v)
        self.kron_sigma.copy_(f.sigma / self.scale)

    @torch.no_grad()
    def _init_zero(self, seed: int) -> None:
        g = torch.Generator().manual_seed(int(seed))
        _, m1, n1 = self.kron_u.shape
        u = torch.randn(self.kron_u.shape, generator=g, dtype=torch.float64) / math.sqrt(n1)
        self.kron_u.copy_(u)
        self.kron_v.zero_()
        self.kron_sigma.fill_(1.0)

    # ------------------------------------------------------------------ shape and base access

    @property
    def terms(self) -> int:
        return self.kron_u.shape[0]

    def extra_repr(self) -> str:
        m1, m2, n1, n2 = self.factors
        return (f"in_features={self.in_features}, out_features={self.out_features}, terms={self.terms}, "
                f"u=[{m1}x{n1}], v=[{m2}x{n2}], scale={self.scale}, merged={self._merged}")

    # ------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        if self._merged:
            return self.base_layer(x)
        w, b = self.base_layer.weight, self.base_layer.bias
        dtype = _compute_dtype(x, w)

        def cast(t):
            return t if t is None or t.dtype == dtype else t.to(dtype)

        args = (cast(x), cast(self.kron_u), cast(self.kron_v), cast(self.kron_sigma), cast(w), cast(b), self.scale)
        if torch.is_autocast_enabled(x.device.type):
            # Operands are cast already; autocast must not reach the ATen calls inside the op.
            with torch.autocast(x.device.type, enabled=False):
                return torch.ops.lrk.kron_linear(*args)
        return torch.ops.lrk.kron_linear(*args)

    # ------------------------------------------------------------------ merge / unmerge

    def delta_weight(self) -> Tensor:
        """The adapter as a dense matrix, ``scale * sum_t sigma_t u_t ⊗ v_t``, in float32
        (float64 for float64 weights). For merging and inspection only."""
        acc = _acc_dtype(self.base_layer.weight.dtype)
        return kron_dense(self.kron_u.detach().to(acc), self.kron_v.detach().to(acc),
                          self.kron_sigma.detach().to(acc), self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base_layer.weight``; forward is then the base layer
        alone (the adapter gets no gradient). A no-op (with a warning) when merged."""
        if self._merged:
            warnings.warn("KronLinear.merge(): already merged, nothing to do")
            return
        self._add_to_base(self.delta_weight())
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge()``. A no-op (with a warning) when not merged."""
        if not self._merged:
            warnings.warn("KronLinear.unmerge(): not merged, nothing to do")
            return
        self._add_to_base(-self.delta_weight())
        self._merged = False

    def merge_and_unload(self) -> nn.Linear:
        """The base ``nn.Linear`` with the adapter merged into its weight."""
        if not self._merged:
            self.merge()
        return self.base_layer

    def _add_to_base(self, delta: Tensor) -> None:
        w = self.base_layer.weight
        w.copy_((w.to(delta.dtype) + delta).to(w.dtype))

    # ------------------------------------------------------------------ adaptive rank

    @torch.no_grad()
    def spectrum(self) -> Tensor:
        """The Kronecker singular values of the current adapter (without ``scale``): the
        KPSVD of ``sum_t sigma_t u_t ⊗ v_t``, exact from the factors alone."""
        return self._rotated_terms()[0]

    def _rotated_terms(self):
        # R(Delta) = A @ B^T with A = [vec(u_t) * sigma_t], B = [vec(v_t)]. With A = Qa Ra,
        # B = Qb Rb, the SVD of the k x k core Ra Rb^T gives the KPSVD of Delta.
        acc = _acc_dtype(self.kron_u.dtype)
        k, m1, n1 = self.kron_u.shape
        _, m2, n2 = self.kron_v.shape
        a = self.kron_u.detach().to(acc).reshape(k, m1 * n1).t() * self.kron_sigma.detach().to(acc)
        b = self.kron_v.detach().to(acc).reshape(k, m2 * n2).t()
        qa, ra = torch.linalg.qr(a)
        qb, rb = torch.linalg.qr(b)
        uc, s, vch = torch.linalg.svd(ra @ rb.t())
        u = (qa @ uc).t().reshape(k, m1, n1)
        v = (qb @ vch.t()).t().reshape(k, m2, n2)
        return s, u, v

    @torch.no_grad()
    def prune(self, rule: str = "energy", tau: float = 0.99, min_terms: int = 1, merge_pruned: bool = False,
              optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Adaptive rank: rotate the terms into the KPSVD of the current adapter, keep the
        strongest ones by ``rule`` ("energy": the fewest terms holding ``tau`` of the
        adapter's squared Frobenius norm; "elbow": up to the elbow of the spectrum), at
        least ``min_terms``, and drop the rest. With ``merge_pruned`` the dropped part is
        added to the base weight (the layer's output does not change); otherwise it is
        discarded. The parameters keep their identity but change shape, so optimizer state
        for them is stale: pass ``optimizer`` to drop it. Returns the number of terms kept.
        """
        if self._merged:
            raise RuntimeError("KronLinear.prune(): unmerge() first")
        if rule not in ("energy", "elbow"):
            raise ValueError(f"rule: expected 'energy' or 'elbow', got {rule!r}")
        s, u, v = self._rotated_terms()
        keep = energy_rank(s, tau) if rule == "energy" else elbow_rank(s)
        keep = max(min(max(keep, int(min_terms)), s.numel()), 1)
        if merge_pruned and keep < s.numel():
            self._add_to_base(kron_dense(u[keep:], v[keep:], s[keep:], self.scale))
        for p, new in ((self.kron_u, u[:keep]), (self.kron_v, v[:keep]), (self.kron_sigma, s[:keep])):
            p.data = new.to(p.dtype).contiguous()
            p.grad = None
            if optimizer is not None:
                optimizer.state.pop(p, None)
        return keep

    # ------------------------------------------------------------------ PEFT LoKr

    @classmethod
    def from_peft_lokr(cls, layer: nn.Module, adapter_name: str = "default") -> "KronLinear":
        """A KronLinear equal to a PEFT LoKr ``Linear`` layer (``peft.tuners.lokr.Linear``):
        one term ``u = w1``, ``v = w2`` (``w1 = lokr_w1_a @ lokr_w1_b`` when decomposed, and
        likewise ``w2``), ``scale = alpha / r``. Shares the layer's base nn.Linear.
        Training-time rank and module dropout are not carried over."""
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else getattr(layer, "base_layer", None)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"layer: expected a PEFT LoKr layer on an nn.Linear, got base {type(base).__name__}")
        state = {}
        for name in _LOKR_NAMES:
            params = getattr(layer, name, None)
            if params is not None and adapter_name in params:
                state[name] = params[adapter_name]
        if not state:
            raise KeyError(f"adapter_name: the layer has no LoKr adapter named {adapter_name!r}")
        return cls._from_lokr_tensors(base, state, float(layer.scaling[adapter_name]))

    @classmethod
    def from_lokr_state_dict(cls, base: nn.Linear, state_dict: Mapping[str, Tensor], alpha: float, r: int,
                             prefix: str = "", adapter_name: str = "default") -> "KronLinear":
        """A KronLinear from PEFT LoKr weights of one layer: keys ``prefix + "lokr_w1"``,
        ``"lokr_w1_a"``, ``"lokr_w1_b"``, ``"lokr_w2"``, ``"lokr_w2_a"``, ``"lokr_w2_b"``
        as PEFT saves them, or with ``"." + adapter_name`` appended as in a module's
        state_dict. ``alpha`` and ``r`` come from the LoKrConfig (scale = alpha / r)."""
        if r <= 0:
            raise ValueError(f"r: expected a positive LoKr rank, got {r}")
        state = {}
        for name in _LOKR_NAMES:
            for key in (f"{prefix}{name}.{adapter_name}", f"{prefix}{name}"):
                if key in state_dict:
                    state[name] = state_dict[key]
                    break
        if not state:
            raise KeyError(f"state_dict: no LoKr weights under prefix {prefix!r} (keys like {prefix}lokr_w1)")
        return cls._from_lokr_tensors(base, state, float(alpha) / float(r))

    @classmethod
    def _from_lokr_tensors(cls, base: nn.Linear, state: Mapping[str, Tensor], scale: float) -> "KronLinear":
        if "lokr_t2" in state:
            raise ValueError("LoKr with a CP-decomposed conv kernel (lokr_t2) is not a Linear adapter")

        def factor(i: int) -> Tensor:
            full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
            if full in state:
                return state[full].detach()
            if a in state and b in state:
                return state[a].detach() @ state[b].detach()
            raise KeyError(f"state_dict: expected {full} or both {a} and {b}")

        w1, w2 = factor(1), factor(2)
        if w1.dim() != 2 or w2.dim() != 2:
            raise ValueError(f"lokr_w1, lokr_w2: expected matrices, got shapes {tuple(w1.shape)}, {tuple(w2.shape)}")
        factors = (w1.shape[0], w2.shape[0], w1.shape[1], w2.shape[1])
        kron_shape = (factors[0] * factors[1], factors[2] * factors[3])
        if kron_shape != (base.out_features, base.in_features):
            raise ValueError(f"lokr_w1, lokr_w2: expected kron(w1, w2) of the base weight's shape "
                             f"({base.out_features}, {base.in_features}), got w1 {tuple(w1.shape)} and w2 "
                             f"{tuple(w2.shape)}, whose Kronecker product is {kron_shape}")
        layer = cls(base, 1, factors=factors, scale=scale, init="zero")
        with torch.no_grad():
            layer.kron_u.copy_(w1.unsqueeze(0))
            layer.kron_v.copy_(w2.unsqueeze(0))
            layer.kron_sigma.fill_(1.0)
        return layer


# ---------------------------------------------------------------------------- model surgery


def apply_kron(model: nn.Module, target_modules: Union[str, Sequence[str]], terms: int, scale: float = 1.0,
               init: str = "kpsvd", factor: int = -1, kpsvd_method: str = "auto", seed: int = 0) -> nn.Module:
    """Replace every nn.Linear of ``model`` whose qualified name matches ``target_modules``
    (a list of name suffixes such as ``["q_proj", "v_proj"]``, or a regex for the full name)
    by a KronLinear with ``terms`` terms (factors from ``choose_factorization(out, in,
    factor)``, capped at the layer's maximum number of terms), freeze every other
    parameter, and return ``model`` (changed in place). Raises ValueError when nothing
    matches or a matching module is not an nn.Linear."""
    targets = find_targets(model, check_targets(target_modules), strict=True, adapter_type=KronLinear)

    def make(module: nn.Linear) -> KronLinear:
        m1, m2, n1, n2 = choose_factorization(module.out_features, module.in_features, factor)
        k = min(int(terms), m1 * n1, m2 * n2)
        return KronLinear(module, k, factors=(m1, m2, n1, n2), scale=scale, init=init,
                          kpsvd_method=kpsvd_method, seed=seed)

    replace_targets(model, targets, make)
    return model


def prune_kron(model: nn.Module, rule: str = "energy", tau: float = 0.99, min_terms: int = 1,
               merge_pruned: bool = False, optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, int]:
    """``KronLinear.prune`` on every KronLinear of ``model`` (not merged ones); returns
    {qualified name: terms kept}."""
    return {name: m.prune(rule, tau, min_terms, merge_pruned, optimizer)
            for name, m in model.named_modules() if isinstance(m, KronLinear) and not m.merged}


def _lokr_value(config, field: str, default=None):
    return config.get(field, default) if isinstance(config, Mapping) else getattr(config, field, default)


def _pattern_value(patterns: Optional[Mapping], name: str, default):
    # PEFT's rule for rank_pattern / alpha_pattern: the first key that matches a
    # dot-separated tail of the module name (as a regex).
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_peft_lokr(model: nn.Module, state_dict: Mapping[str, Tensor], config,
                   prefix: str = "base_model.model.", adapter_name: str = "default") -> dict[str, KronLinear]:
    """Put a PEFT LoKr adapter on a plain ``model``: every nn.Linear for which
    ``state_dict`` holds LoKr weights becomes a KronLinear with those weights (see
    ``KronLinear.from_lokr_state_dict``); every other parameter is frozen.

    ``state_dict``: as ``peft.get_peft_model_state_dict`` returns it or
    ``save_pretrained`` writes it (keys ``prefix + "<module>.lokr_w1"``), or a module
    state_dict (``"<module>.lokr_w1.<adapter_name>"``; pass ``prefix=""``).
    ``config``: the adapter's ``LoKrConfig``, or its dict (adapter_config.json): ``r``,
    ``alpha`` and, when present, ``rank_pattern`` / ``alpha_pattern`` (PEFT's rule: a
    key matches a dot-separated tail of the module name). Returns {module name: layer}.
    """
    r_default, alpha_default = _lokr_value(config, "r"), _lokr_value(config, "alpha")
    if r_default is None or alpha_default is None:
        raise ValueError("config: expected a LoKrConfig or a dict with 'r' and 'alpha'")
    rank_pattern, alpha_pattern = _lokr_value(config, "rank_pattern"), _lokr_value(config, "alpha_pattern")
    key_re = re.compile(rf"^(.*)\.({'|'.join(_LOKR_NAMES)})(\.{re.escape(adapter_name)})?$")
    names = []
    for key in state_dict:
        match = key_re.match(key)
        if match is None:
            continue
        full = match.group(1)
        if not full.startswith(prefix):
            raise ValueError(f"state_dict: LoKr key {key!r} does not start with prefix {prefix!r}")
        name = full[len(prefix):]
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"state_dict: no LoKr weights (keys like {prefix}<module>.lokr_w1)")
    targets = []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"state_dict: LoKr weights for {name!r}, which {type(model).__name__} does not have") \
                from None
        if type(module) is not nn.Linear:
            raise ValueError(f"state_dict: LoKr weights for {name!r}, a {type(module).__name__}; only nn.Linear "
                             "layers are loaded")
        targets.append((name, module))
    name_of = {id(module): name for name, module in targets}

    def make(module: nn.Linear) -> KronLinear:
        name = name_of[id(module)]
        r = _pattern_value(rank_pattern, name, r_default)
        alpha = _pattern_value(alpha_pattern, name, alpha_default)
        return KronLinear.from_lokr_state_dict(module, state_dict, alpha=alpha, r=r, prefix=f"{prefix}{name}.",
                                               adapter_name=adapter_name)

    layers = replace_targets(model, targets, make)
    return dict(zip(names, layers))
