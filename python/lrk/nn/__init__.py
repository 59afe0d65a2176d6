"""Modules built on lrk's ops."""
from .lora import LoRALinear, apply_lora

__all__ = ["LoRALinear", "apply_lora"]
