"""GaLoreAdamW: AdamW with low-rank gradient projection (ops.md section 3) on lrk's ops.

A drop-in for galore-torch's ``GaLoreAdamW`` (and the HuggingFace Trainer's
``galore_adamw``): parameter groups with ``rank`` are projected, every other
parameter gets plain AdamW with the same formula (galore-torch's: eps added to
``sqrt(V)``, bias correction folded into the step size, decoupled weight decay
applied after the update).

Group keys (galore-torch's are accepted as they are):
    rank             projection rank (a group with a rank is a GaLore group)
    update_proj_gap  refresh the projector every T steps (default 200)
    scale            alpha, the scale of the back-projected update (default 1.0)
    proj_type        "svd" (exact), "rsvd" (randomized), "dct" (DCT-II selection,
                     stores indices), "random" (seeded Gaussian, stores a seed);
                     galore-torch's "std", "reverse_std", "left", "right" mean
                     "svd" with that side rule
    proj_side        "std" (default: left iff m < n), "reverse_std", "left", "right"
    proj_bits        32, or 4 for int4 storage of svd/rsvd projectors (Q-GaLore);
                     galore-torch's ``proj_quant=True`` means 4
    quant_group_size rows per int4 scale group along each column (default 256,
                     <= 0: one group per column)
    fira             add Fira's scaled full-rank residual with its norm-growth limiter
    moment_update    "keep" (GaLore) or "rotate" (M <- P_new^T P_old M on refresh)
    oversample, power_iters, seed        rsvd's (and random's) parameters
    lazy_refresh, cos_threshold, gamma_proj, queue_size
                     Q-GaLore's lazy refresh: after each refresh, the |cosine| of
                     the new and previous leading projector vectors joins a queue
                     (a sliding window of queue_size); when the queue is full and
                     its mean >= cos_threshold, the gap is multiplied by gamma_proj
    Q-GaLore's own keys are accepted too: ``quant`` with ``quant_n_bit`` (only 4
    is supported) means ``proj_bits``; a group that names ``cos_threshold`` turns
    lazy refresh on unless it sets ``lazy_refresh`` (Q-GaLore always refreshes lazily).

Fira follows ops.md: the residual is ``G - P P^T G``. (Fira's released code
subtracts ``scale * P P^T G``; the two agree at ``scale = 1``.)

The state holds tensors and plain numbers only (``torch.load(weights_only=True)``
works), and everything a refresh needs (the seeds, the current gap) is in it, so
a resumed run continues bit-identically. The step reads ``p.grad`` (gradient
accumulation works as with any optimizer). Row-sharded DTensor parameters
(FSDP2) are projected without gathering the gradient; see _galore_sharded.py.
"""
from __future__ import annotations

import math
from itertools import chain
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import galore_ops as go
from . import _galore_sharded as sh

PROJ_TYPES = ("svd", "rsvd", "dct", "random")
PROJ_SIDES = ("std", "reverse_std", "left", "right")
MOMENT_UPDATES = ("keep", "rotate")

_MASK63 = (1 << 63) - 1
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (group seed, parameter ordinal, refresh count)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h & _MASK63


def _projects_left(shape, side: str) -> bool:
    m, n = shape
    if side == "std":
        return m < n
    if side == "reverse_std":
        return m >= n
    return side == "left"


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _is_galore(group: dict) -> bool:
    return group.get("rank") is not None


