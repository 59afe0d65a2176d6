"""qlora_fused and qdora_fused (LoRA / DoRA over a frozen 4-bit W): values and
gradients vs the float64 reference on the dequantized W, gradcheck, opcheck,
torch.compile, double quantization, and bad input."""
import math

import pytest
import torch

from lrk import quant_ops as qo
from lrk import reference_quant as rq
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close, reference_leaves, saved_activation_shapes
from quant4_helpers import random_weight_4bit

# (leading dims of x, K, N, r, blocksize): M = 0, 1, odd, 3-D; K not a multiple of
# the blocksize; r = 1 and r = 200.
SHAPES = [
    ((0,), 40, 24, 3, 64),
    ((1,), 33, 17, 1, 32),
    ((7,), 29, 45, 3, 64),
    ((2, 5), 21, 19, 4, 128),
    ((9,), 257, 210, 200, 64),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def quantized_weight(N, K, blocksize, device, double_quant):
    """A random 4-bit weight; double-quantized: a random uint8 absmax with its
    second-level state (the reference gets the float absmax it stands for)."""
    w = random_weight_4bit(N, K, blocksize)
    if not double_quant:
        return qo.Weight4bit(w.packed.to(device), w.absmax.to(device), w.code.to(device), blocksize, N, K)
    blocks = w.absmax.numel()
    q = torch.randint(0, 256, (blocks,), dtype=torch.uint8)
    absmax2 = torch.rand((blocks + 255) // 256) + 0.5
    code2 = torch.sort(torch.rand(256) * 2 - 1).values
    return qo.Weight4bit(w.packed.to(device), q.to(device), w.code.to(device), blocksize, N, K, absmax2.to(device),
                         code2.to(device), 256, 0.7)


def factors(lead, K, N, r, dtype, device, bias=True, dora=False):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device).requires_grad_()

    x = rnd(*lead, K)
    b = rnd(N) if bias else None
    a = rnd(r, K, std=1 / math.sqrt(K))
    bb = rnd(N, r, std=1 / math.sqrt(r))
    m = (torch.rand(N, generator=g, dtype=torch.float64) + 0.5).to(dtype).to(device).requires_grad_() if dora else None
    return x, b, a, bb, m


def run_op(dora, x, w, b, a, bb, m, scale, p, seed, **kw):
    if dora:
        return qo.qdora_fused(x, w, b, a, bb, m, scale, p, seed, **kw)
    return qo.qlora_fused(x, w, b, a, bb, scale, p, seed)


def run_reference(dora, x, w, b, a, bb, m, scale, p, seed):
    args = (w.packed.cpu(), w.float_absmax().cpu(), w.code.cpu(), w.blocksize, w.out_features, w.in_features)
    if dora:
        return rq.qdora_fused(x, *args, b, a, bb, m, scale, p, seed)
    return rq.qlora_fused(x, *args, b, a, bb, scale, p, seed)


def check_against_reference(device, dtype, lead, K, N, r, blocksize, p, dora, double_quant, bias=True):
    scale, seed = 1.7, int(torch.randint(0, 2**40, ()).item())
    w = quantized_weight(N, K, blocksize, device, double_quant)
    x, b, a, bb, m = factors(lead, K, N, r, dtype, device, bias, dora)
    y = run_op(dora, x, w, b, a, bb, m, scale, p, seed)
    leaf = reference_leaves(x, b, a, bb, m)
    y_ref = run_reference(dora, leaf[0], w, leaf[1], leaf[2], leaf[3], leaf[4], scale, p, seed)
    assert y.shape == y_ref.shape and y.dtype == dtype and y.device.type == device
    factor = 2 if dtype == torch.bfloat16 else 1  # the base product is rounded once before the LoRA term
    assert_close(y, y_ref, dtype, "y", factor)
    if y.numel() == 0:
        return
    gy = torch.randn_like(y_ref)
    y.backward(gy.to(dtype).to(device))
    y_ref.backward(gy.to(dtype).double())
    abs_leaf = [t.detach().abs().requires_grad_() if t is not None else None for t in leaf]
    w_abs = qo.Weight4bit(w.packed.cpu(), w.float_absmax().cpu(), w.code.cpu().abs(), w.blocksize, N, K)
    run_reference(dora, abs_leaf[0], w_abs, abs_leaf[1], abs_leaf[2], abs_leaf[3], abs_leaf[4], scale, p,
                  seed).backward(gy.to(dtype).double().abs())
    for name, t, t_ref, t_abs in zip(("x", "bias", "lora_a", "lora_b", "magnitude"), (x, b, a, bb, m), leaf, abs_leaf):
        if t is None:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        assert_close(t.grad, t_ref.grad, dtype, f"grad {name}", factor, magnitude=t_abs.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,r,blocksize", SHAPES)
@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_forward_backward_match_reference(device, dtype, lead, K, N, r, blocksize, dora):
    p = 0.1 if r != 200 else 0.0
    check_against_reference(device, dtype, lead, K, N, r, blocksize, p, dora, double_quant=(r % 2 == 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_without_bias_and_dropout_variants(device, dora, double_quant):
    check_against_reference(device, torch.float32, (6,), 70, 33, 5, 64, 0.0, dora, double_quant, bias=False)
    check_against_reference(device, torch.float32, (6,), 70, 33, 5, 64, 0.5, dora, double_quant, bias=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_gradcheck(device, dora):
    w = quantized_weight(5, 7, 32, device, double_quant=True)
    x, b, a, bb, m = factors((2, 3), 7, 5, 2, torch.float64, device, dora=dora)
    if dora:  # the norm is a constant in backward: finite differences in A, B move it
        fn = lambda x, b, m: qo.qdora_fused(x, w, b, a.detach(), bb.detach(), m, 0.8, 0.3, 11)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, b, m))
    else:
        fn = lambda x, b, a, bb: qo.qlora_fused(x, w, b, a, bb, 0.8, 0.3, 11)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, b, a, bb))


@pytest.mark.parametrize("device", DEVICES)
def test_cached_weight_sq_norm_and_frozen_weight(device):
    """weight_4bit_sq_norm equals ||deq(W)_n||^2; passing it gives the same output;
    the 4-bit tensors get no gradient and a float absmax that requires grad is refused."""
    w = quantized_weight(37, 75, 32, device, double_quant=False)
    sq = w.sq_norm()
    assert sq.dtype == torch.float64
    torch.testing.assert_close(sq.cpu(), w.dequantize(torch.float64).cpu().square().sum(1), rtol=1e-12, atol=0)
    x, b, a, bb, m = factors((4,), 75, 37, 3, torch.float32, device, dora=True)
    y1 = qo.qdora_fused(x, w, b, a, bb, m, 1.2)
    y2 = qo.qdora_fused(x, w, b, a, bb, m, 1.2, weight_sq_norm=sq.float())
    torch.testing.assert_close(y1, y2)
    w_grad = qo.Weight4bit(w.packed, w.absmax.clone().requires_grad_(), w.code, 32, 37, 75)
    with pytest.raises(RuntimeError, match="frozen"):
        qo.qlora_fused(x, w_grad, b, a, bb)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_keeps_no_dequantized_weight(device):
    """What autograd saves: x, h (and DoRA's y_unscaled, norms) and the 4-bit tensors
    as given; never a float absmax of a double-quantized weight or W itself."""
    N, K, r = 48, 64, 4
    w = quantized_weight(N, K, 64, device, double_quant=True)
    x, b, a, bb, m = factors((5,), K, N, r, torch.float32, device, dora=True)
    shapes, _ = saved_activation_shapes(lambda: qo.qdora_fused(x, w, b, a, bb, m, 1.0, 0.1, 3),
                                        [x, b, a, bb, m, w.packed, w.absmax, w.code, w.absmax2, w.code2])
    assert sorted(shapes) == sorted([(5, r), (5, N), (N,)]), shapes


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
@pytest.mark.parametrize("dtype", [torch.float32])
def test_opcheck(device, dtype):
    w = quantized_weight(16, 40, 64, device, double_quant=True)
    x, b, a, bb, m = factors((2, 3), 40, 16, 4, dtype, device, dora=True)
    x, b, a, bb, m = (t.detach() for t in (x, b, a, bb, m))
    wa, na = w.op_args(), w.nested_args()
    torch.library.opcheck(torch.ops.lrk.qlora_fused_fwd.default, (x, *wa, b, a, bb, 1.5, 0.2, 9, *na))
    torch.library.opcheck(torch.ops.lrk.qlora_fused.default, (x, *wa, b, a, bb, 1.5, 0.2, 9, *na))
    torch.library.opcheck(torch.ops.lrk.qdora_fused_fwd.default, (x, *wa, b, a, bb, m, 1.5, 0.2, 9, None, *na))
    torch.library.opcheck(torch.ops.lrk.qdora_fused.default, (x, *wa, b, a, bb, m, 1.5, 0.2, 9, None, *na))
    y, h, yu, wn = torch.ops.lrk.qdora_fused_fwd(x, *wa, b, a, bb, m, 1.5, 0.2, 9, None, *na)
    gy = torch.randn_like(y)
    for need_x in (True, False):
        torch.library.opcheck(torch.ops.lrk.qlora_fused_bwd.default,
                              (gy, x, *wa, a, bb, h, 1.5, 0.2, 9, need_x, *na))
        torch.library.opcheck(torch.ops.lrk.qdora_fused_bwd.default,
                              (gy, x, *wa, a, bb, m, h, yu, wn, 1.5, 0.2, 9, need_x, *na))
    torch.library.opcheck(torch.ops.lrk.weight_4bit_sq_norm.default,
                          (w.packed, w.float_absmax(), w.code, 64, 16, 40))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
@pytest.mark.parametrize("dora", [False, True], ids=["qlora", "qdora"])
def test_torch_compile_fullgraph(device, dora):
    w = quantized_weight(16, 40, 64, device, double_quant=True)
    x, b, a, bb, m = factors((3, 5), 40, 16, 4, torch.float32, device, dora=dora)

    def step(x, b, a, bb):
        return run_op(dora, x, w, b, a, bb, m, 1.5, 0.1, 5).square().sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend="aot_eager" if device == "cpu" else "inductor")
    grads_c = torch.autograd.grad(compiled(x, b, a, bb), (x, a, bb))
    grads_e = torch.autograd.grad(step(x, b, a, bb), (x, a, bb))
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_in_lower_precision(device):
    w = quantized_weight(16, 40, 64, device, double_quant=False)
    x, b, a, bb, _ = factors((6,), 40, 16, 4, torch.float32, device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        y = qo.qlora_fused(x, w, b, a, bb, 1.5)
    assert y.dtype == torch.bfloat16
    assert_close(y, qo.qlora_fused(x, w, b, a, bb, 1.5), torch.bfloat16, "autocast y")


def _bad_calls():
    """Calls with one thing wrong, and what the error must say."""
    N, K, r = 16, 40, 4
    w = quantized_weight(N, K, 64, "cpu", double_quant=False)
    wd = quantized_weight(N, K, 64, "cpu", double_quant=True)
    other = quantized_weight(24, 40, 64, "cpu", double_quant=False)  # another layer's state
    x, b, a, bb, m = (t.detach() if t is not None else None for t in factors((3,), K, N, r, torch.float32, "cpu",
                                                                             dora=True))
    mixed = qo.Weight4bit(w.packed, other.absmax, w.code, 64, N, K)
    no_state2 = qo.Weight4bit(wd.packed, wd.absmax, wd.code, 64, N, K)
    stray = qo.Weight4bit(w.packed, w.absmax, w.code, 64, N, K, wd.absmax2, wd.code2)
    return [
        (lambda: qo.qlora_fused(x, other, b, a, bb), "x: expected shape|lora_b|bias"),
        (lambda: qo.qlora_fused(x, mixed, b, a, bb), "absmax: expected shape"),
        (lambda: qo.qlora_fused(x, no_state2, b, a, bb), "absmax: a uint8 .* needs absmax2"),
        (lambda: qo.qlora_fused(x, stray, b, a, bb), "absmax2, code2: given with a float32 absmax"),
        (lambda: qo.qlora_fused(x.double(), w, b, a, bb), "lora_a: expected dtype Double"),
        (lambda: qo.qlora_fused(x, w, b, a[:, :-1], bb), "lora_a: expected size 40"),
        (lambda: qo.qlora_fused(x, w, b[:-1], a, bb), "bias: expected size 16"),
        (lambda: qo.qlora_fused(x, w, b, a, bb, float("nan")), "scale: expected a finite"),
        (lambda: qo.qlora_fused(x, w, b, a, bb, 1.0, 1.0), "dropout_p: expected a probability"),
        (lambda: qo.qlora_fused(x[:, :-1], w, b, a, bb), "x: expected shape \\[..., 40\\]"),
        (lambda: qo.qdora_fused(x, w, b, a, bb, m[:-1]), "magnitude: expected size 16"),
        (lambda: qo.qdora_fused(x, w, b, a, bb, m, weight_sq_norm=torch.ones(N + 1)), "weight_sq_norm"),
        (lambda: qo.qdora_fused(x, other, None, a, torch.randn(24, r), torch.ones(24),
                                weight_sq_norm=w.sq_norm()), "weight_sq_norm: expected size 24"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    call, match = _bad_calls()[case]
    with pytest.raises(RuntimeError, match=match):
        call()
