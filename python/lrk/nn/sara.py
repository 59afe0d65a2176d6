"""SaRA: fine-tune the smallest-magnitude entries of a frozen linear layer.

Design
------
* The trainable set is the entries with the smallest ``|W|``: an exact per-layer
  fraction (radix select, ties broken in flat order so the budget is exact even in
  bf16) or an absolute threshold; unstructured, or ``b x b`` blocks (the tiles with
  the most entries below the threshold / the fraction's k-th value).
* The trained values live in ``W`` itself: the forward is the plain ``x @ W^T + b``
  (``lrk.sparse_grad_linear_*``, one GEMM, nothing copied).
* The optimizer sees one parameter per layer, ``delta`` (``[nnz]``, or
  ``[n_blocks, b, b]``), the change of the trained entries from their values at
  selection (``base_values``): ``W[pattern] = base_values + delta``. Its gradient is
  the masked gradient ``(grad_y^T @ x)[pattern]`` from the SDDMM: no dense ``[N, K]``
  gradient ever exists, and gradient + Adam moments cost ``O(nnz)``. ``delta`` is
  float32 by default (a master copy of the trained entries only), so small updates
  are not lost to bf16 rounding of W. AdamW's decoupled weight decay shrinks
  ``delta`` (the update), like LoRA's; pass ``weight_decay=0`` to disable it.
* ``delta`` is written into ``W`` after each optimizer step: :func:`attach_sara`
  registers an optimizer step post-hook that does it (and counts steps for the
  progressive reselection). Without the hook the layer still notices, in eager mode,
  that ``delta`` changed (its version counter, bumped by every in-place optimizer
  update) and writes ``W`` before its next forward. Under ``torch.compile`` use the hook.
* Nuclear-norm penalty :meth:`SaRALinear.nuclear_norm`: ``||Delta||_*`` estimated by a
  randomized SVD computed with sparse products only (``Delta`` is never densified),
  with the subgradient ``U V^T`` evaluated at the pattern.
* Progressive reselection (``reselect_at`` steps): the current ``W`` (trained values
  included) is re-scored, the still-small entries become the new pattern, the old
  delta is banked in a sparse tensor and the optimizer state of ``delta`` is reset.
* Export: :meth:`SaRALinear.delta_sparse` (all changes since construction, a torch
  sparse COO tensor), :func:`merge_sara` / :meth:`SaRALinear.merge` (a plain nn.Linear).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import sparse_ops as sp
from ._targets import check_targets, find_targets, replace_targets


class SaRALinear(nn.Module):
    """A frozen ``nn.Linear`` whose smallest-magnitude weights are trained in place.

    Args:
        base: the layer to adapt; its weight tensor is shared (trained values are
            written into it) and frozen, its bias frozen.
        fraction: fraction of entries to train (exact count); or
        threshold: train the entries with ``|w| < threshold``.
        block_size: None (unstructured) or 16/32/64/128 (train whole tiles; the
            number of tiles is the same fraction of tiles).
        reselect_at: optimizer step(s) after which the pattern is chosen again among
            the entries that are still small (progressive SaRA); needs :func:`attach_sara`.
        delta_dtype: dtype of the trained parameter (default float32, or float64 for
            float64 weights).
    """

    def __init__(self, base: nn.Linear, fraction: Optional[float] = None, threshold: Optional[float] = None,
                 block_size: Optional[int] = None, reselect_at: Union[int, Sequence[int], None] = None,
                 delta_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if (fraction is None) == (threshold is None):
            raise ValueError("SaRALinear: pass exactly one of fraction or threshold")
        if fraction is not None and not (0.0 < fraction <= 1.0):
            raise ValueError(f"fraction: expected a value in (0, 1], got {fraction}")
        if threshold is not None and not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"threshold: expected a positive finite number, got {threshold}")
        if block_size is not None and block_size not in (16, 32, 64, 128):
            raise ValueError(f"block_size: expected None or one of 16, 32, 64, 128, got {block_size}")
        w = base.weight
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.fraction, self.threshold, self.block_size = fraction, threshold, block_size
        self.reselect_at = sorted({reselect_at} if isinstance(reselect_at, int) else set(reselect_at or ()))
        self.weight = nn.Parameter(w.data if w.is_contiguous() else w.data.contiguous(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.data, requires_grad=False)
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        self.delta_dtype = delta_dtype or acc
        self.step_count = 0
        self._synced_version = -1
        self.delta = nn.Parameter(torch.empty(0, dtype=self.delta_dtype, device=w.device))
        self._banked: Optional[Tensor] = None  # deltas of earlier patterns (sparse COO, float32/64)
        self._select_pattern()

    # ------------------------------------------------------------------ pattern

    @torch.no_grad()
    def _select_pattern(self) -> None:
        w = self.weight
        n, k = w.shape
        if self.block_size is None:
            if self.fraction is not None:
                mask = sp.abs_topk_mask(w, sp.keep_count(n * k, self.fraction), largest=False)
            else:
                mask = w.abs().float() < self.threshold
            index_dtype = torch.int32 if max(n, k, int(mask.sum())) < 2**31 - 1 else torch.int64
            crow, col = sp.mask_to_csr(mask, index_dtype)
            self._set_buffer("crow_indices", crow)
            self._set_buffer("col_indices", col)
            self.nnz = col.numel()
            base = w.view(-1)[self._flat_index()]
        else:
            b = self.block_size
            if self.fraction is not None:
                cut = sp.abs_kth_value(w, sp.keep_count(n * k, self.fraction), largest=False).float()
                frac = self.fraction
            else:
                cut = torch.tensor(self.threshold, device=w.device)
                frac = float((w.abs().float() < self.threshold).float().mean())
            # Tiles richest in small entries; entries equal to the fraction's cut count too.
            thr = float(torch.nextafter(cut, torch.tensor(math.inf, device=cut.device)))
            scores = sp.block_scores(w, b, "count_below", thr)
            n_blocks = sp.keep_count(scores.numel(), frac)
            self._set_buffer("block_indices", sp.topk_block_indices(scores, n_blocks))
            self.nnz = n_blocks * b * b
            valid = self._block_valid()
            self._n_valid = int(valid.sum())
            base = torch.zeros(n_blocks, b, b, dtype=w.dtype, device=w.device)
            base.view(-1)[self._valid_positions(valid)] = w.view(-1)[self._flat_index()]
        self.register_buffer("base_values", base.to(self.delta_dtype), persistent=True)
        self.delta.data = torch.zeros_like(self.base_values)
        self.delta.grad = None
        self._synced_version = self.delta._version

    def _set_buffer(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value, persistent=True)

    def _block_rc(self):
        b = self.block_size
        ar = torch.arange(b, device=self.block_indices.device)
        rows = (self.block_indices[:, 0] * b).view(-1, 1, 1) + ar.view(1, b, 1)
        cols = (self.block_indices[:, 1] * b).view(-1, 1, 1) + ar.view(1, 1, b)
        return rows, cols

    def _block_valid(self) -> Tensor:
        rows, cols = self._block_rc()
        return (rows < self.out_features) & (cols < self.in_features)  # [n_blocks, b, b]

    def _valid_positions(self, valid: Tensor) -> Tensor:
        return torch.nonzero_static(valid.reshape(-1), size=self._n_valid).view(-1)

    def _flat_index(self) -> Tensor:
        """Flat indices into W of the trained entries (block mode: the in-range ones)."""
        if self.block_size is None:
            n = self.out_features
            counts = self.crow_indices.diff()
            rows = torch.repeat_interleave(torch.arange(n, device=counts.device), counts, output_size=self.nnz)
            return rows * self.in_features + self.col_indices.long()
        rows, cols = self._block_rc()
        flat = (rows * self.in_features + cols).expand(-1, self.block_size, self.block_size).reshape(-1)
        return flat[self._valid_positions(self._block_valid())]

    def _trained_values(self) -> Tensor:
        vals = (self.base_values + self.delta.detach()).to(self.weight.dtype)
        if self.block_size is None:
            return vals
        return vals.view(-1)[self._valid_positions(self._block_valid())]

    # ------------------------------------------------------------------ training

    @torch.no_grad()
    def sync_weight(self) -> None:
        """Write ``base_values + delta`` into W at the pattern (after an optimizer step)."""
        self.weight.view(-1).index_copy_(0, self._flat_index(), self._trained_values())
        self._synced_version = self.delta._version

    def forward(self, x: Tensor) -> Tensor:
        if not torch.compiler.is_compiling() and self._synced_version != self.delta._version:
            self.sync_weight()
        if self.block_size is None:
            return sp.sparse_grad_linear_csr(x, self.weight, self.bias, self.delta, self.crow_indices,
                                             self.col_indices)
        return sp.sparse_grad_linear_block(x, self.weight, self.bias, self.delta, self.block_indices,
                                           self.block_size)

    def post_step(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Call after each optimizer step (attach_sara does): writes W, counts the
        step, and reselects the pattern at the steps in ``reselect_at``."""
        self.sync_weight()
        self.step_count += 1
        if self.step_count in self.reselect_at:
            self.reselect(optimizer)

    @torch.no_grad()
    def reselect(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Progressive SaRA: bank the current delta, choose a new pattern among the
        entries of the current W that are (still) small, restart ``delta`` at zero
        and drop its optimizer state (moments of other entries do not carry over)."""
        self.sync_weight()
        current = self._delta_coo()
        self._banked = current if self._banked is None else (self._banked + current).coalesce()
        self._select_pattern()
        if optimizer is not None:
            optimizer.state.pop(self.delta, None)

    # ------------------------------------------------------------------ penalty

    def nuclear_norm(self, rank: int = 8, oversample: int = 8, power_iters: int = 1,
                     seed: Optional[int] = None) -> Tensor:
        """``||Delta||_*`` of the current delta, estimated by a rank-``rank`` randomized
        SVD made of sparse products; differentiable in ``delta`` with the subgradient
        ``(U V^T)`` at the pattern. Add ``lam * layer.nuclear_norm()`` to the loss."""
        return _NuclearNorm.apply(self.delta, self, rank, oversample, power_iters, seed)

    # ------------------------------------------------------------------ export

    def _coords(self) -> tuple[Tensor, Tensor]:
        flat = self._flat_index()
        return flat // self.in_features, flat % self.in_features

    def _delta_values(self, delta: Tensor) -> Tensor:
        if self.block_size is None:
            return delta
        return delta.reshape(-1)[self._valid_positions(self._block_valid())]

    def _delta_coo(self, delta: Optional[Tensor] = None) -> Tensor:
        rows, cols = self._coords()
        vals = self._delta_values(self.delta.detach() if delta is None else delta)
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (self.out_features, self.in_features),
                                       check_invariants=False).coalesce()

    @torch.no_grad()
    def delta_sparse(self, layout: torch.layout = torch.sparse_coo) -> Tensor:
        """All changes to W since construction (earlier patterns included), as a sparse
        ``[out_features, in_features]`` tensor (``delta_dtype`` values)."""
        d = self._delta_coo()
        if self._banked is not None:
            d = (self._banked + d).coalesce()
        return d if layout == torch.sparse_coo else d.to_sparse(layout=layout)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding the fine-tuned weight (W already contains it)."""
        self.sync_weight()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.weight)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        sel = f"fraction={self.fraction}" if self.fraction is not None else f"threshold={self.threshold}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {sel}, "
                f"block_size={self.block_size}, trained={self.nnz}")


