"""Modules built on lrk's ops."""
from .kron import KronLinear, apply_kron, prune_kron
from .lora import LoRALinear, apply_lora
from .multi_lora import MultiLoRABatch, MultiLoRALinear, MultiLoRAManager, apply_multi_lora

__all__ = [
    "LoRALinear", "apply_lora",
    "MultiLoRALinear", "MultiLoRABatch", "MultiLoRAManager", "apply_multi_lora",
    "KronLinear", "apply_kron", "prune_kron",
]
