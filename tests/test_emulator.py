"""The emulator of the CUDA execution model (csrc/emu) itself: kernels with a
planted bug must fail under every thread order, their correct versions pass;
the emulated kernels really run (launch counters)."""
import pytest
import torch

import lrk.emulated as emulated
from conftest import EMU_SANITIZED, EMU_SKIP

pytestmark = [EMU_SKIP, pytest.mark.emu]

N = 64


@pytest.fixture(autouse=True)
def _library():
    emulated.load(EMU_SANITIZED)


def _x():
    return torch.randn(N, generator=torch.Generator().manual_seed(7))


def _expected(name, x):
    if name == "missing_syncthreads":
        return x.flip(0)
    if name == "shared_overflow":
        return 2 * x
    if name == "wrong_shuffle_lane":
        return x.view(2, 32).sum(1)
    if name == "unwritten_shared":
        return x + x.roll(-1)
    if name == "async_copy_without_wait":
        return x
    raise AssertionError(name)


CASES = ["missing_syncthreads", "wrong_shuffle_lane", "unwritten_shared", "async_copy_without_wait",
         "shared_overflow"]


@pytest.mark.parametrize("order", emulated.ORDERS)
@pytest.mark.parametrize("name", CASES)
def test_correct_kernel_passes(name, order):
    emulated.set_schedule(order, seed=11)
    x = _x()
    y = torch.ops.lrk_emu.emu_selftest(name, x, False)
    torch.testing.assert_close(y, _expected(name, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("order", emulated.ORDERS)
@pytest.mark.parametrize("name", [c for c in CASES if c != "shared_overflow"])
def test_planted_bug_is_caught(name, order):
    """A wrong answer (poison NaN read from unwritten shared memory, or a wrong sum)."""
    emulated.set_schedule(order, seed=11)
    x = _x()
    y = torch.ops.lrk_emu.emu_selftest(name, x, True)
    expected = _expected(name, x)
    assert not torch.allclose(y, expected, rtol=1e-4, atol=1e-4, equal_nan=False), (name, order)


@pytest.mark.skipif(EMU_SANITIZED, reason="under AddressSanitizer the overflow aborts the process "
                                         "(tests/test_emulator_sanitized.py checks that)")
@pytest.mark.parametrize("order", emulated.ORDERS)
def test_shared_overflow_is_reported(order):
    """A write past a shared array trips the guard bytes at the end of the block."""
    emulated.set_schedule(order, seed=11)
    with pytest.raises(RuntimeError, match="wrote outside static shared variable"):
        torch.ops.lrk_emu.emu_selftest("shared_overflow", _x(), True)


def test_orders_differ_and_launches_are_counted():
    before = emulated.counters()
    emulated.set_schedule("forward", 0)
    torch.ops.lrk_emu.emu_selftest("missing_syncthreads", _x(), False)
    after = emulated.counters()
    assert after["launches"] == before["launches"] + 1
    assert after["blocks"] == before["blocks"] + 1
    assert after["switches"] >= before["switches"] + N - 1  # all but the last to arrive wait at the barrier


def test_bad_schedule_is_named():
    with pytest.raises(ValueError, match="order"):
        emulated.set_schedule("sideways")
    with pytest.raises(ValueError, match="forward, reverse or shuffled"):
        torch.ops.lrk_emu.emu_set_schedule("sideways", 0)
