"""The CUDA kernels of the 4-bit weight ops (csrc/quant/quant4_*.cu) on every device:
both products on both kernel paths (small-M weight streaming for M <= 16, tiled
WMMA / SIMT above), all dtypes, NF4 and FP4, bitsandbytes' block sizes, shapes
whose tails cross every tile and whose absmax blocks span row ends; checked
element by element against float64 products with the weight that bitsandbytes'
own dequantize_4bit gives (itself checked equal to reference_quant's)."""
import copy
import math

import pytest
import torch

import lrk.emulated as emulated
import lrk.quant_ops as qo
import lrk.reference_quant as rq
from conftest import CUDA_SKIP, DEVICES, EMU_SKIP
from helpers import assert_close

bnbf = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Per-element error bound relative to (|act| @ |W|) (see _check_product): the input
# rounding of W for the tensor-core path plus the output rounding for half types;
# accumulation over the reduction length for float32 / float64.
UNIT = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-9}


def _bnb_dequantize(packed, state):
    """bitsandbytes' dequantize_4bit of the flattened weight (the layout is over the
    flattened tensor anyway): bitsandbytes 0.50.2's native CPU kernel, given the 2-D
    shape, takes wrong absmax blocks for some shapes (300 x 96 at blocksize 64: from
    element 128 on), while its 1-D call agrees with reference_quant everywhere."""
    flat = copy.copy(state)
    flat.shape = torch.Size([math.prod(state.shape)])
    return bnbf.dequantize_4bit(packed, flat).float()


