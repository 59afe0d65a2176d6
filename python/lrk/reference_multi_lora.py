"""Pure-PyTorch reference of the batched multi-adapter LoRA ops (ops.md section 2):
a plain loop over tokens, written for clarity and computed in the caller's dtype
(pass float64 for a gold standard). Unlike the ops, the expand reference returns a
new tensor instead of updating ``y`` in place.

Per token ``i`` with adapter ``j`` (``-1`` = none) of rank ``r_j`` and scale ``s_j``,
for each output slice ``s``::

    h[s, i, :r_j]                    = lora_a[s][j, :r_j] @ x[i]
    y[i, off_s : off_s + N_s]       += s_j * lora_b[s][j, :, :r_j] @ h[s, i, :r_j]
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor


def segments_to_adapter_ids(seg_offsets: Tensor, seg_adapters: Tensor, num_tokens: int) -> Tensor:
    """Per-token adapter ids ([num_tokens], int64) of a segment layout: tokens
    ``[seg_offsets[s], seg_offsets[s+1])`` use ``seg_adapters[s]``; tokens outside
    every segment get -1."""
    ids = torch.full((num_tokens,), -1, dtype=torch.int64)
    off = [int(v) for v in seg_offsets.cpu()]
    for s, j in enumerate(int(v) for v in seg_adapters.cpu()):
        ids[off[s]:off[s + 1]] = j
    return ids


def _slice_offsets(n_out: Sequence[int], slice_offsets: Optional[Sequence[int]]) -> list[int]:
    if slice_offsets is not None:
        return [int(o) for o in slice_offsets]
    offsets, col = [], 0
    for n in n_out:
        offsets.append(col)
        col += n
    return offsets


def multi_lora_shrink(x: Tensor, lora_a: Sequence[Tensor], ranks: Tensor, adapter_ids: Tensor) -> Tensor:
    """h [slices, M, r_max] with ``h[s, i, :r_j] = lora_a[s][j, :r_j] @ x[i]``, 0 elsewhere."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    r_max = lora_a[0].shape[1]
    h = torch.zeros(len(lora_a), x2.shape[0], r_max, dtype=x.dtype, device=x.device)
    for i, j in enumerate(int(v) for v in adapter_ids.cpu()):
        if j < 0:
            continue
        r = int(ranks[j])
        for s, a in enumerate(lora_a):
            h[s, i, :r] = a[j, :r] @ x2[i]
    return h


def multi_lora_expand(y: Tensor, h: Tensor, lora_b: Sequence[Tensor], ranks: Tensor, scales: Tensor,
                      adapter_ids: Tensor, slice_offsets: Optional[Sequence[int]] = None) -> Tensor:
    """A copy of y with ``y[i, off_s:off_s+N_s] += s_j * lora_b[s][j, :, :r_j] @ h[s, i, :r_j]``."""
    out = y.clone()
    n_total = y.shape[-1]
    out2 = out.view(-1, n_total) if y.dim() > 1 else out.view(1, n_total)
    offsets = _slice_offsets([b.shape[1] for b in lora_b], slice_offsets)
    for i, j in enumerate(int(v) for v in adapter_ids.cpu()):
        if j < 0:
            continue
        r, sc = int(ranks[j]), float(scales[j])
        for s, b in enumerate(lora_b):
            cols = slice(offsets[s], offsets[s] + b.shape[1])
            out2[i, cols] += sc * (b[j, :, :r] @ h[s, i, :r].to(b.dtype))
    return out


def multi_lora(y: Tensor, x: Tensor, lora_a: Sequence[Tensor], lora_b: Sequence[Tensor], ranks: Tensor,
               scales: Tensor, adapter_ids: Tensor, slice_offsets: Optional[Sequence[int]] = None) -> Tensor:
    """``y`` plus every token's adapter term (shrink then expand), out of place."""
    h = multi_lora_shrink(x, lora_a, ranks, adapter_ids)
    return multi_lora_expand(y, h, lora_b, ranks, scales, adapter_ids, slice_offsets)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Optional[Tensor],
                lora_b: Optional[Tensor], scale: float) -> Tensor:
    """One adapter on a linear layer: ``x @ W^T + bias + scale * x @ A^T @ B^T`` (for module tests)."""
    y = torch.nn.functional.linear(x, weight, bias)
    if lora_a is not None and lora_a.shape[0] > 0:
        y = y + scale * ((x @ lora_a.t()) @ lora_b.t())
    return y


def peft_scale(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)
