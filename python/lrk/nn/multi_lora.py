"""Serving many LoRA adapters from one frozen model in one batch (S-LoRA, Punica),
computed by lrk's multi-adapter ops (``lrk.multi_lora_ops``).

``MultiLoRALinear`` wraps a frozen ``nn.Linear`` and keeps a pool of adapters on
its device: per output slice ``s`` an ``A`` pool ``[max_adapters, r_max, in]`` and a
``B`` pool ``[max_adapters, N_s, r_max]``, a rank and a scale per slot. Slots are
filled from tensors or from PEFT adapters (``save_pretrained`` directories,
``adapter_model.safetensors`` files or state dicts) and emptied again while the
model serves; an adapter of rank ``r`` costs ``r`` whatever ``r_max`` is. A fused
layer (QKV, gate/up) has one slice per projection.

Each forward takes the batch's adapters as slot ids (``-1`` = base model only):
one per token, or one per sequence for ``x`` of shape ``[batch, seq, in]``
(computed as sorted segments, the layout of prefill). Ids given as lists or CPU
tensors are validated on the host and copied; device tensors are used as they are
(nothing is read back, so the forward can be captured in a CUDA graph; ids out
of range then act as -1, see ``lrk.multi_lora_ops``). Inside capture only device
ids are accepted: host ids raise an error (see ``MultiLoRABatch.prepare``).

``apply_multi_lora(model, target_modules, max_adapters, r_max)`` wraps every
matching linear layer and returns a ``MultiLoRAManager`` that loads PEFT adapters
into all layers at once (one slot per adapter name) and sets the batch's adapters
for the next forwards of the model.

The adapter term has no gradient: these modules are for inference.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import multi_lora_ops as mlo
from ._targets import matches

__all__ = ["MultiLoRALinear", "MultiLoRABatch", "MultiLoRAManager", "apply_multi_lora", "read_peft_adapter",
           "peft_module_weights"]

AdapterSource = Union[str, os.PathLike, Mapping[str, Tensor]]
IdsLike = Union[Tensor, Sequence[int]]


# ----------------------------------------------------------------------------- PEFT files


def read_peft_adapter(source: AdapterSource, config: Optional[Mapping] = None) -> tuple[dict, dict]:
    """(state_dict, config) of a PEFT LoRA adapter.

    ``source``: a directory written by PEFT's ``save_pretrained`` (adapter_config.json
    and adapter_model.safetensors or adapter_model.bin), a ``.safetensors`` / ``.bin``
    file (its config is read from adapter_config.json next to it unless ``config``
    is given), or a state dict (then ``config`` is required)."""
    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("config: a PEFT config (a dict with at least 'r' and 'lora_alpha') is needed "
                             "with a state dict")
        return dict(source), dict(config)
    path = os.fspath(source)
    if os.path.isdir(path):
        folder = path
        for name in ("adapter_model.safetensors", "adapter_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"source: no adapter_model.safetensors or adapter_model.bin in {folder}")
    else:
        folder = os.path.dirname(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"source: {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if config is None:
        config_path = os.path.join(folder, "adapter_config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"config: no adapter_config.json next to {path}; pass config=")
        with open(config_path) as f:
            config = json.load(f)
    return state, dict(config)


def _check_peft_config(config: Mapping) -> None:
    if config.get("peft_type", "LORA") not in ("LORA", None):
        raise ValueError(f"config: expected a LoRA adapter (peft_type LORA), got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise ValueError("config: DoRA adapters (use_dora=True) are not supported by multi-adapter serving")
    if config.get("lora_bias"):
        raise ValueError("config: adapters with a LoRA bias (lora_bias=True) are not supported")
    if config.get("fan_in_fan_out"):
        raise ValueError("config: fan_in_fan_out adapters (Conv1D layers) are not supported; "
                         "MultiLoRALinear wraps nn.Linear")
    if config.get("modules_to_save"):
        warnings.warn("config: modules_to_save is ignored: fully trained modules cannot differ per request")


def _pattern_value(patterns: Mapping, module_name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def peft_module_weights(state: Mapping[str, Tensor], config: Mapping, module_name: str
                        ) -> Optional[tuple[Tensor, Tensor, float]]:
    """(lora_A [r, in], lora_B [out, r], scale) of one module of a PEFT adapter, or
    None when the adapter does not touch that module. ``module_name`` is the
    module's name in the base model, as in ``model.named_modules()``; PEFT saves its
    weights as ``base_model.model.<module_name>.lora_A.weight``."""
    candidates = [f"base_model.model.{module_name}", module_name]
    for prefix in candidates:
        for infix in ("", ".default"):
            key_a, key_b = f"{prefix}.lora_A{infix}.weight", f"{prefix}.lora_B{infix}.weight"
            if key_a in state:
                if key_b not in state:
                    raise ValueError(f"adapter: {key_a} has no matching {key_b}")
                a, b = state[key_a], state[key_b]
                r = a.shape[0]
                if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
                    raise ValueError(f"adapter: {module_name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                                     "are not [r, in] and [out, r]")
                alpha = float(_pattern_value(config.get("alpha_pattern"), module_name, config.get("lora_alpha", 8)))
                scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
                return a, b, scale
    return None


def _peft_module_names(state: Mapping[str, Tensor]) -> set:
    names = set()
    for key in state:
        m = re.match(r"(?:base_model\.model\.)?(.*)\.lora_A(?:\.default)?\.weight$", key)
        if m:
            names.add(m.group(1))
    return names


# ----------------------------------------------------------------------------- batch description


def _capturing(device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of a CUDA device."""
    return (torch.device(device).type == "cuda" and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing())


