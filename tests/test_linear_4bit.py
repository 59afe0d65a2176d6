"""linear_4bit, linear_4bit_grad_input and dequantize_absmax: values vs the float64
reference (reference_quant) and vs bitsandbytes' own dequantization, opcheck,
torch.compile, and bad input."""
import pytest
import torch

import lrk
from lrk import quant_ops as qo
from lrk import reference_quant as rq
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close
from quant4_helpers import bnb_weight_4bit, random_weight_4bit

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (leading dims of x, N, K, blocksize): M = 0, 1, odd, 3-D; K not a multiple of the
# blocksize (blocks span rows), odd N and odd N * K (a half-used last byte); tiles of
# the CPU kernel crossed (N * K > 2^18 elements).
SHAPES = [
    ((0,), 24, 40, 64),
    ((1,), 17, 33, 32),
    ((7,), 45, 29, 64),
    ((2, 5), 19, 21, 128),
    ((33,), 131, 100, 256),
    ((5,), 9, 4099, 4096),
    ((65,), 700, 401, 64),
]


def _x(lead, K, dtype, device):
    return torch.randn(*lead, K, dtype=torch.float64).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,K,blocksize", SHAPES)
def test_forward_and_grad_input_match_reference(device, dtype, lead, N, K, blocksize):
    w = random_weight_4bit(N, K, blocksize, device)
    w64 = w.dense(torch.float64)
    x = _x(lead, K, dtype, device)
    y = qo.linear_4bit(x, *w.args())
    y_ref = x.double().cpu() @ w64.t()
    assert y.shape == (*lead, N) and y.dtype == dtype and y.device.type == device
    assert_close(y, y_ref, dtype, "y")
    gy = _x(lead, N, dtype, device)
    gx = qo.linear_4bit_grad_input(gy, *w.args())
    gx_ref = gy.double().cpu() @ w64
    assert gx.shape == (*lead, K) and gx.dtype == dtype
    assert_close(gx, gx_ref, dtype, "grad_x")
    if dtype == torch.float64:  # the reference op itself (float64: the same values)
        assert_close(y, rq.linear_4bit(x.cpu(), *w.to("cpu").args()), dtype, "y vs reference op")


