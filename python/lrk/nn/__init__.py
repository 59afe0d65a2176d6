"""Modules built on lrk's ops."""
from .kron import KronLinear

__all__ = ["KronLinear"]
