"""lrk: native kernels for low-rank and sparse fine-tuning on PyTorch.

Every op is a PyTorch custom op, ``torch.ops.lrk.<name>``; importing lrk loads the
native library and registers the ops' fake kernels and autograd formulas.
"""
from . import _loader
from ._version import __version__ as _base_version

_loader.load()

from . import ops, reference  # noqa: E402  (registers fakes and autograd)
from . import galore_ops, kron_ops, kron_select, multi_lora_ops, quant_ops, quantize, sparse_ops, spectral_ops  # noqa: E402
from . import reference_galore, reference_kron, reference_multi_lora, reference_quant, reference_sparse  # noqa: E402
from . import reference_spectral  # noqa: E402
from . import nn, optim  # noqa: E402
from ._loader import build_info, has_cuda_kernels  # noqa: E402
from .multi_lora_ops import (  # noqa: E402
    add_multi_lora_,
    multi_lora_expand_,
    multi_lora_expand_segments_,
    multi_lora_shrink,
    multi_lora_shrink_segments,
)
from .ops import dora_fused, dora_weight_norm, lora_fused, philox_dropout  # noqa: E402
from .kron_ops import KronFactors, kpsvd, kron_dense, kron_linear  # noqa: E402
from .quant_ops import Weight4bit, qdora_fused, qlora_fused  # noqa: E402
from .quantize import quantize_4bit  # noqa: E402
from .optim import GaLoreAdamW  # noqa: E402
from .sparse_ops import (  # noqa: E402
    abs_kth_value,
    abs_topk_mask,
    block_scores,
    sddmm_block,
    sddmm_csr,
    snell_delta,
    snell_linear,
    snella_delta,
    snella_linear,
    sparse_grad_linear_block,
    sparse_grad_linear_csr,
)

__version__ = _loader.build_config().get("version") or _base_version
__all__ = [
    "lora_fused", "dora_fused", "dora_weight_norm", "philox_dropout", "qlora_fused", "qdora_fused", "Weight4bit", "quantize_4bit",
    "multi_lora_shrink", "multi_lora_shrink_segments", "multi_lora_expand_", "multi_lora_expand_segments_",
    "add_multi_lora_", "GaLoreAdamW", "kron_linear", "kron_dense", "kpsvd", "KronFactors",
    "sddmm_block", "sddmm_csr", "abs_kth_value", "abs_topk_mask", "block_scores", "sparse_grad_linear_block",
    "sparse_grad_linear_csr", "snell_linear", "snell_delta", "snella_linear", "snella_delta",
    "ops", "multi_lora_ops", "galore_ops", "spectral_ops", "reference_spectral", "kron_ops", "kron_select", "sparse_ops", "reference", "reference_multi_lora",
    "reference_galore", "reference_kron", "reference_sparse", "nn", "optim", "has_cuda_kernels", "build_info",
    "__version__",
]