class _NuclearNorm(torch.autograd.Function):
    """Sum of the top singular values of the sparse delta by a randomized range finder:
    ``Y = (D D^T)^q D Omega``, ``Q = qr(Y)``, SVD of ``Q^T D``; gradient ``U V^T`` at the pattern."""

    @staticmethod
    def forward(ctx, delta: Tensor, layer: SaRALinear, rank: int, oversample: int, power_iters: int,
                seed: Optional[int]):
        dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
        d = layer._delta_coo(delta.detach().to(dtype))
        dt = d.t().coalesce()
        n, k = d.shape
        width = min(rank + oversample, n, k)
        gen = torch.Generator(device=delta.device)
        gen.manual_seed(seed if seed is not None else 0x5A2A + layer.step_count)
        omega = torch.randn(k, width, generator=gen, device=delta.device, dtype=dtype)
        q, _ = torch.linalg.qr(torch.sparse.mm(d, omega))
        for _ in range(power_iters):
            z, _ = torch.linalg.qr(torch.sparse.mm(dt, q))
            q, _ = torch.linalg.qr(torch.sparse.mm(d, z))
        small = torch.sparse.mm(dt, q).t()  # Q^T D, [width, K]
        ub, s, vh = torch.linalg.svd(small, full_matrices=False)
        r = min(rank, s.numel())
        u = q @ ub[:, :r]          # [N, r]
        v = vh[:r].t()             # [K, r]
        ctx.save_for_backward(u, v)
        ctx.layer = layer
        ctx.delta_dtype = delta.dtype
        ctx.delta_shape = delta.shape
        return s[:r].sum().to(delta.dtype)

    @staticmethod
    def backward(ctx, grad):
        u, v = ctx.saved_tensors
        layer = ctx.layer
        rows, cols = layer._coords()
        g = (u[rows] * v[cols]).sum(-1) * grad.to(u.dtype)
        if layer.block_size is not None:
            full = torch.zeros(ctx.delta_shape, dtype=u.dtype, device=u.device).view(-1)
            full[layer._valid_positions(layer._block_valid())] = g
            g = full.view(ctx.delta_shape)
        return g.to(ctx.delta_dtype), None, None, None, None, None