@pytest.mark.parametrize("device", DEVICES)
def test_every_nibble_and_block_is_placed_right(device):
    """One-hot inputs read single columns of W: a swapped nibble, a wrong block of
    absmax or a tile boundary off by one changes an exact value."""
    N, K = 37, 75  # odd numel: the last byte's low nibble is padding
    w = random_weight_4bit(N, K, 32, device)
    eye_k = torch.eye(K, dtype=torch.float64, device=device)
    eye_n = torch.eye(N, dtype=torch.float64, device=device)
    dense = w.dense(torch.float64)
    torch.testing.assert_close(qo.linear_4bit(eye_k, *w.args()).cpu(), dense.t(), rtol=0, atol=0)
    torch.testing.assert_close(qo.linear_4bit_grad_input(eye_n, *w.args()).cpu(), dense, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("N,K,blocksize", [(33, 70, 64), (16, 100, 32), (9, 515, 4096), (20, 300, 256)])
def test_matches_bitsandbytes_dequantization(device, quant_type, double_quant, N, K, blocksize):
    """Weights quantized by bitsandbytes: lrk's product equals x @ (bitsandbytes'
    dequantize_4bit)^T, and double quantization's absmax is bitsandbytes' exactly."""
    w_src = torch.randn(N, K) * 0.1
    w_src[0, :5] = 0.0  # zeros and a tie at the block maximum
    w_src[1, :3] = w_src[1].abs().max()
    w, deq_bnb, _ = bnb_weight_4bit(w_src, quant_type, blocksize, double_quant)
    w = w.to(device)
    torch.testing.assert_close(w.dense(torch.float32), deq_bnb, rtol=0, atol=0)
    if double_quant:
        absmax = qo.dequantize_absmax(*w.nested)
        torch.testing.assert_close(absmax.cpu(), w.absmax.cpu(), rtol=0, atol=0)
        torch.testing.assert_close(absmax.cpu(), rq.dequantize_absmax(*[t.cpu() if torch.is_tensor(t) else t
                                                                        for t in w.nested]), rtol=0, atol=0)
    x = torch.randn(11, K, dtype=torch.float64, device=device)
    y = qo.linear_4bit(x, *w.args())
    assert_close(y, x.cpu() @ deq_bnb.double().t(), torch.float64, "y vs bitsandbytes")
    gy = torch.randn(11, N, dtype=torch.float64, device=device)
    assert_close(qo.linear_4bit_grad_input(gy, *w.args()), gy.cpu() @ deq_bnb.double(), torch.float64,
                 "grad_x vs bitsandbytes")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,blocksize2", [(1, 256), (300, 256), (513, 64)])
def test_dequantize_absmax_matches_reference(device, n, blocksize2):
    g = torch.Generator().manual_seed(5)
    q = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    absmax2 = torch.rand((n + blocksize2 - 1) // blocksize2, generator=g) + 0.01
    code2 = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
    out = qo.dequantize_absmax(q.to(device), absmax2.to(device), code2.to(device), blocksize2, 0.375)
    assert out.dtype == torch.float32 and out.shape == (n,)
    torch.testing.assert_close(out.cpu(), rq.dequantize_absmax(q, absmax2, code2, blocksize2, 0.375), rtol=0, atol=0)


def test_large_tiles_keep_float32_accumulation():
    """bf16 x with a long K: float32 accumulation keeps the error at bf16 rounding of
    the output; a bf16 accumulation would be far off."""
    w = random_weight_4bit(40, 4096, 64)
    x = torch.randn(9, 4096, dtype=torch.float64).bfloat16()
    y = qo.linear_4bit(x, *w.args())
    ref = x.double() @ w.dense().t()
    assert rel_err_of(y, ref) < 4e-3


def rel_err_of(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    w = random_weight_4bit(19, 70, 64, device)
    x = _x((2, 3), 70, dtype, device)
    torch.library.opcheck(torch.ops.lrk.linear_4bit.default, (x, *w.args()))
    torch.library.opcheck(torch.ops.lrk.linear_4bit_grad_input.default, (_x((4,), 19, dtype, device), *w.args()))
    q = torch.randint(0, 256, (21,), dtype=torch.uint8, device=device)
    torch.library.opcheck(torch.ops.lrk.dequantize_absmax.default,
                          (q, torch.rand(1, device=device), torch.randn(256, device=device), 256, 0.5))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    w = random_weight_4bit(19, 70, 64, device)

    def f(x, gy):
        return qo.linear_4bit(x, *w.args()) * 2, qo.linear_4bit_grad_input(gy, *w.args())

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager" if device == "cpu" else "inductor")
    for m in (3, 8):
        x, gy = torch.randn(m, 70, device=device), torch.randn(m, 19, device=device)
        for a, b in zip(compiled(x, gy), f(x, gy)):
            torch.testing.assert_close(a, b)


def _bad_calls():
    w = random_weight_4bit(8, 64, 64)
    p, a, c, bs, n, k = w.args()
    x = torch.randn(3, 64)
    q, a2, c2 = torch.zeros(4, dtype=torch.uint8), torch.ones(1), torch.randn(256)
    return [
        (lambda: qo.linear_4bit(x, p, a, c, 32, n, k), "absmax: expected shape \\[16\\].*blocksize"),
        (lambda: qo.linear_4bit(x, p, a, c, 48, n, k), "blocksize: expected a power of two"),
        (lambda: qo.linear_4bit(x, p[:-1], a, c, bs, n, k), "packed: expected 256 bytes"),
        (lambda: qo.linear_4bit(x, p.float(), a, c, bs, n, k), "packed: expected a uint8"),
        (lambda: qo.linear_4bit(x, p, a.double(), c, bs, n, k), "absmax: expected a float32"),
        (lambda: qo.linear_4bit(x, p, a, c[:8], bs, n, k), "code: expected a float32 tensor of shape \\[16\\]"),
        (lambda: qo.linear_4bit(x.int(), p, a, c, bs, n, k), "x: expected dtype float32"),
        (lambda: qo.linear_4bit(torch.randn(3, 63), p, a, c, bs, n, k), "x: expected shape \\[..., 64\\]"),
        (lambda: qo.linear_4bit(torch.tensor(1.0), p, a, c, bs, n, k), "x: expected"),
        (lambda: qo.linear_4bit(x, p, a, c, bs, 0, k), "out_features, in_features: expected positive"),
        (lambda: qo.linear_4bit_grad_input(torch.randn(3, 9), p, a, c, bs, n, k), "grad_y: expected shape"),
        (lambda: qo.dequantize_absmax(q.float(), a2, c2, 256, 0.0), "absmax_q: expected a 1-D uint8"),
        (lambda: qo.dequantize_absmax(q, torch.ones(2), c2, 256, 0.0), "absmax2: expected a float32 tensor of shape \\[1\\]"),
        (lambda: qo.dequantize_absmax(q, a2, c2[:255], 256, 0.0), "code2: expected"),
        (lambda: qo.dequantize_absmax(q, a2, c2, 0, 0.0), "blocksize2: expected a positive"),
        (lambda: qo.dequantize_absmax(q, a2, c2, 256, float("nan")), "offset: expected a finite"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    call, match = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=match):
        call()


@pytest.mark.cuda
@pytest.mark.parametrize("device", DEVICES_NO_EMU[1:])
def test_device_mix(device):
    w = random_weight_4bit(8, 64, 64, device)
    x = torch.randn(3, 64, device=device)
    for i, name in enumerate(("packed", "absmax", "code")):
        args = list(w.args())
        args[i] = args[i].cpu()
        with pytest.raises(RuntimeError, match=name):
            qo.linear_4bit(x, *args)
    with pytest.raises(RuntimeError, match="packed|x"):
        qo.linear_4bit(x.cpu(), *w.args())
