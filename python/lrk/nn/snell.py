"""SNELL: sparse tuning with a kernelized low-rank delta and competition-based
sparsification (ops.md section 4).

``Delta = sparsify(scale * kappa(A, B))`` with trainable ``A [out, r]``, ``B [in, r]``;
the kept entries are the largest ``(1 - sparsity)`` fraction of ``|Kmat|`` (or of its
``b x b`` tiles by norm), chosen by an exact radix select every forward: no index is
stored, the mask follows A and B. ``y = x @ (W + Delta)^T + b`` through
``lrk.snell_linear``: the dense merged matrix exists only inside the forward and
inside the backward (recomputed there), never in between, and the backward takes the
masked gradient with the SDDMM before the chain rule through kappa.

Kernels (``Kmat[i, j]``): ``"linear"`` ``a_i . b_j``; ``"piecewise_linear"``
``sum_h c_h ||a_i^h - b_j^h||_2`` (SNELL's released code: heads are equal slices of
the rank, frozen ``c_h = 0.1 * (-1)^h``); ``"rbf"`` ``exp(-gamma ||a_i - b_j||^2)``.

SNELLA (``learnable_kernel=True``): the kernel's scalars become trainable, one
``kernel_scalars`` parameter per layer: ``"linear"`` ``[scale]``, ``"piecewise_linear"``
``[c_0 .. c_{H-1}]`` (the head coefficients, ``scale`` folded in), ``"rbf"``
``[scale, log gamma]`` (gamma = exp of it stays positive). The forward goes through
``lrk.snella_linear``, whose backward also returns the scalars' gradient (summed over
the kept entries). The across-layer half of SNELLA, the budget allocator, is in
:mod:`lrk.nn.snell_budget`: it sets each layer's ``sparsity``. SNELLA's released code
learns other scalars, ``Kmat + alpha * softmax(Kmat / T) + beta`` (alpha, T, beta); that
softmax runs over a whole row of ``Kmat``, so the gradient of every kept entry reaches
every entry of its row and the backward would cost ``N x K``, not the kept entries:
lrk learns the kernel's own scalars instead.

Note: SNELL's released code multiplies the kept entries by their own detached
magnitude (``W * F.threshold(|W|, t, 0)``); this module implements the binary mask of
ops.md, ``Delta = Kmat * mask``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import sparse_ops as sp
from ._targets import check_targets, find_targets, replace_targets


class SNELLLinear(nn.Module):
    """A frozen ``nn.Linear`` plus SNELL's sparse kernelized delta.

    Args:
        base: the layer to adapt (weight and bias are shared and frozen).
        rank: r of ``A [out, r]``, ``B [in, r]``.
        kernel: ``"linear"``, ``"piecewise_linear"`` or ``"rbf"``.
        sparsity: fraction of entries (or tiles) of the delta that stay zero, in [0, 1).
        block_size: 0 for element competition, else 16/32/64/128 (tiles by norm).
        heads: heads of the piecewise-linear kernel (must divide ``rank``);
        head_coeffs: their frozen coefficients (default SNELL's ``0.1 * (-1)^h``).
        gamma: RBF width. scale: multiplies kappa (all kernels).
        learnable_kernel: SNELLA: train the kernel's scalars (``kernel_scalars``,
            float32, float64 for float64 weights), initialised from the values above.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, kernel: str = "piecewise_linear", sparsity: float = 0.9,
                 block_size: int = 0, heads: int = 2, head_coeffs: Optional[Sequence[float]] = None,
                 gamma: float = 1.0, scale: float = 1.0, learnable_kernel: bool = False):
        super().__init__()
        if kernel not in sp.SNELL_KERNELS:
            raise ValueError(f"kernel: expected one of {sp.SNELL_KERNELS}, got {kernel!r}")
        if not (0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity: expected a value in [0, 1), got {sparsity}")
        if block_size not in (0, 16, 32, 64, 128):
            raise ValueError(f"block_size: expected 0 or one of 16, 32, 64, 128, got {block_size}")
        if rank < 1:
            raise ValueError(f"rank: expected at least 1, got {rank}")
        if kernel == "rbf" and not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"gamma: expected a positive number, got {gamma}")
        if not math.isfinite(scale):
            raise ValueError(f"scale: expected a finite number, got {scale}")
        w = base.weight
        n, k = w.shape
        self.in_features, self.out_features = k, n
        self.kernel, self.sparsity, self.block_size = kernel, float(sparsity), int(block_size)
        self.gamma, self.scale = float(gamma), float(scale)
        if kernel == "piecewise_linear":
            coeffs = list(head_coeffs) if head_coeffs is not None else sp.snell_default_coeffs(heads)
            if rank % len(coeffs) != 0:
                raise ValueError(f"rank: expected a multiple of the number of heads {len(coeffs)}, got {rank}")
        else:
            coeffs = []
        self.head_coeffs = [float(c) for c in coeffs]
        self.weight = nn.Parameter(w.data, requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.data, requires_grad=False)
        # SNELL's initialisation: kaiming-uniform (a = sqrt(5)) of per-head factors,
        # i.e. U(-1/sqrt(fan), 1/sqrt(fan)) with fan = features * head width.
        head_dim = rank // max(len(self.head_coeffs), 1)
        self.lora_a = nn.Parameter(torch.empty(n, rank, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.empty(k, rank, device=w.device, dtype=w.dtype))
        with torch.no_grad():
            self.lora_a.uniform_(-1 / math.sqrt(n * head_dim), 1 / math.sqrt(n * head_dim))
            self.lora_b.uniform_(-1 / math.sqrt(k * head_dim), 1 / math.sqrt(k * head_dim))
        self.learnable_kernel = bool(learnable_kernel)
        if self.learnable_kernel:
            initial = {"linear": [self.scale], "piecewise_linear": [c * self.scale for c in self.head_coeffs],
                       "rbf": [self.scale, math.log(self.gamma)]}[kernel]
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            self.kernel_scalars = nn.Parameter(torch.tensor(initial, dtype=acc, device=w.device))
        else:
            self.kernel_scalars = None

    def kernel_params(self) -> Tensor:
        """SNELLA: the op's ``kernel_params`` from ``kernel_scalars`` (rbf: gamma = exp), differentiable."""
        if not self.learnable_kernel:
            raise RuntimeError("kernel_params: this SNELLLinear was built with learnable_kernel=False")
        if self.kernel == "rbf":
            return torch.cat([self.kernel_scalars[:1], self.kernel_scalars[1:].exp()])
        return self.kernel_scalars

    def _args(self):
        return (self.kernel, self.sparsity, self.block_size, self.head_coeffs, self.gamma, self.scale)

    def forward(self, x: Tensor) -> Tensor:
        if self.learnable_kernel:
            return sp.snella_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, self.kernel_params(),
                                    self.kernel, self.sparsity, self.block_size)
        return sp.snell_linear(x, self.weight, self.bias, self.lora_a, self.lora_b, *self._args())

    @torch.no_grad()
    def delta(self) -> Tensor:
        """The current sparse delta, dense ``[out, in]`` (float32; float64 for float64 factors)."""
        if self.learnable_kernel:
            return sp.snella_delta(self.lora_a, self.lora_b, self.kernel_params(), self.kernel, self.sparsity,
                                   self.block_size)
        return sp.snell_delta(self.lora_a, self.lora_b, *self._args())

    @torch.no_grad()
    def delta_sparse(self, layout: torch.layout = torch.sparse_coo) -> Tensor:
        """The current delta as a torch sparse tensor (its nonzeros: the kept entries)."""
        d = self.delta()
        return d.to_sparse() if layout == torch.sparse_coo else d.to_sparse(layout=layout)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear with ``W + Delta``."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_((self.weight.to(torch.float64 if self.weight.dtype == torch.float64 else torch.float32)
                          + self.delta()).to(self.weight.dtype))
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.lora_a.shape[1]}, "
                f"kernel={self.kernel}, sparsity={self.sparsity}, block_size={self.block_size}, "
                f"learnable_kernel={self.learnable_kernel}")


def apply_snell(model: nn.Module, targets: Union[Iterable[str], Callable[[str], bool], None] = None,
                **kwargs) -> list[SNELLLinear]:
    """Replace matching ``nn.Linear`` modules (names, name suffixes, a predicate, None =
    all) by SNELLLinear (``kwargs`` as for SNELLLinear); freeze the rest; return them."""
    targets = find_targets(model, check_targets(targets, allow_all=True), strict=False)
    return replace_targets(model, targets, lambda module: SNELLLinear(module, **kwargs))


@torch.no_grad()
def merge_snell(model: nn.Module) -> nn.Module:
    """Replace every SNELLLinear of ``model`` by its merged nn.Linear."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SNELLLinear):
                setattr(module, child_name, child.merge())
    return model
