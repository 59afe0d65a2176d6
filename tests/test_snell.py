"""SNELL: lrk.snell_linear / snell_delta and lrk.nn.SNELLLinear vs the dense
reference for the three kernels (element and block competition), gradcheck in
float64, nothing dense saved for backward, a CPU training run, opcheck, compile and
bad input."""
import pytest
import torch
import torch.nn.functional as F

import lrk
import lrk.sparse_ops as sp
from lrk import reference_sparse as ref
from lrk.nn.snell import SNELLLinear, apply_snell, merge_snell
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close, reference_leaves

KERNELS = [("linear", {}), ("piecewise_linear", dict(head_coeffs=[0.1, -0.1])),
           ("piecewise_linear", dict(head_coeffs=[0.3, -0.2, 0.5, 0.1])), ("rbf", dict(gamma=0.7))]
KERNEL_IDS = ["linear", "pwl2", "pwl4", "rbf"]


def _inputs(lead, K, N, r, dtype, device, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    x = rnd(*lead, K).requires_grad_()
    w = rnd(N, K, std=K ** -0.5)
    b = rnd(N)
    a = rnd(N, r, std=0.5).requires_grad_()
    bb = rnd(K, r, std=0.5).requires_grad_()
    return x, w, b, a, bb


def _params(kernel, kw, sparsity, block_size, scale=0.3):
    return dict(kernel=kernel, sparsity=sparsity, block_size=block_size, head_coeffs=kw.get("head_coeffs", ()),
                gamma=kw.get("gamma", 1.0), scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel,kw", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("sparsity,block_size", [(0.9, 0), (0.5, 0), (0.0, 0), (0.6, 16)])
def test_matches_reference(device, dtype, kernel, kw, sparsity, block_size):
    x, w, b, a, bb = _inputs((3, 7), 37, 45, 4, dtype, device)
    p = _params(kernel, kw, sparsity, block_size)
    y = sp.snell_linear(x, w, b, a, bb, **p)
    leaf = reference_leaves(x, w, b, a, bb)
    y_ref = ref.snell_linear(*leaf, **p)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close(y, y_ref, dtype, "y", factor=2)
    gy = torch.randn_like(y_ref)
    y.backward(gy.to(dtype).to(device))
    y_ref.backward(gy)
    for name, t, t_ref in (("x", x, leaf[0]), ("lora_a", a, leaf[3]), ("lora_b", bb, leaf[4])):
        assert t.grad is not None and t.grad.dtype == dtype and t.grad.shape == t.shape
        assert_close(t.grad, t_ref.grad, dtype, f"grad {name}", factor=10 if dtype == torch.bfloat16 else 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel,kw", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("sparsity,block_size", [(0.7, 0), (0.5, 16)])
def test_gradcheck(device, kernel, kw, sparsity, block_size):
    x, w, b, a, bb = _inputs((5,), 20, 18, 4, torch.float64, device, seed=7)
    b.requires_grad_()
    p = _params(kernel, kw, sparsity, block_size)
    assert torch.autograd.gradcheck(lambda *t: sp.snell_linear(t[0], w, t[1], t[2], t[3], **p), (x, b, a, bb),
                                    fast_mode=True)


@pytest.mark.parametrize("block_size", [0, 16])
def test_kept_count_and_nothing_dense_saved(block_size):
    x, w, b, a, bb = _inputs((6,), 50, 40, 8, torch.float32, "cpu", seed=1)
    p = _params("piecewise_linear", dict(head_coeffs=[0.1, -0.1]), 0.9, block_size)
    delta = sp.snell_delta(a, bb, **p)
    if block_size == 0:
        assert int((delta != 0).sum()) == sp.keep_count(40 * 50, 0.1)
    else:
        tiles = ref.block_scores(delta, 16) != 0
        assert int(tiles.sum()) == sp.keep_count(3 * 4, 0.1)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sp.snell_linear(x, w, b, a, bb, **p)
    inputs = {t.data_ptr() for t in (x, w, a, bb)}
    assert saved and all(t.data_ptr() in inputs for t in saved), [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert a.grad is not None and bb.grad is not None


@pytest.mark.parametrize("kernel,block_size", [("linear", 16), ("piecewise_linear", 0), ("rbf", 0),
                                               ("piecewise_linear", 16)])
def test_training_reduces_loss(kernel, block_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 40))
    teacher = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 40))
    x = torch.randn(128, 48)
    with torch.no_grad():
        target = model(x) + 0.3 * teacher(x)
    layers = apply_snell(model, rank=8, kernel=kernel, sparsity=0.7, block_size=block_size,
                         scale=0.1 if kernel == "rbf" else 1.0)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4 and all(p.shape[1] == 8 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(40):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses[::10]
    merged = merge_snell(model)
    assert all(type(m) is torch.nn.Linear for m in merged if not isinstance(m, torch.nn.GELU))
    torch.testing.assert_close(F.mse_loss(merged(x), target).item(), F.mse_loss(model(x), target).item())


def test_layer_export_and_merge():
    layer = SNELLLinear(torch.nn.Linear(30, 26).double(), rank=4, kernel="rbf", sparsity=0.8, gamma=2.0, scale=0.1)
    x = torch.randn(5, 30, dtype=torch.float64)
    d = layer.delta_sparse()
    assert d.is_sparse and d._nnz() == sp.keep_count(26 * 30, 0.2)
    torch.testing.assert_close(layer.merge()(x), layer(x))
    torch.testing.assert_close(F.linear(x, layer.weight + d.to_dense(), layer.bias), layer(x))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_opcheck_and_compile(device):
    x, w, b, a, bb = _inputs((2, 5), 24, 20, 4, torch.float32, device, seed=3)
    for p in (_params("piecewise_linear", dict(head_coeffs=[0.1, -0.1]), 0.8, 0), _params("rbf", {}, 0.5, 16)):
        args = (p["kernel"], p["sparsity"], p["block_size"], list(p["head_coeffs"]), p["gamma"], p["scale"])
        torch.library.opcheck(torch.ops.lrk.snell_linear.default, (x, w, b, a, bb) + args)
        torch.library.opcheck(torch.ops.lrk.snell_delta.default, (a, bb) + args)
        gy = torch.randn(2, 5, 20, device=device)
        torch.library.opcheck(torch.ops.lrk.snell_linear_bwd.default,
                              (gy, x.detach(), w, a.detach(), bb.detach()) + args + (True,))
    torch._dynamo.reset()
    layer = SNELLLinear(torch.nn.Linear(24, 20).to(device), rank=4, sparsity=0.8)

    def step(x):
        return F.gelu(layer(x)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, (x, layer.lora_a, layer.lora_b))
    loss_e = step(x)
    grads_e = torch.autograd.grad(loss_e, (x, layer.lora_a, layer.lora_b))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def _good():
    x, w, b, a, bb = _inputs((4,), 16, 12, 4, torch.float32, "cpu", seed=0)
    return dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb, kernel="piecewise_linear", sparsity=0.5,
                block_size=0, head_coeffs=[0.1, -0.1], gamma=1.0, scale=1.0)


@pytest.mark.parametrize("change,match", [
    (dict(sparsity=1.0), r"sparsity: expected a value in \[0, 1\), got 1"),
    (dict(sparsity=-0.1), r"sparsity: expected a value in \[0, 1\)"),
    (dict(kernel="cosine"), "kernel: expected 'linear', 'piecewise_linear' or 'rbf', got 'cosine'"),
    (dict(block_size=48), "block_size: expected one of 16, 32, 64, 128, got 48"),
    (dict(head_coeffs=[0.1, 0.2, 0.3]), "head_coeffs: the rank 4 must be divisible by the number of heads 3"),
    (dict(head_coeffs=[]), "head_coeffs: kernel 'piecewise_linear' needs one coefficient per head"),
    (dict(kernel="rbf"), "head_coeffs: only kernel 'piecewise_linear' uses head coefficients"),
    (dict(kernel="rbf", head_coeffs=[], gamma=0.0), "gamma: expected a positive number"),
    (dict(lora_b=torch.randn(15, 4)), "weight: expected size 15 in dim 1"),
    (dict(lora_b=torch.randn(16, 3)), "lora_b: expected size 4 in dim 1"),
    (dict(lora_a=torch.randn(11, 4)), "weight: expected size 11 in dim 0"),
    (dict(lora_a=torch.randn(12, 4, dtype=torch.float64)), "lora_b: expected dtype Double"),
])
def test_bad_input(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        sp.snell_linear(**args)


def test_layer_bad_input():
    lin = torch.nn.Linear(16, 12)
    with pytest.raises(ValueError, match=r"sparsity: expected a value in \[0, 1\)"):
        SNELLLinear(lin, sparsity=1.0)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        SNELLLinear(lin, kernel="poly")
    with pytest.raises(ValueError, match="rank: expected a multiple of the number of heads 2"):
        SNELLLinear(lin, rank=3)
