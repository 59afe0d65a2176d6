"""Loads lrk's native library, which registers every torch.ops.lrk kernel."""
from __future__ import annotations

import glob
import os

import torch

_LOADED: str | None = None


def library_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not candidates:
        raise ImportError(
            f"lrk's native library (_C*.so) is missing from {here}: build it with "
            "'pip install --no-build-isolation .' (or -e . for a development install)")
    return candidates[0]


def load() -> str:
    global _LOADED
    if _LOADED is None:
        path = library_path()
        torch.ops.load_library(path)
        _LOADED = path
    return _LOADED


def has_cuda_kernels() -> bool:
    """True when the library was built with CUDA kernels."""
    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key("lrk::lora_fused_fwd", "CUDA")
