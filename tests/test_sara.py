"""SaRA: lrk.sparse_grad_linear_* (the op) and lrk.nn.SaRALinear (the layer):
pattern selection, masked gradients vs the dense gradient, gradcheck, training with
AdamW (loss goes down, optimizer state only for trained entries), progressive
reselection, nuclear-norm penalty, export / merge, compile, opcheck, bad input."""
import pytest
import torch
import torch.nn.functional as F

import lrk
import lrk.sparse_ops as sp
from lrk import reference_sparse as ref
from lrk.nn.sara import SaRALinear, apply_delta, apply_sara, attach_sara, merge_sara
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close


def _linear(k, n, dtype=torch.float32, device="cpu", seed=None):
    torch.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    return torch.nn.Linear(k, n).to(device=device, dtype=dtype)


def _dense_masked_grad(layer, x, gy):
    w = layer.weight.detach().double().cpu().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().double().cpu()
    F.linear(x.detach().double().cpu(), w, b).backward(gy.double().cpu())
    rows, cols = layer._coords()
    return w.grad[rows.cpu(), cols.cpu()]


# ----------------------------------------------------------------------------- pattern


def test_fraction_selects_exactly_the_smallest():
    lin = _linear(57, 43, torch.bfloat16)  # bf16: many ties among small magnitudes
    w0 = lin.weight.detach().clone()
    layer = SaRALinear(lin, fraction=0.13)
    k = sp.keep_count(57 * 43, 0.13)
    assert layer.nnz == k == layer.delta.numel()
    want = ref.abs_topk_mask(w0, k, largest=False)
    got = torch.zeros_like(want)
    rows, cols = layer._coords()
    got[rows, cols] = True
    assert torch.equal(got, want)
    assert layer.delta.dtype == torch.float32 and not layer.weight.requires_grad
    assert layer.weight.data_ptr() == lin.weight.data_ptr()  # trained values live in the model's W


