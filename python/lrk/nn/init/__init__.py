"""Spectral adapter initialisation, in place, for lrk ``LoRALinear`` and PEFT LoRA
layers, with PEFT's conventions for A, B, scaling and the residual base weight:

- :func:`pissa_`: principal singular triplets of W; the base keeps the residual.
- :func:`lora_ga_`: A, B from the top 2r singular vectors of the full gradient.
- :func:`lora_one_`: A, B from one best rank-r full-gradient step.
- :func:`eva_`: A from the principal directions of each layer's inputs, ranks
  redistributed by explained variance.

SVDs are lrk's randomized ones by default (exact as an option); gradients and
activations are streamed into per-layer sketches (see each module's docstring).
"""
from .eva import eva_
from .gradient import gradient_svds, lora_ga_, lora_one_
from .pissa import pissa_

__all__ = ["pissa_", "lora_ga_", "lora_one_", "eva_", "gradient_svds"]
