"""EVA, explained variance adaptation (Paischer et al. 2024): lora_A = the leading
right singular vectors of each layer's (centred) inputs, lora_B = 0, ranks
redistributed across layers by explained variance.

PEFT runs an incremental PCA per layer (a randomized SVD of the previous
components stacked on every new batch). lrk instead keeps a streaming range
finder of each layer's input covariance, y += X^T (X Omega) (``lrk::
gram_sketch_update``, Omega [K, l] fixed and orthonormal), plus the column sums
and the total sum of squares; after each batch ``lrk::nystrom_eigh`` gives the
centred covariance's leading eigenpairs from the centred sketch
y - s (s^T Omega) / n. Memory per layer: 2 K l numbers, whatever the number of
batches. The stopping rule and the rank redistribution are PEFT's: a layer stops
once the cosine between consecutive estimates of each of its first (currently
allotted) components is >= tau; each layer may take up to round(r * rho)
components and the budget (the sum of the layers' r) goes to the components of
largest explained-variance ratio over all layers; layers whose inputs are the
same tensor (q, k, v projections) share one sketch, the first of them keeping the
largest rank, as PEFT's does. Components follow PEFT's sign rule (largest entry
of each positive), so both agree up to the estimates' accuracy.
"""
from __future__ import annotations

import warnings
from collections import Counter
from itertools import cycle
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ... import spectral_ops
from ..lora import LoRALinear
from ._layers import AdapterView, lora_layers


def _default_forward(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _token_mask(batch, use_label_mask: bool, label_mask_value: int) -> Optional[Tensor]:
    """The tokens EVA uses (PEFT's language-modelling rule): attention_mask, and
    labels != label_mask_value; None (all tokens) for a batch that is not a dict."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        return None
    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
    if use_label_mask and "labels" in batch:
        mask = mask & (batch["labels"] != label_mask_value)
    return mask


class _InputSketch:
    """Streaming range finder of one layer's input covariance."""

    def __init__(self, k: int, components: int, sketch: int, device, seed: int) -> None:
        self.components = components
        self.l = min(k, max(sketch, components))
        g = torch.empty(k, self.l, device=device, dtype=torch.float32)
        torch.ops.lrk.philox_normal_(g, seed, 1.0)
        self.omega = torch.linalg.qr(g)[0].contiguous()
        self.y = torch.zeros(k, self.l, device=device, dtype=torch.float32)
        self.col_sum = torch.zeros(k, device=device, dtype=torch.float64)
        self.sq_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.n = 0
        self.vectors: Optional[Tensor] = None   # [components, K]
        self.ratio: Optional[Tensor] = None     # explained-variance ratios [components]
        self.values: Optional[Tensor] = None    # eigenvalues of the centred scatter matrix
        self.converged = torch.zeros(components, dtype=torch.bool)

    def update(self, x: Tensor, tau: float) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] < self.components:
            return  # as PEFT: too few tokens in this batch for a step
        x = x.float()
        spectral_ops.gram_sketch_update(self.y, x, self.omega)
        self.col_sum += x.sum(0, dtype=torch.float64)
        self.sq_sum += torch.linalg.vector_norm(x).double().square()
        self.n += x.shape[0]
        s = self.col_sum
        centred = self.y - (s.unsqueeze(1) * (s @ self.omega.double()).unsqueeze(0) / self.n).float()
        values, vectors = spectral_ops.nystrom_eigh(centred, self.omega, self.components)
        total = float(self.sq_sum - s.square().sum() / self.n)
        if self.vectors is not None:
            cos = (vectors * self.vectors).sum(1).abs() / (vectors.norm(dim=1) * self.vectors.norm(dim=1))
            self.converged = (cos >= tau).cpu()
        self.vectors, self.values = vectors, values
        self.ratio = (values.double() / max(total, 1e-300)).cpu()


def _rank_distribution(order: list[str], leader_of: dict, sketches: dict, max_components: dict,
                       budget: int, followers: dict) -> dict:
    """PEFT's rule: the budget's largest explained-variance ratios over all layers
    (a layer offers up to max_components of them), then within a group of equal
    inputs the leader takes the largest count."""
    keys, values = [], []
    for name in order:
        ratio = sketches[leader_of[name]].ratio[: max_components[name]]
        keys += [name] * len(ratio)
        values += list(ratio)
    idx = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in idx[:budget].tolist())
    counts = {k: counts.get(k, 0) for k in order}
    for k, lead in followers.items():
        if counts[lead] < counts[k]:
            counts[lead], counts[k] = counts[k], counts[lead]
    return counts