def test_threshold_and_block_patterns():
    lin = _linear(70, 50)
    w = lin.weight.detach()
    layer = SaRALinear(lin, threshold=0.02)
    assert layer.nnz == int((w.abs() < 0.02).sum())
    blk = SaRALinear(_linear(70, 50, seed=1), fraction=0.2, block_size=16)
    wb = blk.weight.detach()
    n_tiles = 4 * 5
    assert blk.block_indices.shape == (sp.keep_count(n_tiles, 0.2), 2)
    cut = ref.abs_kth_value(wb, sp.keep_count(wb.numel(), 0.2), largest=False)
    counts = ref.block_scores(wb, 16, "count_below", float(torch.nextafter(cut, torch.tensor(1.0))))
    chosen = counts[blk.block_indices[:, 0], blk.block_indices[:, 1]]
    others = counts.clone()
    others[blk.block_indices[:, 0], blk.block_indices[:, 1]] = -1
    assert chosen.min() >= others.max()  # the tiles richest in small entries
    assert blk.block_indices.tolist() == sorted(blk.block_indices.tolist())  # row-major schedule


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [None, 16, 32])
def test_masked_gradient_matches_dense(device, dtype, block_size):
    layer = SaRALinear(_linear(75, 66, dtype, device), fraction=0.2, block_size=block_size)
    x = torch.randn(3, 11, 75, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert_close(y, F.linear(x.double(), layer.weight.double(), layer.bias.double()), dtype, "forward")
    gy = torch.randn_like(y)
    y.backward(gy)
    want = _dense_masked_grad(layer, x, gy)
    got = layer._delta_values(layer.delta.grad)
    tol = torch.float32 if dtype == torch.bfloat16 else dtype  # fp32 accumulation of bf16 products
    assert_close(got, want, tol, "grad delta", factor=10)
    assert_close(x.grad, (gy.double() @ layer.weight.double()), dtype, "grad x")
    if block_size is not None:  # zero padding of edge tiles gets no gradient
        valid = layer._block_valid()
        assert torch.all(layer.delta.grad[~valid] == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [None, 16])
def test_gradcheck(device, block_size):
    layer = SaRALinear(_linear(20, 18, torch.float64, device), fraction=0.3, block_size=block_size)
    flat = layer._flat_index()
    w0 = layer.weight.detach().clone()
    x = torch.randn(4, 20, dtype=torch.float64, device=device, requires_grad=True)
    delta = (torch.randn_like(layer.delta) * 0.1).requires_grad_()

    def f(x, delta):
        with torch.no_grad():  # the layer's contract: W holds base + delta
            w = w0.clone()
            w.view(-1)[flat] = layer.base_values.view(-1)[layer._valid_positions(layer._block_valid())] + \
                layer._delta_values(delta) if block_size else layer.base_values + delta
        if block_size is None:
            return sp.sparse_grad_linear_csr(x, w, layer.bias, delta, layer.crow_indices, layer.col_indices)
        return sp.sparse_grad_linear_block(x, w, layer.bias, delta, layer.block_indices, block_size)

    assert torch.autograd.gradcheck(f, (x, delta), fast_mode=True)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("block_size", [None, 16])
@pytest.mark.parametrize("fused", [False, True])
def test_training_reduces_loss_and_touches_only_the_pattern(block_size, fused):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 40))
    w_before = [m.weight.detach().clone() for m in model if isinstance(m, torch.nn.Linear)]
    teacher = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.GELU(), torch.nn.Linear(64, 40))
    x = torch.randn(256, 48)
    with torch.no_grad():
        target = model(x) + 0.3 * teacher(x)
    layers = apply_sara(model, fraction=0.15, block_size=block_size)
    assert len(layers) == 2
    params = [p for p in model.parameters() if p.requires_grad]
    assert params == [layer.delta for layer in layers]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01, fused=fused)
    attach_sara(opt, model)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    for layer, w0 in zip(layers, w_before):
        state = opt.state[layer.delta]
        assert state["exp_avg"].shape == layer.delta.shape  # optimizer state ~ trained entries
        changed = (layer.weight.detach() != w0)
        outside = torch.ones_like(changed)
        rows, cols = layer._coords()
        outside[rows, cols] = False
        assert not changed[outside].any()
        assert changed.any()


def test_weight_follows_delta_without_the_hook():
    layer = SaRALinear(_linear(30, 20, torch.float64), fraction=0.2)
    opt = torch.optim.AdamW([layer.delta], lr=0.1)
    x = torch.randn(8, 30, dtype=torch.float64)
    layer(x).sum().backward()
    opt.step()
    y = layer(x)  # notices the in-place update and writes W first
    rows, cols = layer._coords()
    assert torch.equal(layer.weight[rows, cols], layer.base_values + layer.delta.detach())
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias))


