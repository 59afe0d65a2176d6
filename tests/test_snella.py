"""SNELLA's learnable kernel scalars: lrk.snella_linear / snella_delta and
lrk.nn.SNELLLinear(learnable_kernel=True) vs the dense reference (the scalars'
gradient included), gradcheck in float64, a CPU training run with the budget
allocator, opcheck, compile and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import lrk
import lrk.sparse_ops as sp
from lrk import reference_sparse as ref
from lrk.nn.snell import SNELLLinear, apply_snell, merge_snell
from lrk.nn.snell_budget import SNELLImportance, snell_budget_schedule
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close, reference_leaves

# (kernel, kernel_params): linear [scale], piecewise_linear [c_h], rbf [scale, gamma]
KERNELS = [("linear", [0.7]), ("piecewise_linear", [0.3, -0.2]), ("piecewise_linear", [0.3, -0.2, 0.5, 0.1]),
           ("rbf", [0.4, 0.7])]
KERNEL_IDS = ["linear", "pwl2", "pwl4", "rbf"]


def _inputs(lead, K, N, r, dtype, device, kernel_params, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    x = rnd(*lead, K).requires_grad_()
    w = rnd(N, K, std=K ** -0.5)
    b = rnd(N)
    a = rnd(N, r, std=0.5).requires_grad_()
    bb = rnd(K, r, std=0.5).requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    kp = torch.tensor(kernel_params, dtype=acc, device=device).requires_grad_()
    return x, w, b, a, bb, kp


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel,kp", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("sparsity,block_size", [(0.8, 0), (0.0, 0), (0.6, 16)])
def test_matches_reference(device, dtype, kernel, kp, sparsity, block_size):
    x, w, b, a, bb, k = _inputs((3, 7), 37, 45, 4, dtype, device, kp)
    y = sp.snella_linear(x, w, b, a, bb, k, kernel, sparsity, block_size)
    leaf = reference_leaves(x, w, b, a, bb, k)
    y_ref = ref.snella_linear(*leaf, kernel, sparsity, block_size)
    assert y.shape == y_ref.shape and y.dtype == dtype
    assert_close(y, y_ref, dtype, "y", factor=2)
    gy = torch.randn_like(y_ref)
    y.backward(gy.to(dtype).to(device))
    y_ref.backward(gy)
    names = ("x", "lora_a", "lora_b", "kernel_params")
    for name, t, t_ref in zip(names, (x, a, bb, k), (leaf[0], leaf[3], leaf[4], leaf[5])):
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        assert_close(t.grad, t_ref.grad, dtype, f"grad {name}", factor=10 if dtype == torch.bfloat16 else 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel,kp", KERNELS, ids=KERNEL_IDS)
@pytest.mark.parametrize("sparsity,block_size", [(0.7, 0), (0.5, 16)])
def test_gradcheck(device, kernel, kp, sparsity, block_size):
    x, w, b, a, bb, k = _inputs((5,), 20, 18, 4, torch.float64, device, kp, seed=11)
    b.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda *t: sp.snella_linear(t[0], w, t[1], t[2], t[3], t[4], kernel, sparsity, block_size),
        (x, b, a, bb, k), fast_mode=True)
    # The dense composite path (export / merge) differentiates the scalars as well.
    assert torch.autograd.gradcheck(lambda kk: sp.snella_delta(a.detach(), bb.detach(), kk, kernel, sparsity,
                                                               block_size), (k,))


def test_constant_scalars_agree_with_snell():
    """With the same values, SNELLA's forward and factor gradients are SNELL's."""
    for kernel, kp, snell_kw in (("linear", [0.7], dict(scale=0.7)),
                                 ("piecewise_linear", [0.3, -0.2], dict(head_coeffs=[0.3, -0.2])),
                                 ("rbf", [0.4, 0.7], dict(scale=0.4, gamma=0.7))):
        x, w, b, a, bb, k = _inputs((6,), 30, 22, 4, torch.float64, "cpu", kp, seed=5)
        y1 = sp.snella_linear(x, w, b, a, bb, k, kernel, 0.75, 0)
        g1 = torch.autograd.grad(y1.sum(), (x, a, bb))
        y2 = sp.snell_linear(x, w, b, a, bb, kernel, 0.75, 0, **snell_kw)
        g2 = torch.autograd.grad(y2.sum(), (x, a, bb))
        torch.testing.assert_close(y1, y2)
        for u, v in zip(g1, g2):
            torch.testing.assert_close(u, v)


@pytest.mark.parametrize("kernel", ["linear", "piecewise_linear", "rbf"])
def test_layer_starts_as_snell_and_learns_its_scalars(kernel):
    torch.manual_seed(3)
    base = torch.nn.Linear(30, 26).double()
    kw = dict(rank=4, kernel=kernel, sparsity=0.8, gamma=2.0, scale=0.3)
    snell, snella = SNELLLinear(base, **kw), SNELLLinear(base, learnable_kernel=True, **kw)
    snella.load_state_dict(snell.state_dict(), strict=False)
    x = torch.randn(5, 30, dtype=torch.float64)
    torch.testing.assert_close(snella(x), snell(x))
    assert snella.kernel_scalars.requires_grad and snella.kernel_scalars.dtype == torch.float64
    assert snell.kernel_scalars is None
    if kernel == "rbf":
        torch.testing.assert_close(snella.kernel_params(), torch.tensor([0.3, 2.0], dtype=torch.float64))
    # The raw parameter's gradient (through exp for log gamma) is the op's, chained.
    snella(x).square().sum().backward()
    kp = snella.kernel_params().detach().requires_grad_()
    y = sp.snella_linear(x, snella.weight, snella.bias, snella.lora_a.detach(), snella.lora_b.detach(), kp, kernel,
                         0.8)
    (g,) = torch.autograd.grad(y.square().sum(), kp)
    if kernel == "rbf":
        g = g * torch.tensor([1.0, kp[1].item()], dtype=torch.float64)
    torch.testing.assert_close(snella.kernel_scalars.grad, g)
    d = snella.delta_sparse()
    assert d._nnz() == sp.keep_count(26 * 30, 0.2)
    torch.testing.assert_close(snella.merge()(x), snella(x))


def test_training_with_learnable_scalars_and_budget_reduces_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 40))
    teacher = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 40))
    x = torch.randn(128, 48)
    with torch.no_grad():
        target = model(x) + 0.3 * teacher(x)
    layers = apply_snell(model, rank=8, kernel="piecewise_linear", sparsity=0.5, learnable_kernel=True)
    scalars0 = [layer.kernel_scalars.detach().clone() for layer in layers]
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 6
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    importance = SNELLImportance(model)
    losses, steps = [], 40
    for step in range(1, steps + 1):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        importance.update()
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            importance.allocate(snell_budget_schedule(step, steps, 0.5, 0.3, warmup_steps=5, final_steps=10))
    assert losses[-1] < 0.8 * losses[0], losses[::10]
    assert all(not torch.equal(layer.kernel_scalars.detach(), s0) for layer, s0 in zip(layers, scalars0))
    kept = sum(int((layer.delta() != 0).sum()) for layer in layers)
    assert kept == round(0.3 * (48 * 64 + 64 * 40))
    merged = merge_snell(model)
    assert all(type(m) is torch.nn.Linear for m in merged if not isinstance(m, torch.nn.GELU))
    torch.testing.assert_close(F.mse_loss(merged(x), target).item(), F.mse_loss(model(x), target).item())


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_opcheck_and_compile(device):
    for kernel, kp, bs in (("piecewise_linear", [0.1, -0.1], 0), ("rbf", [0.5, 1.0], 16), ("linear", [0.3], 0)):
        x, w, b, a, bb, k = _inputs((2, 5), 24, 20, 4, torch.float32, device, kp, seed=3)
        args = (kernel, 0.7, bs)
        torch.library.opcheck(torch.ops.lrk.snella_linear.default, (x, w, b, a, bb, k) + args)
        torch.library.opcheck(torch.ops.lrk.snella_delta.default, (a, bb, k) + args)
        gy = torch.randn(2, 5, 20, device=device)
        torch.library.opcheck(torch.ops.lrk.snella_linear_bwd.default,
                              (gy, x.detach(), w, a.detach(), bb.detach(), k.detach()) + args + (True,))
    torch._dynamo.reset()
    layer = SNELLLinear(torch.nn.Linear(24, 20).to(device), rank=4, kernel="rbf", sparsity=0.8, learnable_kernel=True)

    def step(x):
        return F.gelu(layer(x)).sum()

    params = (x, layer.lora_a, layer.lora_b, layer.kernel_scalars)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, params)
    loss_e = step(x)
    grads_e = torch.autograd.grad(loss_e, params)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def _good():
    x, w, b, a, bb, k = _inputs((4,), 16, 12, 4, torch.float32, "cpu", [0.1, -0.1], seed=0)
    return dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb, kernel_params=k, kernel="piecewise_linear",
                sparsity=0.5, block_size=0)


@pytest.mark.parametrize("change,match", [
    (dict(kernel="linear"), r"kernel_params: expected shape \[1\] \(\[scale\]\) for kernel 'linear', got \[2\]"),
    (dict(kernel="rbf", kernel_params=torch.tensor([1.0])),
     r"kernel_params: expected shape \[2\] \(\[scale, gamma\]\) for kernel 'rbf', got \[1\]"),
    (dict(kernel_params=torch.tensor([0.1, 0.2, 0.3])),
     "kernel_params: the rank 4 must be divisible by the number of heads 3"),
    (dict(kernel_params=torch.zeros(0)), "kernel_params: kernel 'piecewise_linear' needs one coefficient per head"),
    (dict(kernel_params=torch.zeros(2, 1)), "kernel_params: expected a 1-D tensor"),
    (dict(kernel_params=torch.tensor([1, 2])), "kernel_params: expected dtype float32, float64, bfloat16 or float16"),
    (dict(kernel_params=torch.tensor([0.1, math.nan])), "kernel_params: expected finite values"),
    (dict(kernel="rbf", kernel_params=torch.tensor([1.0, -0.5])),
     "kernel_params: gamma \\(index 1\\) of kernel 'rbf' must be positive, got -0.5"),
    (dict(kernel="cosine"), "kernel: expected 'linear', 'piecewise_linear' or 'rbf', got 'cosine'"),
    (dict(sparsity=1.0), r"sparsity: expected a value in \[0, 1\), got 1"),
    (dict(block_size=48), "block_size: expected one of 16, 32, 64, 128, got 48"),
    (dict(lora_b=torch.randn(15, 4)), "weight: expected size 15 in dim 1"),
    (dict(lora_a=torch.randn(12, 4, dtype=torch.float64)), "lora_b: expected dtype Double"),
])
def test_bad_input(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        sp.snella_linear(**args)


def test_bad_input_delta_and_bwd():
    args = _good()
    with pytest.raises(RuntimeError, match=r"kernel_params: expected shape \[2\]"):
        sp.snella_delta(args["lora_a"], args["lora_b"], torch.ones(3), "rbf", 0.5)
    gy = torch.randn(4, 11)
    with pytest.raises(RuntimeError, match=r"grad_y: expected shape \[\.\.\., 12\]"):
        torch.ops.lrk.snella_linear_bwd(gy, args["x"].detach(), args["weight"], args["lora_a"].detach(),
                                        args["lora_b"].detach(), args["kernel_params"].detach(), "piecewise_linear",
                                        0.5, 0, True)


def test_layer_bad_input():
    lin = torch.nn.Linear(16, 12)
    with pytest.raises(ValueError, match="gamma: expected a positive number, got 0"):
        SNELLLinear(lin, kernel="rbf", gamma=0.0, learnable_kernel=True)
    with pytest.raises(ValueError, match="scale: expected a finite number"):
        SNELLLinear(lin, scale=math.inf, learnable_kernel=True)
    with pytest.raises(RuntimeError, match="kernel_params: this SNELLLinear was built with learnable_kernel=False"):
        SNELLLinear(lin).kernel_params()