@torch.no_grad()
def eva_(model: nn.Module, dataloader: Iterable, *, rho: Optional[float] = None, tau: Optional[float] = None,
         whiten: Optional[bool] = None, adjust_scaling_factors: Optional[bool] = None,
         use_label_mask: Optional[bool] = None, label_mask_value: int = -100, sketch: Optional[int] = None,
         forward_fn: Optional[Callable] = None, prepare_layer_inputs_fn: Optional[Callable] = None,
         max_batches: Optional[int] = None, early_exit: bool = True, seed: int = 0,
         adapter_name: str = "default", targets: Optional[Iterable[str]] = None) -> dict[str, int]:
    """EVA-initialise the LoRA layers of ``model`` from the batches of ``dataloader``
    (cycled until every layer's components have converged, or ``max_batches``).

    On a PEFT model (``init_lora_weights="eva"``) rho, tau, whiten,
    adjust_scaling_factors and use_label_mask default to its ``eva_config`` and
    the result is loaded with PEFT's own ``initialize_lora_eva_weights`` (new
    ranks, rank patterns, alpha patterns, rank-0 layers removed): it saves and
    loads as PEFT's EVA does. On an lrk model (``LoRALinear`` layers) the
    defaults are PEFT's (rho 2, tau 0.99, no whitening, adjusted scaling); a
    layer's rank, alpha and scaling change in place, and a layer given rank 0
    becomes its base nn.Linear again.

    ``early_exit``: once the layers run after the last unconverged one (in the
    first pass's call order) have all converged, each forward pass stops there
    (an exception from that layer's hook, caught here): only the model's outputs
    are skipped, which EVA does not use. Turn it off if ``forward_fn`` needs the
    whole pass (a model whose layers run in a data-dependent order).

    ``sketch``: columns of each layer's range finder (default 4 * round(r * rho)
    + 32, at most K). Returns {layer name: new rank}.
    """
    peft_cfg = getattr(model, "peft_config", {}).get(adapter_name) if hasattr(model, "peft_config") else None
    eva_cfg = getattr(peft_cfg, "eva_config", None)
    if peft_cfg is not None and peft_cfg.init_lora_weights != "eva":
        raise ValueError("model: a PEFT model for EVA needs LoraConfig(init_lora_weights='eva', "
                         f"eva_config=EvaConfig(...)), got init_lora_weights={peft_cfg.init_lora_weights!r}")

    def pick(value, field, default):
        if value is not None:
            return value
        return getattr(eva_cfg, field) if eva_cfg is not None else default

    rho, tau = float(pick(rho, "rho", 2.0)), float(pick(tau, "tau", 0.99))
    whiten = bool(pick(whiten, "whiten", False))
    adjust = bool(pick(adjust_scaling_factors, "adjust_scaling_factors", True))
    use_label_mask = bool(pick(use_label_mask, "use_label_mask", True))
    if eva_cfg is not None and label_mask_value == -100:
        label_mask_value = eva_cfg.label_mask_value
    if rho < 1.0:
        raise ValueError(f"rho: expected a number >= 1, got {rho}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau: expected a number in [0, 1], got {tau}")
    try:
        n_batches = len(dataloader)
    except TypeError:
        n_batches = None
    if n_batches == 0:
        raise ValueError("dataloader: is empty")
    forward_fn = forward_fn or _default_forward

    views = lora_layers(model, adapter_name, targets)
    names = [v.name for v in views]
    by_name = {v.name: v for v in views}
    max_components = {v.name: round(v.r * rho) for v in views}
    for v in views:
        v.check_rank(max_components[v.name], "round(r * rho)")
    budget = sum(v.r for v in views)

    # The layers see the base model: PEFT's adapters off; lrk's fresh adapters (B = 0) add nothing.
    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else _nullcontext()
    training = model.training
    model.eval()
    state = {"mask": None, "inputs": {}, "call_order": [], "last_active": None}

    def prepared(name, x):
        if prepare_layer_inputs_fn is not None:
            return prepare_layer_inputs_fn(x, state["mask"], name)
        if state["mask"] is not None and x.dim() == 3 and x.shape[:2] == state["mask"].shape:
            return x[state["mask"]]
        return x.reshape(-1, x.shape[-1])

    def capture_hook(name):
        def hook(module, args, output):
            state["inputs"][name] = args[0]
            state["call_order"].append(name)
        return hook

    def sketch_hook(name):
        def hook(module, args, output):
            if not done[name]:
                sketches[name].update(prepared(name, args[0]), tau)
            if name == state["last_active"] and early_exit:
                raise _ForwardNoLongerNeeded  # the layers after this one have all converged
        return hook

    batches = cycle(dataloader)
    with ctx:
        # First batch: find the layers whose input is the same tensor (kept alive for
        # the whole pass, so equal storage means equal values), then sketch it.
        first = next(batches)
        state["mask"] = _token_mask(first, use_label_mask, label_mask_value)
        handles = [v.layer.register_forward_hook(capture_hook(v.name)) for v in views]
        try:
            forward_fn(model, first)
        finally:
            for h in handles:
                h.remove()
        missing = [n for n in names if n not in state["inputs"]]
        if missing:
            raise ValueError(f"dataloader: the forward pass did not reach the LoRA layers {missing}")
        leader_of, groups = {}, {}
        for n in names:
            x = state["inputs"][n]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            leader_of[n] = groups.setdefault(key, n)
        leaders = [n for n in names if leader_of[n] == n]
        followers = {n: leader_of[n] for n in names if leader_of[n] != n}
        for n in names:  # a group shares the largest max_components of its members
            max_components[leader_of[n]] = max(max_components[leader_of[n]], max_components[n])
        for n in names:
            max_components[n] = max_components[leader_of[n]]
        sketches = {}
        for i, n in enumerate(leaders):
            k = by_name[n].weight_shape[1]
            size = sketch if sketch is not None else 4 * max_components[n] + 32
            sketches[n] = _InputSketch(k, max_components[n], size, state["inputs"][n].device, seed + i)
        done = {n: False for n in leaders}
        for n in leaders:
            sketches[n].update(prepared(n, state["inputs"][n]), tau)
        state["inputs"].clear()
        order = leaders + list(followers)  # PEFT's layer order for the redistribution
        rank_dist = dict(max_components)
        if all(s.ratio is not None for s in sketches.values()):
            rank_dist = _rank_distribution(order, leader_of, sketches, max_components, budget, followers)

        handles = {n: by_name[n].layer.register_forward_hook(sketch_hook(n)) for n in leaders}
        seen = 1
        try:
            for batch in batches:
                for n in leaders:
                    done[n] = bool(torch.all(sketches[n].converged[: rank_dist[n]]))
                if all(done.values()):
                    break
                if max_batches is not None and seen >= max_batches:
                    warnings.warn(f"eva_: stopped after max_batches={max_batches} batches with layers not converged: "
                                  f"{[n for n in leaders if not done[n]]}")
                    break
                state["mask"] = _token_mask(batch, use_label_mask, label_mask_value)
                active = [n for n in state["call_order"] if n in done and not done[n]]
                state["last_active"] = active[-1] if active else None
                try:
                    forward_fn(model, batch)
                except _ForwardNoLongerNeeded:
                    pass
                seen += 1
                if all(s.ratio is not None for s in sketches.values()):
                    rank_dist = _rank_distribution(order, leader_of, sketches, max_components, budget, followers)
        finally:
            for h in handles.values():
                h.remove()
    model.train(training)

    components = {}
    for n in names:
        sk = sketches[leader_of[n]]
        u = sk.vectors[: rank_dist[n]].clone()
        if whiten:
            u /= sk.values[: rank_dist[n]].clamp_min(0).sqrt().sqrt().reshape(-1, 1)
        components[n] = u
    _load(model, views, components, adjust, adapter_name, peft_cfg is not None)
    return {n: rank_dist[n] for n in names}