def test_progressive_reselection_and_export():
    lin = _linear(40, 36, torch.float64, seed=5)
    original = lin.weight.detach().clone()
    layer = SaRALinear(lin, fraction=0.1, reselect_at=[3])
    opt = torch.optim.AdamW([layer.delta], lr=0.05, weight_decay=0.0)
    attach_sara(opt, layer)
    x = torch.randn(32, 40, dtype=torch.float64)
    first = layer._flat_index().clone()
    for step in range(6):
        layer(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 2:  # right after the third step: a new pattern, fresh delta and state
            assert not torch.equal(layer._flat_index(), first)
            assert torch.all(layer.delta == 0) and layer.delta not in opt.state
    assert layer.step_count == 6
    total = layer.delta_sparse()
    assert total.is_sparse
    torch.testing.assert_close(total.to_dense(), layer.weight.detach() - original, rtol=0, atol=1e-12)
    merged = layer.merge()
    torch.testing.assert_close(merged(x), layer(x))
    fresh = torch.nn.Linear(40, 36).double()
    with torch.no_grad():
        fresh.weight.copy_(original)
        fresh.bias.copy_(lin.bias)
    apply_delta(fresh, total)
    torch.testing.assert_close(fresh.weight, layer.weight, rtol=0, atol=1e-12)
    model = torch.nn.Sequential(layer)
    merge_sara(model)
    assert type(model[0]) is torch.nn.Linear


@pytest.mark.parametrize("block_size", [None, 16])
def test_nuclear_norm_and_subgradient(block_size):
    layer = SaRALinear(_linear(24, 20, torch.float64, seed=2), fraction=0.3, block_size=block_size)
    with torch.no_grad():
        layer.delta.normal_()
        if block_size is not None:
            layer.delta.mul_(layer._block_valid())
    full_rank = min(20, 24)
    val = layer.nuclear_norm(rank=full_rank, oversample=0, power_iters=2, seed=0)
    dense = layer._delta_coo(layer.delta.detach()).to_dense().requires_grad_()
    want = torch.linalg.matrix_norm(dense, "nuc")
    torch.testing.assert_close(val, want.detach(), rtol=1e-8, atol=1e-8)
    val.backward()
    want.backward()
    rows, cols = layer._coords()
    torch.testing.assert_close(layer._delta_values(layer.delta.grad), dense.grad[rows, cols], rtol=1e-6, atol=1e-8)
    # A low-rank estimate is a lower bound that a penalty step decreases.
    est = layer.nuclear_norm(rank=3)
    assert 0 < est.item() <= want.item() + 1e-9


# ----------------------------------------------------------------------------- op checks


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_opcheck_and_compile(device):
    layer = SaRALinear(_linear(40, 36, torch.float32, device), fraction=0.2)
    blk = SaRALinear(_linear(40, 36, torch.float32, device), fraction=0.2, block_size=16)
    x = torch.randn(2, 5, 40, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.lrk.sparse_grad_linear_csr.default,
                          (x, layer.weight, layer.bias, layer.delta, layer.crow_indices, layer.col_indices))
    torch.library.opcheck(torch.ops.lrk.sparse_grad_linear_block.default,
                          (x, blk.weight, blk.bias, blk.delta, blk.block_indices, 16))
    torch._dynamo.reset()

    def step(x):
        return (layer(x).square().sum() + blk(x).sum())

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, (x, layer.delta, blk.delta))
    loss_e = step(x)
    grads_e = torch.autograd.grad(loss_e, (x, layer.delta, blk.delta))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def test_bad_input():
    lin = torch.nn.Linear(20, 18)
    with pytest.raises(ValueError, match="exactly one of fraction or threshold"):
        SaRALinear(lin)
    with pytest.raises(ValueError, match="fraction: expected a value in"):
        SaRALinear(lin, fraction=1.5)
    with pytest.raises(ValueError, match="block_size: expected None or one of"):
        SaRALinear(lin, fraction=0.1, block_size=48)
    x, w = torch.randn(3, 20), torch.randn(18, 20)
    crow, col = sp.mask_to_csr(torch.rand(18, 20) < 0.2)
    with pytest.raises(RuntimeError, match=r"values: expected shape \[" + str(col.numel()) + r"\]"):
        sp.sparse_grad_linear_csr(x, w, None, torch.zeros(col.numel() + 1), crow, col)
    with pytest.raises(RuntimeError, match=r"crow_indices: expected shape \[19\]"):
        sp.sparse_grad_linear_csr(x, w, None, torch.zeros(col.numel()), crow[:-1], col)
    idx = torch.tensor([[0, 0]])
    with pytest.raises(RuntimeError, match=r"values: expected shape \[1, 16, 16\]"):
        sp.sparse_grad_linear_block(x, w, None, torch.zeros(1, 32, 32), idx, 16)
    with pytest.raises(RuntimeError, match="block_size: expected one of"):
        sp.sparse_grad_linear_block(x, w, None, torch.zeros(1, 24, 24), idx, 24)
    with pytest.raises(RuntimeError, match="weight: expected size 20 in dim 1"):
        sp.sparse_grad_linear_block(x, torch.randn(18, 21), None, torch.zeros(1, 16, 16), idx, 16)
