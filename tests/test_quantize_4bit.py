"""lrk.quantize_4bit: bit-identical to bitsandbytes.functional.quantize_4bit on many
seeded weights (ties, zeros, blocks spanning rows, partial last blocks), and a
round trip through the fused op's dequantization."""
import pytest
import torch

import lrk
from lrk import quantize as lq

bnb_f = pytest.importorskip("bitsandbytes.functional")


def seeded_weights():
    """(seed, weight): odd shapes whose blocks span rows, all-zero blocks and rows,
    values on a coarse grid (ties at the maximum and at code midpoints), bf16 input."""
    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        rows = int(torch.randint(1, 40, (1,), generator=g))
        cols = int(torch.randint(1, 300, (1,), generator=g))
        w = torch.randn(rows, cols, generator=g) * float(torch.rand(1, generator=g) * 3 + 1e-3)
        if seed % 4 == 0:
            w.view(-1)[: min(w.numel(), 200)] = 0.0          # whole zero blocks
        if seed % 3 == 0:
            w = torch.round(w * 4) / 4                         # ties: equal maxima, exact midpoints
        if seed % 5 == 0:
            w = w.bfloat16()
        yield seed, w


BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def _reference_8bit_codes(centred_absmax, code2):
    """bitsandbytes' reference (PyTorch) blockwise 8-bit kernel, called directly."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    q, absmax2 = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, centred_absmax, code2, 256)
    return q, absmax2


def test_code_tables_match_bitsandbytes():
    for qt in ("nf4", "fp4"):
        assert torch.equal(lq.code_4bit(qt), bnb_f.get_4bit_type(qt, "cpu"))
    assert torch.equal(lq.dynamic_code_8bit(), bnb_f.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bit_identical_to_bitsandbytes(quant_type):
    checked_8bit = mismatched_8bit = 0
    for seed, w in seeded_weights():
        bs = BLOCKSIZES[seed % len(BLOCKSIZES)]
        packed, state = bnb_f.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=False)
        ours = lq.quantize_4bit(w, quant_type, bs)
        assert torch.equal(ours.packed, packed) and ours.packed.shape == packed.shape, f"seed {seed}: packed"
        assert torch.equal(ours.absmax, state.absmax), f"seed {seed}: absmax"
        assert torch.equal(ours.code, state.code)

        packed2, state2 = bnb_f.quantize_4bit(w, blocksize=bs, quant_type=quant_type, compress_statistics=True)
        dq = lq.quantize_4bit(w, quant_type, bs, double_quant=True)
        assert torch.equal(dq.packed, packed2)
        assert float(state2.offset) == dq.offset, f"seed {seed}: offset"
        assert torch.equal(dq.absmax2, state2.state2.absmax), f"seed {seed}: absmax2"
        assert torch.equal(dq.code2, state2.state2.code) and dq.blocksize2 == state2.state2.blocksize
        # The 8-bit codes: exactly those of bitsandbytes' reference kernel; its native
        # CPU search may pick the neighbouring code, never further.
        # A block whose centred absmax are all 0 (one block of 4-bit absmax, say) has
        # absmax2 = 0: any code dequantizes to offset there, and the two kernels differ
        # (the code of 0 here and in the reference kernel, code 0 in the native one).
        live = dq.absmax2.repeat_interleave(256)[: dq.absmax.numel()] != 0
        q_ref, _ = _reference_8bit_codes(state.absmax - state2.offset, dq.code2)
        assert torch.equal(dq.absmax, q_ref), f"seed {seed}: absmax_q vs the reference kernel"
        diff = (dq.absmax.long() - state2.absmax.long()).abs()[live]
        assert diff.numel() == 0 or diff.max() <= 1, f"seed {seed}: absmax_q off by {diff.max()}"
        checked_8bit += diff.numel()
        mismatched_8bit += int((diff > 0).sum())
    assert mismatched_8bit <= max(2, checked_8bit // 100)


def test_many_blocks_of_absmax_match_the_reference_kernel():
    """More than one 256-block of absmax (double quantization's second level)."""
    w = torch.randn(300, 130)
    dq = lq.quantize_4bit(w, "nf4", 64, double_quant=True)
    _, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert dq.absmax2.numel() == state.state2.absmax.numel() > 2
    assert torch.equal(dq.absmax2, state.state2.absmax)
    _, plain = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    q_ref, _ = _reference_8bit_codes(plain.absmax - state.offset, dq.code2)
    assert torch.equal(dq.absmax, q_ref)


def test_round_trip_and_fused_op():
    """Dequantizing lrk's weight gives bitsandbytes' dequantized weight; the fused op
    on it equals the product with that weight."""
    w = torch.randn(33, 70)
    ours = lq.quantize_4bit(w, "nf4", 64)
    packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
    deq = bnb_f.dequantize_4bit(packed, state)
    torch.testing.assert_close(ours.dequantize(), deq, rtol=0, atol=0)
    assert (ours.dequantize() - w).abs().max() <= w.abs().max() * 0.2  # a 4-bit code, not garbage
    x = torch.randn(5, 70, dtype=torch.float64)
    y = lrk.quant_ops.linear_4bit(x.float(), *ours.op_args())
    torch.testing.assert_close(y.double(), x.float().double() @ deq.double().t(), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="blocksize"):
        lq.quantize_4bit(torch.randn(4, 64), "nf4", 48)
    with pytest.raises(ValueError, match="quant_type"):
        lq.quantize_4bit(torch.randn(4, 64), "int4")
    with pytest.raises(ValueError, match="2-D"):
        lq.quantize_4bit(torch.randn(64), "nf4")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        lq.quantize_4bit(torch.randn(4, 64, dtype=torch.float64), "nf4")
