"""Modules built on lrk's ops."""
from .kron import KronLinear, apply_kron, prune_kron

__all__ = ["KronLinear", "apply_kron", "prune_kron"]