@dataclass
class MultiLoRABatch:
    """The adapters of one batch, on the device: slot ids per token, or per sequence
    (each sequence of ``x`` [batch, seq, in] is then one segment)."""
    adapter_ids: Tensor           # [tokens] or [sequences], int32/int64, -1 = none
    per_sequence: bool = False

    @staticmethod
    def prepare(ids: IdsLike, device, num_adapters: int, per_sequence: bool = False,
                loaded: Optional[Sequence[bool]] = None) -> "MultiLoRABatch":
        """Validates host ids (range, and that each slot holds an adapter when
        ``loaded`` is given) and moves them to ``device``; device tensors are taken as they are.

        Inside CUDA-graph capture only device tensors are accepted: the copy of host
        ids is not allowed there (a pageable source), and a copy from a persistent
        pinned buffer would be captured as a read of that buffer, so each replay would
        use whatever ids the buffer holds at replay time rather than those given (and
        validated) here. Capture with a device tensor of ids and update it in place
        before each replay."""
        if isinstance(ids, Tensor) and ids.device.type != "cpu":
            return MultiLoRABatch(ids, per_sequence)
        if _capturing(device):
            raise RuntimeError(
                "adapter_ids: host ids (a list or CPU tensor) cannot be used while a CUDA graph is being "
                "captured: pass the ids as a device tensor (e.g. torch.tensor(ids, device='cuda')) and "
                "update it in place between replays")
        t = torch.as_tensor(ids, dtype=torch.int64) if not isinstance(ids, Tensor) else ids
        if t.dim() != 1:
            raise ValueError(f"adapter_ids: expected a 1-D list of slot ids, got shape {tuple(t.shape)}")
        mlo.check_adapter_ids(t, num_adapters)
        if loaded is not None:
            for pos, j in enumerate(t.tolist()):
                if j >= 0 and not loaded[j]:
                    raise ValueError(f"adapter_ids: slot {j} at position {pos} holds no adapter")
        return MultiLoRABatch(t.to(device, non_blocking=True), per_sequence)


# ----------------------------------------------------------------------------- the layer


class _SlotNames:
    """Adapter name -> pool slot, for a layer and for a whole model's manager."""

    _slots: Dict[str, int]

    @property
    def adapters(self) -> Dict[str, int]:
        """Loaded adapters: name -> slot."""
        return dict(self._slots)

    def slot_of(self, name: str) -> int:
        if name not in self._slots:
            raise KeyError(f"adapter {name!r} is not loaded (loaded: {sorted(self._slots)})")
        return self._slots[name]


