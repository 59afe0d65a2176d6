import pytest
import torch

import lrk


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and lrk.has_cuda_kernels()


CUDA_SKIP = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and lrk built with CUDA")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[CUDA_SKIP, pytest.mark.cuda])]


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Plain fp32 matmuls in references and kernels (no TF32), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
