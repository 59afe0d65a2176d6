import os
import random
import zlib

import pytest
import torch

import lrk
import lrk.emulated as emulated


def _base_seed() -> int:
    """The run's base seed: LRK_TEST_SEED (an integer, or "random" for a fresh one),
    0 by default, so that runs are reproducible; printed in the pytest header."""
    value = os.environ.get("LRK_TEST_SEED", "0").strip()
    if value.lower() == "random":
        return random.SystemRandom().randrange(2**31)
    try:
        return int(value, 0) % 2**31
    except ValueError:
        raise pytest.UsageError(f"LRK_TEST_SEED: expected an integer or 'random', got {value!r}") from None


BASE_SEED = _base_seed()


def pytest_report_header(config):
    return f"lrk: LRK_TEST_SEED={BASE_SEED} (set LRK_TEST_SEED to replay a run's inputs)"


def seed_of_test(nodeid: str) -> int:
    """The seed of one test: the base seed mixed with a stable hash of its id (crc32:
    Python's str hash differs between processes)."""
    return (BASE_SEED ^ zlib.crc32(nodeid.encode())) % 2**31


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    """Seeds torch's global generators per test, so that inputs drawn from them (and
    the generator seeds the helpers derive with torch.randint) are the same in every
    run with the same LRK_TEST_SEED, whatever the order or selection of tests."""
    torch.manual_seed(seed_of_test(request.node.nodeid))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        item.add_report_section("call", "seed", f"LRK_TEST_SEED={BASE_SEED}, test seed {seed_of_test(item.nodeid)}")


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