class MultiLoRALinear(_SlotNames, nn.Module):
    """A frozen ``nn.Linear`` plus a device pool of ``max_adapters`` LoRA adapters of rank <= ``r_max``.

    ``slices``: output sizes of a fused layer (e.g. ``[q, k, v]``, summing to
    ``out_features``); each slice has its own pools. ``dtype`` of the pools: the base
    weight's by default (inputs must have it too)."""

    def __init__(self, base: nn.Linear, max_adapters: int, r_max: int, slices: Optional[Sequence[int]] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if max_adapters < 1 or r_max < 1:
            raise ValueError(f"max_adapters and r_max: expected at least 1, got {max_adapters} and {r_max}")
        slices = [base.out_features] if slices is None else [int(s) for s in slices]
        if sum(slices) != base.out_features or any(s <= 0 for s in slices):
            raise ValueError(f"slices: expected positive sizes summing to out_features = {base.out_features}, "
                             f"got {slices}")
        base.requires_grad_(False)
        self.base = base
        self.max_adapters, self.r_max = int(max_adapters), int(r_max)
        self.slice_sizes = slices
        self.slice_offsets = [sum(slices[:s]) for s in range(len(slices))]
        weight = base.weight
        dtype = dtype or weight.dtype
        k = base.in_features
        for s, n_s in enumerate(slices):
            self.register_buffer(f"lora_a_{s}", torch.zeros(max_adapters, r_max, k, dtype=dtype, device=weight.device),
                                 persistent=False)
            self.register_buffer(f"lora_b_{s}", torch.zeros(max_adapters, n_s, r_max, dtype=dtype,
                                                            device=weight.device), persistent=False)
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int32, device=weight.device),
                             persistent=False)
        self.register_buffer("scales", torch.zeros(max_adapters, dtype=torch.float32, device=weight.device),
                             persistent=False)
        self._slots: Dict[str, int] = {}          # adapter name -> slot
        self._host_ranks = [0] * max_adapters     # ranks on the host: validation without a device read
        self.batch: Optional[MultiLoRABatch] = None  # adapters of the next forwards (set_adapter_ids)

    # ---- pools
    @property
    def lora_a(self) -> list:
        return [getattr(self, f"lora_a_{s}") for s in range(len(self.slice_sizes))]

    @property
    def lora_b(self) -> list:
        return [getattr(self, f"lora_b_{s}") for s in range(len(self.slice_sizes))]

    def _free_slot(self) -> int:
        used = set(self._slots.values())
        for j in range(self.max_adapters):
            if j not in used:
                return j
        raise RuntimeError(f"all {self.max_adapters} adapter slots are in use: unload one first")

    @torch.no_grad()
    def load_adapter(self, name: str, lora_a: Union[Tensor, Sequence[Optional[Tensor]]],
                     lora_b: Union[Tensor, Sequence[Optional[Tensor]]], scale: float,
                     slot: Optional[int] = None) -> int:
        """Loads (or replaces) adapter ``name``: ``lora_a`` [r, in] and ``lora_b`` [N_s, r],
        or lists with one pair per slice (None: the adapter leaves that slice alone;
        ranks may differ between slices, the smaller ones are zero-padded). Returns its slot."""
        slices = len(self.slice_sizes)
        a_list = [lora_a] if isinstance(lora_a, Tensor) else list(lora_a)
        b_list = [lora_b] if isinstance(lora_b, Tensor) else list(lora_b)
        if len(a_list) != slices or len(b_list) != slices:
            raise ValueError(f"lora_a, lora_b: expected {slices} tensors (one per slice), got {len(a_list)} and "
                             f"{len(b_list)}")
        k = self.base.in_features
        r = 0
        for s, (a, b) in enumerate(zip(a_list, b_list)):
            if (a is None) != (b is None):
                raise ValueError(f"slice {s}: lora_a and lora_b must both be given or both be None")
            if a is None:
                continue
            if a.dim() != 2 or a.shape[1] != k:
                raise ValueError(f"lora_a[{s}]: expected shape [r, {k}], got {tuple(a.shape)}")
            if b.dim() != 2 or b.shape != (self.slice_sizes[s], a.shape[0]):
                raise ValueError(f"lora_b[{s}]: expected shape [{self.slice_sizes[s]}, {a.shape[0]}], "
                                 f"got {tuple(b.shape)}")
            r = max(r, a.shape[0])
        if r == 0:
            raise ValueError(f"adapter {name!r}: no weights (every slice is None or has rank 0)")
        if r > self.r_max:
            raise ValueError(f"adapter {name!r}: rank {r} is above r_max = {self.r_max} of this layer")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite number, got {scale}")
        if name in self._slots:
            if slot is not None and slot != self._slots[name]:
                raise ValueError(f"adapter {name!r} is loaded in slot {self._slots[name]}, not {slot}")
            slot = self._slots[name]
        elif slot is None:
            slot = self._free_slot()
        else:
            if not 0 <= slot < self.max_adapters:
                raise ValueError(f"slot: expected 0 <= slot < {self.max_adapters}, got {slot}")
            if slot in self._slots.values():
                raise ValueError(f"slot {slot} already holds adapter "
                                 f"{next(n for n, j in self._slots.items() if j == slot)!r}")
        for s, (a, b) in enumerate(zip(a_list, b_list)):
            pa, pb = self.lora_a[s][slot], self.lora_b[s][slot]
            pa.zero_()
            pb.zero_()
            if a is not None:
                pa[: a.shape[0]].copy_(a)
                pb[:, : b.shape[1]].copy_(b)
        self.ranks[slot] = r
        self.scales[slot] = float(scale)
        self._host_ranks[slot] = r
        self._slots[name] = slot
        return slot

    @torch.no_grad()
    def unload_adapter(self, name: str) -> int:
        """Empties the slot of adapter ``name`` (rank 0: ids pointing at it add nothing); returns the slot."""
        slot = self.slot_of(name)
        self.ranks[slot] = 0
        self.scales[slot] = 0.0
        self._host_ranks[slot] = 0
        del self._slots[name]
        return slot

    def load_peft_adapter(self, name: str, source: AdapterSource, module_name: Union[str, Sequence[str]],
                          config: Optional[Mapping] = None, slot: Optional[int] = None) -> int:
        """Loads this layer's part of a PEFT adapter (see ``read_peft_adapter`` for
        ``source``). ``module_name``: this layer's name in the base model, or one
        name per slice for a fused layer (e.g. the q_proj, k_proj, v_proj names)."""
        state, config = read_peft_adapter(source, config)
        return self._load_from_state(name, state, config, module_name, slot)

    def _load_from_state(self, name, state, config, module_name, slot=None) -> int:
        _check_peft_config(config)
        names = [module_name] if isinstance(module_name, str) else list(module_name)
        if len(names) != len(self.slice_sizes):
            raise ValueError(f"module_name: expected {len(self.slice_sizes)} names (one per slice), got {names}")
        parts = [peft_module_weights(state, config, n) for n in names]
        if all(p is None for p in parts):
            raise ValueError(f"adapter {name!r} has no weights for {names}")
        scale = next(p[2] for p in parts if p is not None)
        dtype = self.lora_a_0.dtype
        a_list, b_list = [], []
        for p in parts:
            if p is None:
                a_list.append(None)
                b_list.append(None)
                continue
            a, b, sc = p
            # One scale per slot: a slice with another scale gets it folded into its B.
            b = b.double() * (sc / scale) if sc != scale else b
            a_list.append(a.to(dtype))
            b_list.append(b.to(dtype))
        return self.load_adapter(name, a_list, b_list, scale, slot)

    # ---- forward
    def set_adapter_ids(self, adapter_ids: Optional[Union[IdsLike, MultiLoRABatch]], per_sequence: bool = False):
        """Adapters (slot ids) of the next forwards when forward gets none; None = base only."""
        self.batch = None if adapter_ids is None else self._prepare(adapter_ids, per_sequence)

    def _prepare(self, ids, per_sequence=False) -> MultiLoRABatch:
        if isinstance(ids, MultiLoRABatch):
            return ids
        return MultiLoRABatch.prepare(ids, self.ranks.device, self.max_adapters, per_sequence,
                                      loaded=[r > 0 for r in self._host_ranks])

    def forward(self, x: Tensor, adapter_ids: Optional[Union[IdsLike, MultiLoRABatch]] = None) -> Tensor:
        """``base(x)`` plus each token's adapter. ``adapter_ids``: one slot id per token
        (``x.numel() // in_features`` of them), or one per sequence of a 3-D ``x``
        [batch, seq, in]; -1 = no adapter. None: the ids set by ``set_adapter_ids``."""
        y = self.base(x)
        batch = self.batch if adapter_ids is None else self._prepare(adapter_ids)
        if batch is None:
            return y
        if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
            raise RuntimeError("MultiLoRALinear is for inference: the adapter term has no gradient; "
                               "run it under torch.no_grad() or torch.inference_mode()")
        ids = batch.adapter_ids
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if x.dim() >= 3 and (batch.per_sequence or ids.shape[0] != tokens) and ids.shape[0] == x.shape[0]:
            # One adapter per sequence: sequences are sorted segments of seq tokens each.
            seq = tokens // x.shape[0] if x.shape[0] else 0
            offsets = torch.arange(x.shape[0] + 1, device=ids.device, dtype=ids.dtype) * seq
            return mlo.add_multi_lora_(y, x, self.lora_a, self.lora_b, self.ranks, self.scales,
                                       seg_offsets=offsets, seg_adapters=ids, slice_offsets=self.slice_offsets)
        if ids.shape[0] != tokens:
            raise ValueError(f"adapter_ids: expected {tokens} ids (one per token) or {x.shape[0]} (one per "
                             f"sequence of a [batch, seq, in] input), got {ids.shape[0]} for x of shape "
                             f"{tuple(x.shape)}")
        return mlo.add_multi_lora_(y, x, self.lora_a, self.lora_b, self.ranks, self.scales, adapter_ids=ids,
                                   slice_offsets=self.slice_offsets)

    def extra_repr(self) -> str:
        return (f"in_features={self.base.in_features}, out_features={self.base.out_features}, "
                f"max_adapters={self.max_adapters}, r_max={self.r_max}, slices={self.slice_sizes}, "
                f"loaded={len(self._slots)}")


