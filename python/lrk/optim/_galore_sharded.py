"""Row-sharded (FSDP2 / DTensor ``Shard(0)``) pieces of GaLoreAdamW.

A row-sharded gradient ``G = [G_0; G_1; ...]`` never needs gathering for a step:
a left projection is a sum over shards, ``P^T G = sum_s P_s^T G_s`` (one
all-reduce of ``r x n``), and a right projection ``G_s Q`` is local. Projector
refreshes (every ``update_proj_gap`` steps) run the same algorithms as the
single-process ops on sharded data:

- ``rsvd``: the range finder's products are local or sums over shards; the
  tall-skinny ``[m, r + p]`` factors are all-gathered (never ``G``), so the
  algorithm and its result are the single-process ones up to summation order;
- ``dct`` with a right projection: column scores are sums over shards;
- ``random``: no communication (the projector is a function of the seed);
- ``svd``, and ``dct`` with a left projection (the DCT runs along the sharded
  dimension): ``G`` is all-gathered at refresh time only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import galore_ops as go


@dataclass
class RowShard:
    """This rank's rows ``[offset, offset + rows)`` of an ``[m, n]`` parameter."""
    group: object
    offset: int
    rows: int
    global_rows: int
    world: int
    chunk: int


def row_shard(p: Tensor) -> Optional[RowShard]:
    """The row shard of a DTensor parameter, None for plain or replicated tensors."""
    try:
        from torch.distributed.tensor import DTensor, Replicate, Shard
    except ImportError:  # torch without DTensor
        return None
    if not isinstance(p, DTensor):
        return None
    placements = tuple(p.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return None
    if p.device_mesh.ndim != 1 or len(placements) != 1 or not (
            isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise NotImplementedError(
            f"GaLoreAdamW: a DTensor parameter must be row-sharded (Shard(0)) on a 1-D mesh or replicated, "
            f"got placements {placements} on a {p.device_mesh.ndim}-D mesh")
    mesh = p.device_mesh
    world, me = mesh.size(), mesh.get_local_rank()
    m = p.shape[0]
    chunk = math.ceil(m / world)  # torch.chunk's rule, which Shard(0) follows
    offset = min(me * chunk, m)
    rows = max(0, min(chunk, m - offset))
    local_rows = p.to_local().shape[0]
    if local_rows != rows:
        raise NotImplementedError(
            f"GaLoreAdamW: unexpected row sharding, rank {me} holds {local_rows} rows of {m}, expected {rows}")
    return RowShard(mesh.get_group(), offset, rows, m, world, chunk)


def all_reduce(t: Tensor, shard: RowShard) -> Tensor:
    dist.all_reduce(t, group=shard.group)
    return t


def gather_rows(local: Tensor, shard: RowShard) -> Tensor:
    """Concatenate every rank's rows (padded to equal chunks for the collective)."""
    padded = local.new_zeros((shard.chunk,) + tuple(local.shape[1:]))
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(shard.world)]
    dist.all_gather(parts, padded.contiguous(), group=shard.group)
    return torch.cat(parts, 0)[:shard.global_rows]


def local_rows(full: Tensor, shard: Optional[RowShard]) -> Tensor:
    return full if shard is None else full[shard.offset:shard.offset + shard.rows]


def _orth(y: Tensor) -> Tensor:
    return torch.linalg.qr(y)[0]


def _canonical_signs(p: Tensor) -> Tensor:
    # Same rule as the ops (csrc/galore/galore_projectors.cpp).
    lead = p.gather(0, p.abs().argmax(0, keepdim=True))
    return p * torch.where(lead < 0, -1.0, 1.0).to(p.dtype)


def rsvd_projector(g_local: Tensor, shard: RowShard, rank: int, left: bool, oversample: int, power_iters: int,
                   seed: int) -> Tensor:
    """The full (replicated) projector of lrk.galore_ops.rsvd_projector for a row-sharded G."""
    acc = torch.float64 if g_local.dtype == torch.float64 else torch.float32
    g = g_local.to(acc)
    m, n = shard.global_rows, g.shape[1]
    k = min(rank + oversample, min(m, n))
    if left:  # A = G (rows sharded): Y = A Omega is row-sharded, A^T Y a sum over shards.
        omega = go.philox_normal_(torch.empty(n, k, dtype=acc, device=g.device), seed)
        y = gather_rows(g @ omega, shard)
        for _ in range(power_iters):
            y = _orth(y)
            z = _orth(all_reduce(g.t() @ local_rows(y, shard), shard))
            y = gather_rows(g @ z, shard)
        q = _orth(y)
        b = all_reduce(local_rows(q, shard).t() @ g, shard)  # Q^T A, [k, n]
    else:  # A = G^T (columns sharded): A Omega is a sum over shards, A^T Y row-sharded.
        omega = go.philox_normal_(torch.empty(m, k, dtype=acc, device=g.device), seed)
        y = all_reduce(g.t() @ local_rows(omega, shard), shard)
        for _ in range(power_iters):
            y = _orth(y)
            z = _orth(gather_rows(g @ y, shard))
            y = all_reduce(g.t() @ local_rows(z, shard), shard)
        q = _orth(y)
        b = gather_rows(g @ q, shard).t()  # Q^T A = (G Q)^T, [k, m]
    ub = torch.linalg.svd(b, full_matrices=False)[0]
    return _canonical_signs(q @ ub[:, :rank])


def dct_right_select(g_local: Tensor, shard: RowShard, rank: int) -> Tensor:
    """DCT selection for a right projection: column scores are sums over row shards."""
    scores = go.dct_scores(g_local, False) if shard.rows > 0 else torch.zeros(
        g_local.shape[1], dtype=torch.float64 if g_local.dtype == torch.float64 else torch.float32,
        device=g_local.device)
    all_reduce(scores, shard)
    return torch.sort(scores, stable=True, descending=True)[1][:rank].contiguous()


def moments_update(r: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, eps: float) -> Tensor:
    """The step's moment update, for shards that hold no rows (their replicated
    low-rank states still advance with everyone else's); returns N."""
    exp_avg.mul_(beta1).add_(r, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
    return exp_avg / (exp_avg_sq.sqrt() + eps)


def fira_sharded_step(w: Tensor, g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, p_rows: Tensor, left: bool,
                      r: Tensor, shard: RowShard, fira_norm: Tensor, step_size: float, lr: float, beta1: float,
                      beta2: float, eps: float, weight_decay: float, scale: float) -> None:
    """Fira on a row shard, composed from ATen ops: the per-channel scales are
    local (right) or replicated (left); the limiter uses the global residual norm."""
    n_mat = moments_update(r, exp_avg, exp_avg_sq, beta1, beta2, eps)
    acc = exp_avg.dtype
    has_rows = w.shape[0] > 0
    if has_rows:
        gf = g.to(acc)
        dim = 0 if left else 1
        phi = n_mat.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)
        resid = (gf - (p_rows @ r if left else r @ p_rows.t())) * phi
        sq = resid.square().sum().reshape(1)
    else:
        resid = None
        sq = torch.zeros(1, dtype=acc, device=exp_avg.device)
    snorm = all_reduce(sq, shard).sqrt()
    prev = fira_norm.reshape(1)
    limiter = torch.where(prev >= 0, torch.clamp_min(snorm / (prev + 1e-8), 1.01) / 1.01, torch.ones_like(snorm))
    fira_norm.copy_((snorm / limiter).reshape(fira_norm.shape))
    if not has_rows:
        return
    update = resid / limiter + scale * (p_rows @ n_mat if left else n_mat @ p_rows.t())
    t = w.to(acc) - step_size * update
    w.copy_((t - (lr * weight_decay) * t).to(w.dtype))
