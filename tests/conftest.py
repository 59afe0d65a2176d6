import os

import pytest
import torch

import lrk
import lrk.emulated as emulated


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and lrk.has_cuda_kernels()


CUDA_SKIP = pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and lrk built with CUDA")
# The third device runs the CUDA kernels on the CPU emulator (lrk.emulated): the
# test sees CPU tensors ("cpu"), and every lrk op with a CUDA kernel runs that
# kernel emulated. LRK_EMU_ORDER (forward, reverse, shuffled) and LRK_EMU_SEED
# pick the thread order; LRK_EMU_SANITIZED=1 uses the ASan/UBSan build.
EMU_SANITIZED = os.environ.get("LRK_EMU_SANITIZED") == "1"
EMU_SKIP = pytest.mark.skipif(not emulated.available(EMU_SANITIZED),
                              reason="the emulated CUDA kernels are not built (scripts/build_emulated.sh)")
EMU = pytest.param("cpu", id="emu", marks=[EMU_SKIP, pytest.mark.emu])
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[CUDA_SKIP, pytest.mark.cuda]), EMU]
# For tests of registration rather than kernels (opcheck, torch.compile), which
# the emulated path adds nothing to.
DEVICES_NO_EMU = DEVICES[:2]


@pytest.fixture(autouse=True)
def _emulated_cuda(request):
    """Tests of the emu device run inside lrk.emulated.EmulatedCUDA."""
    if request.node.get_closest_marker("emu") is None:
        yield
        return
    emulated.load(EMU_SANITIZED)
    emulated.set_schedule(os.environ.get("LRK_EMU_ORDER", "shuffled"), int(os.environ.get("LRK_EMU_SEED", "0")))
    with emulated.EmulatedCUDA():
        yield


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Plain fp32 matmuls in references and kernels (no TF32), restored afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
