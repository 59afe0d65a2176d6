"""Modules built on lrk's ops."""
from .multi_lora import MultiLoRABatch, MultiLoRALinear, MultiLoRAManager, apply_multi_lora

__all__ = ["MultiLoRALinear", "MultiLoRABatch", "MultiLoRAManager", "apply_multi_lora"]