def _quantized(rows, cols, blocksize, quant_type, seed, compress=False):
    """A bitsandbytes-quantized random weight: (packed, absmax, code, W float64 from bnb)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * (1 + torch.rand(rows, 1, generator=g) * 3)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress)
    w_bnb = _bnb_dequantize(packed, state).reshape(rows, cols)
    absmax = state.absmax.float()
    if compress:
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    # bitsandbytes' own dequantization and lrk's reference agree bit for bit.
    w_ref = rq.dequantize_4bit(packed, absmax, state.code, blocksize, rows, cols)
    assert torch.equal(w_ref, w_bnb)
    return packed, absmax.contiguous(), state.code.float().contiguous(), w_bnb.double()


def _check_product(out, act, w64, transposed, dtype, what):
    """out == act @ W^T (or act @ W) element by element, within UNIT[dtype] * (reduction
    + 2) of |act| @ |W| for float32/64 and UNIT[dtype] of it for half types."""
    a64 = act.detach().double().cpu().reshape(-1, act.shape[-1])
    wt = w64 if transposed else w64.t()
    ref = a64 @ wt
    mag = a64.abs() @ wt.abs()
    got = out.detach().double().cpu().reshape(ref.shape)
    assert out.dtype == dtype and out.shape[:-1] == act.shape[:-1]
    reduction = act.shape[-1]
    unit = UNIT[dtype] * ((reduction + 2) if dtype in (torch.float32, torch.float64) else 1)
    bad = (got - ref).abs() > unit * mag + 1e-300
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off, first at "
                           f"{bad.nonzero()[0].tolist()}: {got[bad][0].item()} vs {ref[bad][0].item()}")
    if ref.numel():
        assert_close(got, ref, dtype, what)


def _run(op, act, packed, absmax, code, blocksize, rows, cols):
    fn = qo.linear_4bit if op == "forward" else qo.linear_4bit_grad_input
    return fn(act, packed, absmax, code, blocksize, rows, cols)


# (rows = out_features, cols = in_features, blocksize, quant type): tails in every
# tile dimension (64 x 64 output tiles, 32 / 16-element chunks), odd cols (rows start
# mid-byte), blocks spanning row ends, cols a multiple of 8 (the word-per-8-codes
# path of the small-M kernels) and not.
WEIGHTS = [
    (70, 300, 64, "nf4"),
    (33, 136, 32, "fp4"),
    (65, 129, 128, "nf4"),
    (9, 1024, 4096, "fp4"),
    (5, 1000, 4096, "nf4"),
    (1, 1, 32, "nf4"),
]
# M <= 16: the small-M kernels; 17 and 130 (two 64-row tiles and a tail): the tiled ones.
LEADS = [(1,), (3,), (2, 8), (17,), (2, 65)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["forward", "grad_input"])
@pytest.mark.parametrize("lead", LEADS, ids=str)
def test_products_match_float64_reference(device, dtype, op, lead):
    for wi, (rows, cols, blocksize, quant_type) in enumerate(WEIGHTS):
        packed, absmax, code, w64 = _quantized(rows, cols, blocksize, quant_type, seed=wi)
        red = cols if op == "forward" else rows
        act = torch.randn(*lead, red, dtype=torch.float64).to(dtype)
        if act.numel() >= 3 * red:
            act.view(-1, red)[1] = 0  # a zero row must give exact zeros (_check_product's bound is 0 there)
        out = _run(op, act.to(device), packed.to(device), absmax.to(device), code.to(device), blocksize, rows, cols)
        _check_product(out, act, w64, op == "grad_input", dtype, f"{op} {rows}x{cols} bs{blocksize} {quant_type}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["forward", "grad_input"])
def test_empty_input(device, op):
    packed, absmax, code, _ = _quantized(10, 40, 32, "nf4", seed=1)
    red = 40 if op == "forward" else 10
    act = torch.randn(0, 3, red).to(device)
    out = _run(op, act, packed.to(device), absmax.to(device), code.to(device), 32, 10, 40)
    assert out.shape == (0, 3, 50 - red)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [5, 70])
def test_non_contiguous_input(device, dtype, m):
    """A transposed or strided activation gives the same result as its contiguous copy."""
    rows, cols = 40, 72
    packed, absmax, code, w64 = _quantized(rows, cols, 64, "nf4", seed=3)
    args = (packed.to(device), absmax.to(device), code.to(device), 64, rows, cols)
    x = torch.randn(cols, m, dtype=dtype).t()                 # [m, cols], strides (1, m)
    gy = torch.randn(m, 2 * rows, dtype=dtype)[:, ::2]         # [m, rows], stride 2
    assert not x.is_contiguous() and not gy.is_contiguous()
    y = qo.linear_4bit(x.to(device), *args)
    gx = qo.linear_4bit_grad_input(gy.to(device), *args)
    assert torch.equal(y.cpu(), qo.linear_4bit(x.contiguous().to(device), *args).cpu())
    assert torch.equal(gx.cpu(), qo.linear_4bit_grad_input(gy.contiguous().to(device), *args).cpu())
    _check_product(y, x, w64, False, dtype, "forward")
    _check_product(gx, gy, w64, True, dtype, "grad_input")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 16, 40])
def test_grad_input_is_deterministic(device, m):
    """grad_input's small-M kernel sums its row slices in a fixed order: same bits every run."""
    packed, absmax, code, _ = _quantized(300, 96, 64, "nf4", seed=4)
    gy = torch.randn(m, 300).to(device)
    args = (packed.to(device), absmax.to(device), code.to(device), 64, 300, 96)
    first = qo.linear_4bit_grad_input(gy, *args)
    assert torch.equal(first, qo.linear_4bit_grad_input(gy, *args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("blocks,blocksize2", [(1, 256), (300, 256), (517, 128)])
def test_dequantize_absmax_matches_bitsandbytes(device, blocks, blocksize2):
    """Double quantization: bitsandbytes' nested absmax, dequantized by lrk, equals
    bitsandbytes' own (dequantize_blockwise + offset) and the reference bit for bit."""
    g = torch.Generator().manual_seed(blocks)
    absmax = torch.rand(blocks, generator=g) * 5 + 0.01
    q, state2 = bnbf.quantize_blockwise(absmax - absmax.mean(), blocksize=blocksize2)
    offset = absmax.mean().item()
    expected = bnbf.dequantize_blockwise(q, state2) + offset
    got = qo.dequantize_absmax(q.to(device), state2.absmax.to(device), state2.code.to(device), blocksize2, offset)
    ref = rq.dequantize_absmax(q, state2.absmax, state2.code, blocksize2, offset)
    assert got.dtype == torch.float32 and got.shape == (blocks,)
    assert torch.equal(got.cpu(), ref)
    assert torch.equal(got.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_double_quantized_weight_end_to_end(device):
    """A compress_statistics weight: absmax dequantized by lrk, then both products."""
    rows, cols = 48, 200
    g = torch.Generator().manual_seed(7)
    w = torch.randn(rows, cols, generator=g)
    packed, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    absmax = qo.dequantize_absmax(st.absmax.to(device), st.state2.absmax.to(device), st.state2.code.to(device),
                                  st.state2.blocksize, st.offset)
    w64 = _bnb_dequantize(packed, st).double().reshape(rows, cols)
    args = (packed.to(device), absmax, st.code.to(device), 64, rows, cols)
    for m in (2, 33):
        x = torch.randn(m, cols)
        _check_product(qo.linear_4bit(x.to(device), *args), x, w64, False, torch.float32, "forward")
        gy = torch.randn(m, rows)
        _check_product(qo.linear_4bit_grad_input(gy.to(device), *args), gy, w64, True, torch.float32, "grad_input")


# ---- emulator-only: which kernel ran, and the barriers of the tiled kernels ------------------

EMU_ONLY = [pytest.param("cpu", id="emu", marks=[EMU_SKIP, pytest.mark.emu])]


def _expected_blocks(op, m, rows, cols):
    """Blocks of the one launch the kernels make (quant4_small_m.cu, quant4_tiled.cu): a
    block per 8 W rows (forward) or per 1024 columns x row slices (grad_input) for
    M <= 16; a block per 64 x 64 output tile otherwise. None: a count not fixed here."""
    if m <= 16:
        return math.ceil(rows / 8) if op == "forward" else None
    return math.ceil(m / 64) * math.ceil((rows if op == "forward" else cols) / 64)


@pytest.mark.parametrize("device", EMU_ONLY)
@pytest.mark.parametrize("op", ["forward", "grad_input"])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 130])
def test_kernel_path_follows_m(device, op, m):
    rows, cols = 70, 136
    packed, absmax, code, w64 = _quantized(rows, cols, 64, "fp4", seed=5)
    act = torch.randn(m, cols if op == "forward" else rows, dtype=torch.bfloat16)
    before = emulated.counters()
    out = _run(op, act, packed, absmax, code, 64, rows, cols)
    after = emulated.counters()
    assert after["launches"] - before["launches"] == 1
    blocks = _expected_blocks(op, m, rows, cols)
    if blocks is not None:
        assert after["blocks"] - before["blocks"] == blocks
    _check_product(out, act, w64, op == "grad_input", torch.bfloat16, op)


@pytest.mark.parametrize("device", EMU_ONLY)
@pytest.mark.parametrize("order", ["forward", "reverse", "shuffled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_tiled_kernels_under_every_thread_order(device, order, dtype):
    """The tiled kernels read the W tile that other warps dequantized into shared memory:
    without the barrier between that step and the multiply, some order reads poison (NaN)
    or the previous chunk's tile. Shapes give several warps and several chunks."""
    rows, cols = 70, 100
    packed, absmax, code, w64 = _quantized(rows, cols, 32, "nf4", seed=6)
    emulated.set_schedule(order, 11)
    try:
        x = torch.randn(70, cols, dtype=dtype)
        gy = torch.randn(70, rows, dtype=dtype)
        _check_product(qo.linear_4bit(x, packed, absmax, code, 32, rows, cols), x, w64, False, dtype, "forward")
        _check_product(qo.linear_4bit_grad_input(gy, packed, absmax, code, 32, rows, cols), gy, w64, True, dtype,
                       "grad_input")
    finally:
        emulated.set_schedule("shuffled", 0)


# ---- bad input, on every device (the CUDA kernels check too) ---------------------------------

def _good(device):
    packed, absmax, code, _ = _quantized(8, 64, 32, "nf4", seed=8)
    return dict(x=torch.randn(3, 64, device=device), packed=packed.to(device), absmax=absmax.to(device),
                code=code.to(device), blocksize=32, out_features=8, in_features=64)


BAD = [
    ("x", lambda a: a.update(x=a["x"].to(torch.int32)), "x: expected dtype"),
    ("x", lambda a: a.update(x=torch.randn(3, 65, device=a["x"].device)), r"x: expected shape \[\.\.\., 64\]"),
    ("x", lambda a: a.update(x=torch.tensor(1.0, device=a["x"].device)), "x"),
    ("packed", lambda a: a.update(packed=a["packed"][1:]), "packed: expected 256 bytes"),
    ("packed", lambda a: a.update(packed=a["packed"].float()), "packed: expected a uint8"),
    ("absmax", lambda a: a.update(absmax=a["absmax"].double()), "absmax: expected a float32"),
    ("absmax", lambda a: a.update(absmax=a["absmax"][:-1]), r"absmax: expected shape \[16\]"),
    ("code", lambda a: a.update(code=a["code"][:8]), r"code: expected a float32 tensor of shape \[16\]"),
    ("blocksize", lambda a: a.update(blocksize=48), "blocksize: expected a power of two"),
    ("blocksize", lambda a: a.update(blocksize=16), "blocksize"),
    ("out_features", lambda a: a.update(out_features=0), "out_features"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arg,change,match", BAD, ids=[f"{b[0]}{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(device, arg, change, match):
    a = _good(device)
    change(a)
    with pytest.raises(RuntimeError, match=match):
        qo.linear_4bit(a["x"], a["packed"], a["absmax"], a["code"], a["blocksize"], a["out_features"],
                       a["in_features"])


@pytest.mark.parametrize("device", DEVICES)
def test_bad_grad_input_names_the_argument(device):
    a = _good(device)
    with pytest.raises(RuntimeError, match=r"grad_y: expected shape \[\.\.\., 8\]"):
        qo.linear_4bit_grad_input(a["x"], a["packed"], a["absmax"], a["code"], 32, 8, 64)
    with pytest.raises(RuntimeError, match="grad_y: expected dtype"):
        qo.linear_4bit_grad_input(torch.ones(2, 8, dtype=torch.int64, device=device), a["packed"], a["absmax"],
                                  a["code"], 32, 8, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_absmax_input_names_the_argument(device):
    q = torch.zeros(10, dtype=torch.uint8, device=device)
    a2, c2 = torch.ones(1, device=device), torch.linspace(-1, 1, 256, device=device)
    with pytest.raises(RuntimeError, match="absmax_q: expected a 1-D uint8"):
        qo.dequantize_absmax(q.float(), a2, c2, 256, 0.0)
    with pytest.raises(RuntimeError, match=r"absmax2: expected a float32 tensor of shape \[1\]"):
        qo.dequantize_absmax(q, torch.ones(2, device=device), c2, 256, 0.0)
    with pytest.raises(RuntimeError, match="code2"):
        qo.dequantize_absmax(q, a2, c2[:16], 256, 0.0)
    with pytest.raises(RuntimeError, match="offset"):
        qo.dequantize_absmax(q, a2, c2, 256, float("nan"))


@CUDA_SKIP
def test_device_mix_names_the_argument():
    a = _good("cuda")
    for name in ("packed", "absmax", "code"):
        b = dict(a)
        b[name] = b[name].cpu()
        with pytest.raises(RuntimeError, match=name):
            qo.linear_4bit(b["x"], b["packed"], b["absmax"], b["code"], 32, 8, 64)


@CUDA_SKIP
@pytest.mark.parametrize("m", [2, 40])
def test_opcheck_cuda(m):
    packed, absmax, code, _ = _quantized(24, 72, 64, "nf4", seed=9)
    w = (packed.cuda(), absmax.cuda(), code.cuda(), 64, 24, 72)
    torch.library.opcheck(torch.ops.lrk.linear_4bit.default, (torch.randn(m, 72, device="cuda"), *w))
    torch.library.opcheck(torch.ops.lrk.linear_4bit_grad_input.default, (torch.randn(m, 24, device="cuda"), *w))