# ----------------------------------------------------------------------------- whole models


class MultiLoRAManager(_SlotNames):
    """The MultiLoRALinear layers of one model, with adapter names mapped to the
    same slot in every layer, and the batch's adapters set for all layers at once."""

    def __init__(self, model: nn.Module, layers: Dict[str, MultiLoRALinear], peft_names: Dict[str, list],
                 max_adapters: int):
        self.model = model
        self.layers = layers            # module name -> layer
        self.peft_names = peft_names    # module name -> PEFT module names of its slices
        self.max_adapters = max_adapters
        self._slots: Dict[str, int] = {}

    def _next_slot(self, name: str) -> int:
        if name in self._slots:
            return self._slots[name]
        used = set(self._slots.values())
        for j in range(self.max_adapters):
            if j not in used:
                return j
        raise RuntimeError(f"all {self.max_adapters} adapter slots are in use: unload one first")

    def load_peft_adapter(self, name: str, source: AdapterSource, config: Optional[Mapping] = None,
                          strict: bool = True) -> int:
        """Loads a PEFT LoRA adapter into every layer it touches; returns its slot.
        ``strict``: raise when the adapter has weights for a module that is not wrapped
        (serving it without them would give wrong outputs)."""
        state, config = read_peft_adapter(source, config)
        _check_peft_config(config)
        covered = {n for names in self.peft_names.values() for n in names}
        missing = sorted(_peft_module_names(state) - covered)
        if strict and missing:
            raise ValueError(f"adapter {name!r} has weights for modules that are not MultiLoRALinear layers: "
                             f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
        slot = self._next_slot(name)
        if name in self._slots:
            self.unload_adapter(name)
        loaded_any = False
        for mod_name, layer in self.layers.items():
            names = self.peft_names[mod_name]
            if all(peft_module_weights(state, config, n) is None for n in names):
                continue
            layer._load_from_state(name, state, config, names, slot)
            loaded_any = True
        if not loaded_any:
            raise ValueError(f"adapter {name!r} touches none of the wrapped layers")
        self._slots[name] = slot
        return slot

    def load_adapter(self, name: str, weights: Mapping[str, tuple], scale: float) -> int:
        """Loads an adapter from tensors: ``weights`` maps a wrapped module name to
        ``(lora_a, lora_b)`` (lists per slice for fused layers); returns its slot."""
        unknown = sorted(set(weights) - set(self.layers))
        if unknown:
            raise ValueError(f"weights: {unknown} are not MultiLoRALinear layers of this model")
        slot = self._next_slot(name)
        if name in self._slots:
            self.unload_adapter(name)
        for mod_name, (a, b) in weights.items():
            self.layers[mod_name].load_adapter(name, a, b, scale, slot)
        self._slots[name] = slot
        return slot

    def unload_adapter(self, name: str) -> int:
        slot = self.slot_of(name)
        for layer in self.layers.values():
            if name in layer.adapters:
                layer.unload_adapter(name)
        del self._slots[name]
        return slot

    def set_batch(self, adapters: Optional[Union[IdsLike, Sequence[Optional[str]], MultiLoRABatch]],
                  per_sequence: bool = False) -> Optional[MultiLoRABatch]:
        """Adapters of the next forwards of the model, for every layer: slot ids or
        adapter names (None = base model) per token, or per sequence with
        ``per_sequence=True`` (a [batch] list for inputs of shape [batch, seq]). None clears it.
        A device tensor is used as is (for CUDA graphs: update it in place between replays)."""
        if adapters is None:
            batch = None
        elif isinstance(adapters, MultiLoRABatch):
            batch = adapters
        else:
            if not isinstance(adapters, Tensor) and any(isinstance(a, str) or a is None for a in adapters):
                adapters = [-1 if a is None else self.slot_of(a) for a in adapters]
            device = next(iter(self.layers.values())).ranks.device
            loaded = [False] * self.max_adapters
            for j in self._slots.values():
                loaded[j] = True
            batch = MultiLoRABatch.prepare(adapters, device, self.max_adapters, per_sequence, loaded)
        for layer in self.layers.values():
            layer.batch = batch
        return batch


def apply_multi_lora(model: nn.Module, target_modules: Union[str, Sequence[str]], max_adapters: int, r_max: int,
                     slices: Optional[Mapping[str, Mapping[str, int]]] = None,
                     dtype: Optional[torch.dtype] = None) -> MultiLoRAManager:
    """Replaces every nn.Linear of ``model`` whose name matches ``target_modules``
    (name suffixes such as ``["q_proj", "v_proj"]``, or a regex for the full name) by
    a MultiLoRALinear with ``max_adapters`` slots of rank <= ``r_max``, freezes the
    model, and returns the manager that loads adapters and sets each batch's adapters.

    ``slices``: fused layers, by name suffix, with the PEFT module names and sizes of
    their output slices in order, e.g. ``{"qkv_proj": {"q_proj": 4096, "k_proj": 1024,
    "v_proj": 1024}}`` (PEFT adapters trained on separate q/k/v projections then load
    into the fused layer)."""
    slices = dict(slices or {})
    targets = [(n, m) for n, m in model.named_modules() if n and matches(n, target_modules)]
    if not targets:
        raise ValueError(f"target_modules: no module of {type(model).__name__} matches {target_modules!r}")
    for name, module in targets:
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target_modules: {name!r} matches but is a {type(module).__name__}, "
                             "only nn.Linear can be adapted")
    model.requires_grad_(False)
    layers, peft_names = {}, {}
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        fused = next((v for k, v in slices.items() if child == k), None)
        if fused is not None:
            sizes = list(fused.values())
            names = [f"{parent_name}.{n}" if parent_name else n for n in fused]
        else:
            sizes, names = None, [name]
        layer = MultiLoRALinear(module, max_adapters, r_max, slices=sizes, dtype=dtype)
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        layers[name] = layer
        peft_names[name] = names
    return MultiLoRAManager(model, layers, peft_names, max_adapters)