class GaLoreAdamW(Optimizer):
    """AdamW with GaLore projection for parameter groups that set ``rank`` (see the module doc)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "svd", proj_side: str = "std",
                 proj_bits: int = 32, quant_group_size: int = 256, fira: bool = False, moment_update: str = "keep",
                 oversample: int = 8, power_iters: int = 1, seed: int = 0, lazy_refresh: bool = False,
                 cos_threshold: float = 0.4, gamma_proj: float = 2.0, queue_size: int = 5,
                 no_deprecation_warning: bool = False):
        # no_deprecation_warning: accepted (and ignored) so that galore-torch's and
        # transformers' AdamW call signature works unchanged.
        del no_deprecation_warning
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"GaLoreAdamW: lr must be a finite number >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"GaLoreAdamW: betas must be two numbers in [0, 1), got {betas}")
        if not eps >= 0.0:
            raise ValueError(f"GaLoreAdamW: eps must be >= 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"GaLoreAdamW: weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, proj_side=proj_side,
                        proj_bits=proj_bits, quant_group_size=quant_group_size, fira=fira,
                        moment_update=moment_update, oversample=oversample, power_iters=power_iters, seed=seed,
                        lazy_refresh=lazy_refresh, cos_threshold=cos_threshold, gamma_proj=gamma_proj,
                        queue_size=queue_size)
        self._dct_bases: dict = {}  # orthonormal DCT-II bases, built once per (size, dtype, device)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        # galore-torch's spellings.
        if group.get("proj_type") in PROJ_SIDES:
            group["proj_side"] = group["proj_type"]
            group["proj_type"] = "svd"
        if "proj_quant" in group:
            if group.pop("proj_quant"):
                group["proj_bits"] = 4
        if "alpha" in group and "scale" not in group:  # Fira's name for the scale
            group["scale"] = group.pop("alpha")
        # Q-GaLore's spellings: quant / quant_n_bit, and lazy refresh always on.
        if "quant" in group or "quant_n_bit" in group:
            quant, bits = group.pop("quant", True), group.pop("quant_n_bit", 4)
            if quant:
                group["proj_bits"] = bits
        if "cos_threshold" in group and "lazy_refresh" not in group:
            group["lazy_refresh"] = True
        super().add_param_group(group)
        added = self.param_groups[-1]
        if _is_galore(added):
            self._validate_galore_group(added, len(self.param_groups) - 1)

    @staticmethod
    def _validate_galore_group(group: dict, index: int) -> None:
        where = f"GaLoreAdamW param group {index}"
        rank = group["rank"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise ValueError(f"{where}: rank must be an integer >= 1, got {rank!r}")
        gap = group["update_proj_gap"]
        if not isinstance(gap, int) or gap < 1:
            raise ValueError(f"{where}: update_proj_gap must be an integer >= 1, got {gap!r}")
        if group["proj_type"] not in PROJ_TYPES:
            raise ValueError(f"{where}: proj_type must be one of {PROJ_TYPES + PROJ_SIDES}, got {group['proj_type']!r}")
        if group["proj_side"] not in PROJ_SIDES:
            raise ValueError(f"{where}: proj_side must be one of {PROJ_SIDES}, got {group['proj_side']!r}")
        if group["proj_bits"] not in (32, 4):
            raise ValueError(f"{where}: proj_bits (Q-GaLore's quant_n_bit) must be 32 or 4, got {group['proj_bits']!r}")
        if group["proj_bits"] == 4 and group["proj_type"] in ("dct", "random"):
            raise ValueError(f"{where}: proj_bits=4 applies to svd and rsvd projectors; {group['proj_type']} "
                             f"already stores only {'indices' if group['proj_type'] == 'dct' else 'a seed'}")
        if group["moment_update"] not in MOMENT_UPDATES:
            raise ValueError(f"{where}: moment_update must be one of {MOMENT_UPDATES}, got {group['moment_update']!r}")
        if group.get("dim", 2) > 2:
            raise ValueError(f"{where}: dim={group['dim']}: GaLoreAdamW projects 2-D matrices only")
        if group["oversample"] < 0 or group["power_iters"] < 0:
            raise ValueError(f"{where}: oversample and power_iters must be >= 0, got {group['oversample']}, "
                             f"{group['power_iters']}")
        if group["lazy_refresh"] and (group["queue_size"] < 1 or group["gamma_proj"] < 1):
            raise ValueError(f"{where}: lazy refresh needs queue_size >= 1 and gamma_proj >= 1, got "
                             f"{group['queue_size']}, {group['gamma_proj']}")
        for j, p in enumerate(group["params"]):
            if p.dim() != 2:
                raise ValueError(f"{where}: parameter {j} has shape {tuple(p.shape)}; GaLore projects 2-D matrices, "
                                 f"put it in a group without 'rank' (plain AdamW)")
            if rank > min(p.shape):
                raise ValueError(f"{where}: rank {rank} is larger than min(m, n) = {min(p.shape)} of parameter {j} "
                                 f"with shape {tuple(p.shape)}")

    # ------------------------------------------------------------------ state dict

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating-point state to each parameter's dtype; GaLore keeps
        # float32 moments and projectors for bf16 parameters, so restore them as saved.
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        id_to_param = dict(zip(saved_ids, params))
        for pid, saved in state_dict["state"].items():
            p = id_to_param[pid]
            device = _local(p).device
            for key, value in saved.items():
                if torch.is_tensor(value):
                    self.state[p][key] = value.to(device=device, copy=True)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GaLoreAdamW does not support sparse gradients")
                # The step op updates a contiguous parameter in place; a strided one
                # (channels_last, a transposed view) is stepped on a copy, written back.
                w = _local(p)
                work = w if w.is_contiguous() else w.contiguous()
                if _is_galore(group):
                    self._galore_step(p, work, group)
                else:
                    self._adamw_step(p, work, group)
                if work is not w:
                    w.copy_(work)
        return loss

    def _hyper(self, group: dict, step: int) -> dict:
        beta1, beta2 = group["betas"]
        return dict(step=step, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], correct_bias=group["correct_bias"])

    def _adamw_step(self, p: Tensor, w: Tensor, group: dict) -> None:
        g = _local(p.grad)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(w.shape, dtype=_acc_dtype(w.dtype), device=w.device)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        state["step"] += 1
        go.galore_adamw_step(w, g, state["exp_avg"], state["exp_avg_sq"], None, left=False,
                             **self._hyper(group, state["step"]))

    def _ordinal(self, p: Tensor) -> int:
        for i, q in enumerate(chain.from_iterable(g["params"] for g in self.param_groups)):
            if q is p:
                return i
        raise KeyError("parameter not in this optimizer")

    def _init_galore_state(self, p: Tensor, group: dict, w: Tensor, left: bool, shard) -> dict:
        state = self.state[p]
        m, n = p.shape
        rank = group["rank"]
        acc = _acc_dtype(w.dtype)
        if left:
            low = (rank, n)
        else:
            low = (w.shape[0], rank)  # local rows of a right projection's R = G Q
        state["step"] = 0
        state["refreshes"] = 0
        state["proj_gap"] = group["update_proj_gap"]
        state["proj_seed"] = _mix_seed(group["seed"], self._ordinal(p))
        state["exp_avg"] = torch.zeros(low, dtype=acc, device=w.device)
        state["exp_avg_sq"] = torch.zeros(low, dtype=acc, device=w.device)
        if group["fira"]:
            state["fira_norm"] = torch.full((1,), -1.0, dtype=acc, device=w.device)
        if group["lazy_refresh"]:
            state["cos_queue"] = torch.zeros(group["queue_size"], dtype=torch.float64, device=w.device)
            state["cos_count"] = 0
        return state

    def _dct_basis(self, size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (size, dtype, str(device))
        if key not in self._dct_bases:
            self._dct_bases[key] = go.dct_basis(torch.arange(size, device=device), size, dtype)
        return self._dct_bases[key]

    def _dense_projector(self, state: dict, group: dict, size: int, dtype: torch.dtype,
                         device: torch.device) -> Tensor:
        """The full projector [size, rank] that the current state stores."""
        method = group["proj_type"]
        if method == "dct":
            return self._dct_basis(size, dtype, device).index_select(1, state["proj_indices"])
        if method == "random":
            out = torch.empty(size, group["rank"], dtype=dtype, device=device)
            return go.philox_normal_(out, state["proj_current_seed"], 1.0 / math.sqrt(group["rank"]))
        if "proj_packed" in state:
            return go.dequantize_int4(state["proj_packed"], state["proj_scales"], state["proj_zeros"], size,
                                      group["quant_group_size"]).to(dtype)
        return state["proj"]

    def _new_projector(self, g: Tensor, group: dict, state: dict, left: bool, size: int, shard) -> Tensor:
        """Compute the next full projector from the (local) gradient and store it in the state."""
        method, rank = group["proj_type"], group["rank"]
        acc = _acc_dtype(g.dtype)
        seed = _mix_seed(state["proj_seed"], state["refreshes"])
        if method == "random":
            state["proj_current_seed"] = seed
            return self._dense_projector(state, group, size, acc, g.device)
        if method == "dct":
            if shard is None:
                idx = go.dct_select(g, rank, left)
            elif left:
                idx = go.dct_select(sh.gather_rows(g, shard), rank, True)
            else:
                idx = sh.dct_right_select(g, shard, rank)
            state["proj_indices"] = idx
            return self._dense_projector(state, group, size, acc, g.device)
        if method == "rsvd":
            if shard is None:
                proj = go.rsvd_projector(g, rank, left, group["oversample"], group["power_iters"], seed)
            else:
                proj = sh.rsvd_projector(g, shard, rank, left, group["oversample"], group["power_iters"], seed)
        else:
            proj = go.svd_projector(g if shard is None else sh.gather_rows(g, shard), rank, left)
        if group["proj_bits"] == 4:
            packed, scales, zeros = go.quantize_int4(proj, group["quant_group_size"])
            state["proj_packed"], state["proj_scales"], state["proj_zeros"] = packed, scales, zeros
            return self._dense_projector(state, group, size, acc, g.device)
        state["proj"] = proj.contiguous()
        return state["proj"]

    def _refresh(self, p: Tensor, group: dict, state: dict, g: Tensor, left: bool, shard) -> None:
        size = p.shape[0] if left else p.shape[1]
        acc = _acc_dtype(g.dtype)
        old = None
        if state["refreshes"] > 0 and group["moment_update"] == "rotate":
            old = self._dense_projector(state, group, size, acc, g.device).clone()
        new = self._new_projector(g, group, state, left, size, shard)
        if group["lazy_refresh"]:
            self._lazy_refresh_update(state, group, new[:, 0])
        if old is not None:
            # Re-express the first moment in the new basis: R_new ~ (P_new^T P_old) R_old.
            c = new.t() @ old
            m1 = state["exp_avg"]
            m1.copy_(c @ m1 if left else m1 @ c.t())
        state["refreshes"] += 1

    @staticmethod
    def _lazy_refresh_update(state: dict, group: dict, lead: Tensor) -> None:
        lead = lead.detach().to(torch.float64, copy=True)
        if "proj_lead" in state:
            prev = state["proj_lead"]
            cos = (lead @ prev).abs() / (lead.norm() * prev.norm()).clamp_min(1e-30)
            queue = state["cos_queue"]
            size = queue.numel()
            if state["cos_count"] == size:
                queue[:-1] = queue[1:].clone()
                queue[-1] = cos
            else:
                queue[state["cos_count"]] = cos
                state["cos_count"] += 1
            if state["cos_count"] == size and queue.mean().item() >= group["cos_threshold"]:
                state["proj_gap"] = int(state["proj_gap"] * group["gamma_proj"])
        state["proj_lead"] = lead

    def _galore_step(self, p: Tensor, w: Tensor, group: dict) -> None:
        g = _local(p.grad)
        shard = sh.row_shard(p)
        left = _projects_left(p.shape, group["proj_side"])
        state = self.state[p]
        if not state:
            state = self._init_galore_state(p, group, w, left, shard)
        t0 = state["step"]
        if state["refreshes"] == 0 or t0 % state["proj_gap"] == 0:
            self._refresh(p, group, state, g, left, shard)
        state["step"] = t0 + 1
        hyper = self._hyper(group, state["step"])
        fira_norm = state.get("fira_norm")
        if shard is None:
            if "proj_packed" in state and w.dtype != torch.float64:  # the op dequantises inside
                go.galore_adamw_step(w, g, state["exp_avg"], state["exp_avg_sq"], state["proj_packed"], left=left,
                                     scale=group["scale"], proj_scales=state["proj_scales"],
                                     proj_zeros=state["proj_zeros"], quant_group_size=group["quant_group_size"],
                                     fira=group["fira"], fira_prev_norm=fira_norm, **hyper)
            else:
                proj = self._dense_projector(state, group, p.shape[0] if left else p.shape[1],
                                             _acc_dtype(w.dtype), w.device)
                go.galore_adamw_step(w, g, state["exp_avg"], state["exp_avg_sq"], proj, left=left,
                                     scale=group["scale"], fira=group["fira"], fira_prev_norm=fira_norm, **hyper)
            return
        self._sharded_step(w, g, state, group, left, shard, hyper)

    def _sharded_step(self, w: Tensor, g: Tensor, state: dict, group: dict, left: bool, shard, hyper: dict) -> None:
        acc = _acc_dtype(w.dtype)
        size = shard.global_rows if left else w.shape[1]
        full = self._dense_projector(state, group, size, acc, w.device)
        p_rows = sh.local_rows(full, shard).contiguous() if left else full
        m1, v1 = state["exp_avg"], state["exp_avg_sq"]
        has_rows = w.shape[0] > 0
        if left:  # P^T G = sum over shards of P_s^T G_s: one all-reduce of [rank, n]
            r = go.project(g, p_rows, True) if has_rows else torch.zeros_like(m1)
            sh.all_reduce(r, shard)
        else:     # G_s Q is local
            r = go.project(g, full, False) if has_rows else torch.zeros_like(m1)
        if group["fira"]:
            t = hyper["step"]
            step_size = hyper["lr"]
            if hyper["correct_bias"]:
                step_size *= math.sqrt(1.0 - hyper["beta2"] ** t) / (1.0 - hyper["beta1"] ** t)
            sh.fira_sharded_step(w, g, m1, v1, p_rows, left, r, shard, state["fira_norm"], step_size, hyper["lr"],
                                 hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"], group["scale"])
            return
        if not has_rows:
            sh.moments_update(r, m1, v1, hyper["beta1"], hyper["beta2"], hyper["eps"])
            return
        go.galore_adamw_step(w, g, m1, v1, p_rows, left=left, scale=group["scale"], low_rank_grad=r, **hyper)
