"""Modules built on lrk's ops."""
from . import init
from .kron import KronLinear, apply_kron, load_peft_lokr, prune_kron
from .linear4bit import Linear4bit
from .lora import LoRALinear, apply_lora
from .multi_lora import MultiLoRABatch, MultiLoRALinear, MultiLoRAManager, apply_multi_lora
from .sara import SaRALinear, apply_delta, apply_sara, attach_sara, merge_sara, sara_layers
from .snell import SNELLLinear, apply_snell, merge_snell
from .snell_budget import SNELLImportance, allocate_snell_budget, snell_budget_schedule, snell_layers

__all__ = [
    "init",
    "LoRALinear", "apply_lora", "Linear4bit",
    "MultiLoRALinear", "MultiLoRABatch", "MultiLoRAManager", "apply_multi_lora",
    "KronLinear", "apply_kron", "prune_kron", "load_peft_lokr",
    "SaRALinear", "apply_sara", "attach_sara", "merge_sara", "apply_delta", "sara_layers",
    "SNELLLinear", "apply_snell", "merge_snell",
    "SNELLImportance", "allocate_snell_budget", "snell_budget_schedule", "snell_layers",
]
