"""lrk: native kernels for low-rank and sparse fine-tuning on PyTorch.

Every op is a PyTorch custom op, ``torch.ops.lrk.<name>``; importing lrk loads the
native library and registers the ops' fake kernels and autograd formulas.
"""
from . import _loader

_loader.load()

from . import ops, reference  # noqa: E402  (registers fakes and autograd)
from . import nn  # noqa: E402
from ._loader import has_cuda_kernels  # noqa: E402
from .ops import dora_fused, dora_weight_norm, lora_fused, philox_dropout  # noqa: E402

__version__ = "0.1.0"
__all__ = ["lora_fused", "dora_fused", "dora_weight_norm", "philox_dropout", "ops", "reference", "nn", "has_cuda_kernels", "__version__"]
