"""lrk's counter-based dropout: Philox known answers, kernels vs the reference, autograd."""
import pytest
import torch

import lrk
from lrk import reference as ref
from conftest import DEVICES, DEVICES_NO_EMU


def _words(ctr, key):
    cols = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    return [int(w) for w in ref.philox4x32_10(*cols, *key)]


@pytest.mark.parametrize(
    "ctr,key,expected",
    [  # Random123's published known-answer vectors for Philox4x32-10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_reference_philox_known_answers(ctr, key, expected):
    assert _words(ctr, key) == list(expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1,), (7, 13), (3, 5, 33), (1025,), (0, 4)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_kernel_mask_matches_reference(device, dtype, shape, p):
    seed = int(torch.randint(0, 2**62, ()).item())
    x = torch.rand(shape, dtype=dtype, device=device) + 1.0  # in [1, 2]: a zero marks a drop
    out = lrk.philox_dropout(x, p, seed)
    keep = ref.dropout_keep_mask(shape, p, seed, device=device)
    assert torch.equal(out != 0, keep)
    expected = (x.double() / (1 - p))[keep]
    torch.testing.assert_close(out[keep].double(), expected, rtol=2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6, atol=0)


def test_drop_rate_and_seed_dependence():
    x = torch.ones(200_000)
    a = lrk.philox_dropout(x, 0.3, 1)
    b = lrk.philox_dropout(x, 0.3, 2)
    assert abs((a == 0).double().mean().item() - 0.3) < 0.01
    assert not torch.equal(a, b)
    assert torch.equal(a, lrk.philox_dropout(x, 0.3, 1))


def test_negative_and_large_seeds_match_reference():
    x = torch.rand(101) + 1
    for seed in (-1, -(2**63), 2**63 - 1, 2**32 + 5):
        assert torch.equal(lrk.philox_dropout(x, 0.4, seed) != 0, ref.dropout_keep_mask((101,), 0.4, seed))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_dropout_gradient_and_opcheck(device):
    x = torch.randn(6, 9, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: lrk.philox_dropout(t, 0.25, 7), (x,))
    torch.library.opcheck(torch.ops.lrk.philox_dropout.default, (x, 0.25, 7))


@pytest.mark.parametrize("bad_p", [-0.1, 1.0, float("nan")])
def test_bad_probability(bad_p):
    with pytest.raises(RuntimeError, match="p: expected a probability"):
        lrk.philox_dropout(torch.randn(4), bad_p, 0)


def test_bad_dtype():
    with pytest.raises(RuntimeError, match="x: expected dtype"):
        lrk.philox_dropout(torch.ones(4, dtype=torch.int32), 0.1, 0)
