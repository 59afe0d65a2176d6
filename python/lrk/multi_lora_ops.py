"""Batched multi-adapter LoRA for serving (ops.md section 2): fake kernels, thin
wrappers and host-side helpers for ``torch.ops.lrk.multi_lora_*``.

Schemas (csrc/registration.cpp)::

    multi_lora_shrink(Tensor x, Tensor[] lora_a, Tensor ranks, Tensor adapter_ids) -> Tensor
    multi_lora_shrink_segments(Tensor x, Tensor[] lora_a, Tensor ranks,
                               Tensor seg_offsets, Tensor seg_adapters) -> Tensor
    multi_lora_expand(Tensor(a!) y, Tensor h, Tensor[] lora_b, Tensor ranks, Tensor scales,
                      Tensor adapter_ids, int[]? slice_offsets=None) -> ()
    multi_lora_expand_segments(Tensor(a!) y, Tensor h, Tensor[] lora_b, Tensor ranks, Tensor scales,
                               Tensor seg_offsets, Tensor seg_adapters, int[]? slice_offsets=None) -> ()

The pool: one ``lora_a[s]`` ``[n, r_max, K]`` and one ``lora_b[s]`` ``[n, N_s, r_max]``
per output slice ``s`` (one slice for a plain layer; three for a fused QKV layer,
whose outputs land in ``y`` at ``slice_offsets``, by default packed from column 0).
Slices share ``ranks`` ``[n]`` (int32/int64, each in ``[0, r_max]``; rank 0 = an
empty slot) and ``scales`` ``[n]`` (float32). Only the first ``r_j`` rows of
``lora_a[s][j]`` and columns of ``lora_b[s][j]`` are read: a rank-8 adapter costs 8
in a pool with ``r_max = 128``.

Layouts: ``adapter_ids`` ``[M]`` gives each token's adapter (decode batches, BGMV);
segments give sorted tokens (prefill, SGMV): tokens ``[seg_offsets[s],
seg_offsets[s+1])`` use ``seg_adapters[s]``; empty segments are fine, tokens
outside every segment get no adapter. ``-1`` = no adapter (the base output only).

``h`` is ``[slices, M, r_max]`` in float32 (float64 for float64 inputs), zero for
tokens without an adapter and beyond each adapter's rank; the expand adds
``scale_j * B_j h`` to ``y`` in place, in fp32, rounding ``y`` once.

Validation of index VALUES: the C++ ops check them only for CPU tensors; on CUDA
they never read the device values on the host (that would synchronise and break
CUDA-graph capture). CUDA kernels stay safe on bad values (an id outside
``[0, n)`` acts as -1, ranks are clamped to ``[0, r_max]``, segment bounds to
``[0, M]``) but give no error: validate ids where they are made, on the host,
with :func:`check_adapter_ids` / :func:`check_segments` (lrk.nn.MultiLoRALinear
does so for ids given as lists or CPU tensors).

The ops have no autograd formula: they are for inference.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Pools = Union[Tensor, Sequence[Tensor]]

__all__ = [
    "multi_lora_shrink", "multi_lora_shrink_segments", "multi_lora_expand_", "multi_lora_expand_segments_",
    "add_multi_lora_", "check_adapter_ids", "check_segments", "segments_from_sorted_ids",
]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_list(pools: Pools) -> list[Tensor]:
    return [pools] if isinstance(pools, Tensor) else list(pools)


# ----------------------------------------------------------------------------- fakes


def _shrink_fake_impl(x, lora_a, ranks):
    torch._check(len(lora_a) >= 1, lambda: "lora_a: expected a list of at least one pool")
    torch._check(x.dim() >= 1, lambda: "x: expected a tensor of shape [..., in_features]")
    for s, a in enumerate(lora_a):
        torch._check(a.dim() == 3 and a.shape[2] == x.shape[-1],
                     lambda: f"lora_a[{s}]: expected shape [n, r_max, {x.shape[-1]}], got {tuple(a.shape)}")
    m = math.prod(x.shape[:-1])
    return x.new_empty((len(lora_a), m, lora_a[0].shape[1]), dtype=_acc_dtype(x.dtype))


@torch.library.register_fake("lrk::multi_lora_shrink")
def _multi_lora_shrink_fake(x, lora_a, ranks, adapter_ids):
    return _shrink_fake_impl(x, lora_a, ranks)


@torch.library.register_fake("lrk::multi_lora_shrink_segments")
def _multi_lora_shrink_segments_fake(x, lora_a, ranks, seg_offsets, seg_adapters):
    return _shrink_fake_impl(x, lora_a, ranks)


def _expand_fake_impl(y, h, lora_b):
    torch._check(len(lora_b) >= 1, lambda: "lora_b: expected a list of at least one pool")
    torch._check(h.dim() == 3 and h.shape[0] == len(lora_b),
                 lambda: f"h: expected shape [{len(lora_b)}, M, r_max], got {tuple(h.shape)}")


@torch.library.register_fake("lrk::multi_lora_expand")
def _multi_lora_expand_fake(y, h, lora_b, ranks, scales, adapter_ids, slice_offsets=None):
    _expand_fake_impl(y, h, lora_b)


@torch.library.register_fake("lrk::multi_lora_expand_segments")
def _multi_lora_expand_segments_fake(y, h, lora_b, ranks, scales, seg_offsets, seg_adapters, slice_offsets=None):
    _expand_fake_impl(y, h, lora_b)


# ----------------------------------------------------------------------------- wrappers


def multi_lora_shrink(x: Tensor, lora_a: Pools, ranks: Tensor, adapter_ids: Tensor) -> Tensor:
    """``h[s, i, :r_j] = lora_a[s][j, :r_j] @ x[i]`` for ``j = adapter_ids[i]`` (per-token layout).

    x: [..., K]; lora_a: one pool [n, r_max, K] or a list (one per output slice);
    returns h [slices, M, r_max] (float32; float64 for float64 x)."""
    return torch.ops.lrk.multi_lora_shrink(x, _as_list(lora_a), ranks, adapter_ids)


def multi_lora_shrink_segments(x: Tensor, lora_a: Pools, ranks: Tensor, seg_offsets: Tensor,
                               seg_adapters: Tensor) -> Tensor:
    """The shrink for sorted tokens: ``[seg_offsets[s], seg_offsets[s+1])`` use ``seg_adapters[s]``."""
    return torch.ops.lrk.multi_lora_shrink_segments(x, _as_list(lora_a), ranks, seg_offsets, seg_adapters)


def multi_lora_expand_(y: Tensor, h: Tensor, lora_b: Pools, ranks: Tensor, scales: Tensor, adapter_ids: Tensor,
                       slice_offsets: Optional[Sequence[int]] = None) -> Tensor:
    """In place: ``y[i, off_s:off_s+N_s] += scales[j] * lora_b[s][j, :, :r_j] @ h[s, i, :r_j]``; returns y."""
    torch.ops.lrk.multi_lora_expand(y, h, _as_list(lora_b), ranks, scales, adapter_ids,
                                    None if slice_offsets is None else [int(o) for o in slice_offsets])
    return y


def multi_lora_expand_segments_(y: Tensor, h: Tensor, lora_b: Pools, ranks: Tensor, scales: Tensor,
                                seg_offsets: Tensor, seg_adapters: Tensor,
                                slice_offsets: Optional[Sequence[int]] = None) -> Tensor:
    """The expand for sorted tokens (segment layout), in place; returns y."""
    torch.ops.lrk.multi_lora_expand_segments(y, h, _as_list(lora_b), ranks, scales, seg_offsets, seg_adapters,
                                             None if slice_offsets is None else [int(o) for o in slice_offsets])
    return y


def add_multi_lora_(y: Tensor, x: Tensor, lora_a: Pools, lora_b: Pools, ranks: Tensor, scales: Tensor, *,
                    adapter_ids: Optional[Tensor] = None, seg_offsets: Optional[Tensor] = None,
                    seg_adapters: Optional[Tensor] = None, slice_offsets: Optional[Sequence[int]] = None) -> Tensor:
    """``y += `` every token's adapter term (shrink, then expand in place); returns y.

    Give either ``adapter_ids`` (per token) or ``seg_offsets`` and ``seg_adapters``."""
    if (adapter_ids is None) == (seg_offsets is None or seg_adapters is None):
        raise ValueError("add_multi_lora_: give either adapter_ids, or seg_offsets and seg_adapters")
    if adapter_ids is not None:
        h = multi_lora_shrink(x, lora_a, ranks, adapter_ids)
        return multi_lora_expand_(y, h, lora_b, ranks, scales, adapter_ids, slice_offsets)
    h = multi_lora_shrink_segments(x, lora_a, ranks, seg_offsets, seg_adapters)
    return multi_lora_expand_segments_(y, h, lora_b, ranks, scales, seg_offsets, seg_adapters, slice_offsets)


# ----------------------------------------------------------------------------- host-side checks


def check_adapter_ids(adapter_ids: Tensor, num_adapters: int, what: str = "adapter_ids") -> None:
    """Raises ValueError unless every id is in ``[-1, num_adapters)``.

    Meant for ids on the host, before they are copied to the device; on a device
    tensor it synchronises (never call it inside CUDA-graph capture)."""
    if adapter_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{what}: expected dtype int32 or int64, got {adapter_ids.dtype}")
    if adapter_ids.numel() == 0:
        return
    lo, hi = int(adapter_ids.min()), int(adapter_ids.max())
    if lo < -1 or hi >= num_adapters:
        bad = lo if lo < -1 else hi
        pos = int((adapter_ids == bad).nonzero()[0, 0])
        raise ValueError(f"{what}: id {bad} at position {pos} is out of range for a pool of {num_adapters} "
                         f"adapters (expected -1 <= id < {num_adapters})")


def check_segments(seg_offsets: Tensor, seg_adapters: Tensor, num_tokens: int, num_adapters: int) -> None:
    """Raises ValueError unless the segment layout is valid (host-side; see check_adapter_ids)."""
    if seg_offsets.dim() != 1 or seg_adapters.dim() != 1 or seg_offsets.numel() != seg_adapters.numel() + 1:
        raise ValueError(f"seg_offsets: expected shape [segments + 1] = [{seg_adapters.numel() + 1}], "
                         f"got {tuple(seg_offsets.shape)}")
    off = seg_offsets.cpu()
    if int(off[0]) < 0 or int(off[-1]) > num_tokens:
        raise ValueError(f"seg_offsets: expected offsets within [0, {num_tokens}], got first {int(off[0])} "
                         f"and last {int(off[-1])}")
    if (off[1:] < off[:-1]).any():
        raise ValueError("seg_offsets: expected non-decreasing offsets")
    check_adapter_ids(seg_adapters, num_adapters, "seg_adapters")


def segments_from_sorted_ids(adapter_ids: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Segment layout (seg_offsets, seg_adapters, int64 CPU tensors) of host ids in
    which each adapter's tokens are consecutive (e.g. one adapter per sequence)."""
    ids = [int(v) for v in adapter_ids]
    offsets, adapters = [0], []
    for i, j in enumerate(ids):
        if i == 0 or j != ids[i - 1]:
            if i > 0:
                offsets.append(i)
            adapters.append(j)
    if ids:
        offsets.append(len(ids))
    return torch.tensor(offsets, dtype=torch.int64), torch.tensor(adapters, dtype=torch.int64)