class _ForwardNoLongerNeeded(Exception):
    """Raised by the hook of the last layer EVA still needs, to skip the rest of a forward pass."""


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _load(model, views: list[AdapterView], components: dict, adjust: bool, adapter_name: str, is_peft: bool):
    if is_peft:
        from peft.tuners.lora.eva import initialize_lora_eva_weights
        target_dtype = {v.name: v.lora_a().dtype for v in views}
        state = {n: c.to(target_dtype[n]) for n, c in components.items()}
        initialize_lora_eva_weights(model, eva_state_dict=state, adapter_name=adapter_name)
        return
    modules = dict(model.named_modules())
    for v in views:
        u = components[v.name]
        layer: LoRALinear = v.layer
        new_r = u.shape[0]
        if new_r == 0:
            parent_name, _, child = v.name.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, layer.base_layer)
            continue
        if new_r != layer.r:
            if adjust:
                layer.lora_alpha *= new_r / layer.r
            layer.r = new_r
            layer.scaling = layer.lora_alpha / (new_r ** 0.5 if layer.use_rslora else new_r)
            factory = dict(device=layer.lora_A.device, dtype=layer.lora_A.dtype)
            layer.lora_A = nn.Parameter(torch.empty(new_r, layer.in_features, **factory))
            layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, new_r, **factory))
        layer.lora_A.data.copy_(u.to(layer.lora_A.dtype))
        layer.lora_B.data.zero_()
