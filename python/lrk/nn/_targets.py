"""Which nn.Linear layers of a model an adapter replaces, and the replacing itself
(shared by apply_lora, apply_kron, apply_sara and apply_snell).

Matching follows PEFT's rule, extended: a string is a regex that must match the
whole qualified name; a list of strings matches a name equal to an entry or
ending with "." + entry; a callable is a predicate on the name; None matches
every nn.Linear.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Union

from torch import nn

Targets = Union[str, Iterable[str], Callable[[str], bool], None]


def check_targets(targets: Targets, allow_all: bool = False) -> Targets:
    """Normalises ``targets`` (a list for iterables) and rejects what cannot match."""
    if targets is None:
        if allow_all:
            return None
        raise ValueError("target_modules: expected a regex string or a non-empty list of names, got None")
    if isinstance(targets, str) or callable(targets):
        return targets
    names = list(targets)
    if not names or not all(isinstance(t, str) for t in names):
        raise ValueError(f"target_modules: expected a regex string or a non-empty list of names, got {names!r}")
    return names


def matches(name: str, targets: Targets) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if callable(targets):
        return bool(targets(name))
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: Targets, strict: bool,
                 adapter_type: Optional[type] = None) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the layers to adapt, collected before any is
    replaced (replacing while iterating named_modules would visit the new ones).

    strict: every matching module must be a plain nn.Linear without an adapter and
    at least one must match (ValueError otherwise), as for PEFT's target_modules.
    Not strict: only exact nn.Linear modules among the matches are taken."""
    found = [(n, m) for n, m in model.named_modules() if n and matches(n, targets)]
    if not strict:
        return [(n, m) for n, m in found if type(m) is nn.Linear]
    if not found:
        raise ValueError(f"target_modules: no module of {type(model).__name__} matches {targets!r}")
    for name, module in found:
        if adapter_type is not None and isinstance(module, adapter_type):
            raise ValueError(f"target_modules: {name!r} already has a {adapter_type.__name__} adapter")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target_modules: {name!r} matches but is a {type(module).__name__}, "
                             "only nn.Linear can be adapted")
    return found


def replace_targets(model: nn.Module, targets: list[tuple[str, nn.Module]],
                    make: Callable[[nn.Module], nn.Module]) -> list[nn.Module]:
    """Freezes every parameter of ``model``, then puts ``make(layer)`` in place of
    each target; returns the new modules (whose own adapter parameters train)."""
    for p in model.parameters():
        p.requires_grad_(False)
    new = []
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = make(module)
        setattr(parent, child, layer)
        new.append(layer)
    return new


class BaseLayerView:
    """Shape and weight access of the wrapped ``base_layer``, so that code reading
    ``layer.weight`` / ``in_features`` (dtype probes, weight tying) keeps working."""

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    @property
    def merged(self) -> bool:
        return self._merged