# ---------------------------------------------------------------------------- model helpers


def apply_sara(model: nn.Module, targets: Union[Iterable[str], Callable[[str], bool], None] = None,
               **kwargs) -> list[SaRALinear]:
    """Replace the ``nn.Linear`` modules of ``model`` whose qualified name matches
    ``targets`` (names or name suffixes; a predicate; None = all) by SaRALinear
    (``kwargs`` as for SaRALinear), freeze everything else, and return the new layers."""
    targets = find_targets(model, check_targets(targets, allow_all=True), strict=False)
    return replace_targets(model, targets, lambda module: SaRALinear(module, **kwargs))


def sara_layers(model: nn.Module) -> list[SaRALinear]:
    return [m for m in model.modules() if isinstance(m, SaRALinear)]


def attach_sara(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Register an optimizer step post-hook that calls ``post_step`` on every SaRA
    layer of ``model`` (write W, count steps, progressive reselection). Returns the
    hook handle."""
    layers = sara_layers(model)

    def hook(opt, args, kwargs):
        for layer in layers:
            layer.post_step(opt)

    return optimizer.register_step_post_hook(hook)


@torch.no_grad()
def merge_sara(model: nn.Module) -> nn.Module:
    """Replace every SaRALinear of ``model`` by the plain nn.Linear it has become."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SaRALinear):
                setattr(module, child_name, child.merge())
    return model


@torch.no_grad()
def apply_delta(linear: nn.Linear, delta: Tensor) -> nn.Linear:
    """Add an exported sparse delta (``SaRALinear.delta_sparse()``) to a plain nn.Linear."""
    d = delta.coalesce() if delta.layout == torch.sparse_coo else delta.to_sparse_coo().coalesce()
    idx = d.indices()
    flat = idx[0] * linear.weight.shape[1] + idx[1]
    w = linear.weight.view(-1)
    w.index_copy_(0, flat, (w[flat].to(d.dtype) + d.values()).to(w.dtype))
    return linear
