"""lrk's optimizers."""
from .galore import GaLoreAdamW

__all__ = ["GaLoreAdamW"]
