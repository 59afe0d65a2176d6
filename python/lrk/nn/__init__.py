"""lrk's modules. (Sparse-update layers; other families add theirs here.)"""
from .sara import SaRALinear, apply_delta, apply_sara, attach_sara, merge_sara, sara_layers  # noqa: F401
from .snell import SNELLLinear, apply_snell, merge_snell  # noqa: F401
