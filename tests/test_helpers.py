"""The test helpers' own checks: assert_close's tolerance, plain and relative to
the terms' magnitude (cancelling sums)."""
import pytest
import torch

from helpers import assert_close


def test_assert_close_relative_to_the_reference():
    ref = torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert_close(ref * (1 + 1e-6), ref, torch.float32)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(ref * (1 + 1e-4), ref, torch.float32)
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([float("nan"), -2.0]), ref, torch.float32, magnitude=ref.abs())


def test_assert_close_relative_to_the_magnitude_of_cancelling_terms():
    # A sum of terms of about 0.1 that cancels to 4e-5 (the (1, 1) GaLore exp_avg):
    # an error of 1e-9 is 2.5e-5 of the value but 1e-8 of the terms.
    ref = torch.tensor([4e-5], dtype=torch.float64)
    out = ref + 1e-9
    with pytest.raises(AssertionError, match="relative error"):
        assert_close(out, ref, torch.float32)
    assert_close(out, ref, torch.float32, magnitude=torch.tensor([0.1], dtype=torch.float64))
    with pytest.raises(AssertionError, match="magnitude"):
        assert_close(ref + 1e-4, ref, torch.float32, magnitude=torch.tensor([0.1], dtype=torch.float64))


def test_assert_close_magnitude_with_an_all_zero_reference():
    """An all-zero reference: the error is absolute, and the magnitude form must not
    turn a wrong output into a pass (it did by scaling with ||ref|| = 0)."""
    ref = torch.zeros(3, dtype=torch.float64)
    assert_close(torch.zeros(3), ref, torch.float32, magnitude=torch.ones(3))
    with pytest.raises(AssertionError, match="magnitude"):
        assert_close(torch.full((3,), 0.5), ref, torch.float32, magnitude=torch.ones(3))
