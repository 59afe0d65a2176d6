"""lrk.nn.KronLinear: KPSVD (PiSSA-style) and zero init, training, merge, adaptive-rank
pruning, PEFT LoKr loading, autocast and torch.compile."""
import copy

import pytest
import torch
from torch import nn

import lrk
import lrk.nn.kron
from lrk import reference_kron as ref
from lrk.kron_ops import kron_dense
from lrk.nn.kron import KronLinear
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close


def _base(n_out=20, n_in=24, dtype=torch.float64, device="cpu", bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype, device=device)


def _x(*shape, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_kpsvd_init_keeps_the_output_and_holds_the_principal_part(device, dtype):
    base = _base(dtype=dtype, device=device)
    w0 = base.weight.detach().clone()
    x = _x(3, 7, 24, dtype=dtype, device=device)
    y0 = base(x).detach()
    layer = KronLinear(base, terms=3, factors=(4, 5, 4, 6), scale=2.0)
    assert layer.base_layer is base and not base.weight.requires_grad
    assert_close(layer(x), y0, dtype, "output after init")
    # base + adapter = original weight; the adapter is the best 3-term approximation.
    delta = layer.delta_weight()
    assert_close(base.weight.double() + delta.double(), w0.double(), dtype, "W = residual + principal")
    optimum = ref.kpsvd_error(w0.double().cpu(), 4, 5, 4, 6, 3)
    err = (w0.double().cpu() - delta.double().cpu()).norm()
    assert err <= optimum * (1 + (1e-6 if dtype != torch.bfloat16 else 1e-2))
    assert torch.allclose((layer.scale * layer.kron_sigma).double().cpu(),
                          ref.kpsvd(w0.double().cpu(), 4, 5, 4, 6, 3)[0], rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("factors,terms", [
    ((1, 20, 4, 6), 4),     # m1 = 1, all the terms R(W) [4, 120] has: exact, zero residual
    ((10, 2, 1, 12), 1),    # n1 = 1, one term
    ((2, 10, 8, 3), 6),     # non-square factors
    ((4, 5, 4, 6), 16),     # the maximum number of terms
])
def test_awkward_factorizations(factors, terms):
    """KPSVD init on unbalanced factorisations: output unchanged, adapter = the optimal
    `terms`-term approximation, and a training step reaches every factor."""
    n_out, n_in = factors[0] * factors[1], factors[2] * factors[3]
    base = _base(n_out, n_in)
    w0 = base.weight.detach().clone()
    x = _x(5, n_in)
    y0 = base(x).detach()
    layer = KronLinear(base, terms=terms, factors=factors)
    torch.testing.assert_close(layer(x), y0)
    err = (w0 - layer.delta_weight()).norm()
    torch.testing.assert_close(err, ref.kpsvd_error(w0, *factors, terms), rtol=1e-9, atol=1e-10)
    if terms == min(factors[0] * factors[2], factors[1] * factors[3]):
        assert base.weight.abs().max() < 1e-10  # nothing left in the residual
    layer(x).square().sum().backward()
    for p in (layer.kron_u, layer.kron_v, layer.kron_sigma):
        assert p.grad is not None and p.grad.abs().sum() > 0
    layer.merge()
    torch.testing.assert_close(base.weight, w0)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_init_starts_at_the_base_layer_and_trains_every_factor(device):
    base = _base(device=device)
    ref_base = copy.deepcopy(base)
    layer = KronLinear(base, terms=2, init="zero", seed=3)
    x = _x(9, 24, device=device)
    torch.testing.assert_close(layer(x), ref_base(x))
    torch.testing.assert_close(base.weight, ref_base.weight)  # base untouched
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    target = _x(9, 20, device=device)
    losses = []
    for step in range(3):
        opt.zero_grad()
        loss = (layer(x) - target).square().mean()
        loss.backward()
        if step == 0:  # v = 0: only v has a gradient at first (LoRA's zero-B rule)
            assert layer.kron_v.grad.abs().sum() > 0
            assert layer.kron_u.grad.abs().sum() == 0 and layer.kron_sigma.grad.abs().sum() == 0
        losses.append(loss.item())
        opt.step()
    for p in (layer.kron_u, layer.kron_v, layer.kron_sigma):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


def test_fits_a_kronecker_target():
    """A few Adam steps from zero init learn a 2-term Kronecker update of the base layer."""
    torch.manual_seed(0)
    base = _base(16, 16)
    g = torch.Generator().manual_seed(1)
    du = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    dv = torch.randn(2, 4, 4, generator=g, dtype=torch.float64)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        teacher.weight += 0.3 * kron_dense(du, dv)
    layer = KronLinear(base, terms=2, init="zero")
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = _x(64, 16)
    y = teacher(x).detach()
    first = None
    for _ in range(150):
        opt.zero_grad()
        loss = (layer(x) - y).square().mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
    assert loss.item() < 1e-2 * first


@pytest.mark.parametrize("device", DEVICES)
def test_merge_unmerge(device):
    base = _base(device=device)
    layer = KronLinear(base, terms=2, init="zero")
    with torch.no_grad():
        layer.kron_v.normal_()
    w_before = base.weight.detach().clone()
    x = _x(5, 24, device=device)
    y = layer(x).detach()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(base.weight, w_before + layer.delta_weight())
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, w_before)
    torch.testing.assert_close(layer(x), y)
    merged = layer.merge_and_unload()
    assert merged is base and isinstance(merged, nn.Linear)
    torch.testing.assert_close(merged(x), y)


def _planted_layer(strong=(3.0, 2.0, 1.5), weak=(1e-3, 5e-4), device="cpu"):
    """A KronLinear whose adapter is 3 strong plus 2 weak, non-orthogonal terms."""
    base = _base(device=device)
    layer = KronLinear(base, terms=5, factors=(4, 5, 4, 6), init="zero")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.kron_u.copy_(torch.randn(5, 4, 4, generator=g, dtype=torch.float64))
        layer.kron_v.copy_(torch.randn(5, 5, 6, generator=g, dtype=torch.float64) / 5)
        layer.kron_sigma.copy_(torch.tensor(strong + weak, dtype=torch.float64))
    return layer


def test_prune_all_terms_kept_is_a_rotation():
    layer = _planted_layer()
    x = _x(6, 24)
    y = layer(x).detach()
    spectrum = layer.spectrum()
    assert (spectrum[:-1] >= spectrum[1:]).all() and spectrum.shape == (5,)
    kept = layer.prune("energy", tau=1.0)
    assert kept == 5
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.kron_sigma, spectrum)


@pytest.mark.parametrize("rule", ["energy", "elbow"])
@pytest.mark.parametrize("merge_pruned", [True, False])
def test_prune_drops_the_weak_terms(rule, merge_pruned):
    layer = _planted_layer()
    x = _x(6, 24)
    y = layer(x).detach()
    params = [layer.kron_u, layer.kron_v, layer.kron_sigma]
    opt = torch.optim.Adam(params, lr=1e-3)
    layer(x).sum().backward()
    opt.step()  # optimizer state exists for the old shapes
    with torch.no_grad():
        y = layer(x)
    delta_before = layer.delta_weight()
    w_before = layer.base_layer.weight.detach().clone()
    kept = layer.prune(rule, tau=0.999, merge_pruned=merge_pruned, optimizer=opt)
    assert kept == 3  # both rules: the three strong terms (spectrum ~ 19, 11, 4.6, 4e-3, 1e-3)
    assert layer.terms == kept and layer.kron_u.shape[0] == kept and layer.kron_sigma.shape == (kept,)
    assert [layer.kron_u, layer.kron_v, layer.kron_sigma] == params  # same Parameter objects
    assert all(p not in opt.state for p in params)
    if merge_pruned:
        torch.testing.assert_close(layer(x), y)  # the dropped part moved into the base weight
    else:
        torch.testing.assert_close(layer.base_layer.weight, w_before)
        dropped = (delta_before - layer.delta_weight()).norm() / delta_before.norm()
        assert 0 < dropped < 1e-2  # only the weak terms went away
    opt.zero_grad()
    layer(x).sum().backward()  # training continues with the smaller adapter
    opt.step()


def test_prune_energy_keeps_the_strong_terms():
    layer = _planted_layer()
    assert layer.prune("energy", tau=0.999) == 3
    layer = _planted_layer()
    assert layer.prune("energy", tau=0.5, min_terms=2) == 2
    with pytest.raises(ValueError, match="rule: expected"):
        layer.prune("largest")


# ----------------------------------------------------------------------------- PEFT LoKr


def _peft_lokr(base, r, alpha, decompose_both=False):
    from peft.tuners.lokr import LoKrConfig
    from peft.tuners.lokr.layer import Linear as LoKrLinear
    cfg = LoKrConfig(r=r, alpha=alpha, init_weights=False, decompose_both=decompose_both, target_modules=["proj"])
    return LoKrLinear(base, "default", config=cfg, r=r, alpha=alpha)


@pytest.mark.parametrize("r,decompose_both", [(8, False), (1, True), (2, False)])
def test_loads_peft_lokr(r, decompose_both):
    pytest.importorskip("peft")
    base = _base(20, 24, dtype=torch.float32)
    peft_layer = _peft_lokr(base, r, 4.0, decompose_both)
    x = _x(5, 24, dtype=torch.float32)
    y = peft_layer(x).detach()
    layer = KronLinear.from_peft_lokr(peft_layer)
    assert layer.base_layer is base and layer.terms == 1
    assert_close(layer(x), y, torch.float32, "from_peft_lokr")
    from_sd = KronLinear.from_lokr_state_dict(base, peft_layer.state_dict(), alpha=4.0, r=r)
    assert_close(from_sd(x), y, torch.float32, "from_lokr_state_dict")


def test_lokr_factors_of_the_wrong_shape():
    base = _base(20, 24, dtype=torch.float32)
    sd = {"lokr_w1": torch.randn(3, 4), "lokr_w2": torch.randn(5, 6)}
    with pytest.raises(ValueError, match=r"lokr_w1, lokr_w2: expected kron\(w1, w2\) of the base weight's shape "
                                         r"\(20, 24\), got w1 \(3, 4\) and w2 \(5, 6\), whose Kronecker product is \(15, 24\)"):
        KronLinear.from_lokr_state_dict(base, sd, alpha=1.0, r=1)
    with pytest.raises(KeyError, match="expected lokr_w2 or both lokr_w2_a and lokr_w2_b"):
        KronLinear.from_lokr_state_dict(base, {"lokr_w1": torch.randn(4, 4), "lokr_w2_a": torch.randn(5, 2)},
                                        alpha=1.0, r=2)
    with pytest.raises(ValueError, match="r: expected a positive LoKr rank"):
        KronLinear.from_lokr_state_dict(base, sd, alpha=1.0, r=0)


def test_loads_a_saved_peft_lokr_adapter():
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(24, 20)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = Tiny()
    base_copy = copy.deepcopy(model.proj)
    pm = peft.get_peft_model(model, peft.LoKrConfig(r=8, alpha=16.0, target_modules=["proj"], init_weights=False))
    saved = peft.get_peft_model_state_dict(pm)
    x = torch.randn(4, 24)
    y = pm(x).detach()
    layer = KronLinear.from_lokr_state_dict(base_copy, saved, alpha=16.0, r=8, prefix="base_model.model.proj.")
    assert_close(layer(x), y, torch.float32, "saved adapter")
    with pytest.raises(KeyError, match="no LoKr weights under prefix"):
        KronLinear.from_lokr_state_dict(base_copy, saved, alpha=16.0, r=8, prefix="other.")


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(24, 20)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(20, 12))

    def forward(self, x):
        return self.block(self.proj(x))


def test_load_peft_lokr_on_a_model():
    """A whole saved LoKr adapter (two layers, a per-layer rank and alpha, full and
    decomposed w2) loaded onto a plain copy of the model gives PEFT's output."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _TwoLayers()
    plain = copy.deepcopy(model)
    cfg = peft.LoKrConfig(r=8, alpha=16.0, target_modules=["proj", "1"], rank_pattern={"block.1": 2},
                          alpha_pattern={"1": 3.0}, init_weights=False)
    pm = peft.get_peft_model(model, cfg)
    saved = peft.get_peft_model_state_dict(pm)
    assert any(k.endswith("block.1.lokr_w2_a") for k in saved)  # rank 2: w2 is decomposed there
    x = torch.randn(4, 24)
    y = pm(x).detach()
    for config in (cfg, cfg.to_dict()):
        target = copy.deepcopy(plain)
        layers = lrk.nn.kron.load_peft_lokr(target, saved, config)
        assert set(layers) == {"proj", "block.1"} and target.block[1] is layers["block.1"]
        assert layers["block.1"].scale == 3.0 / 2 and layers["proj"].scale == 16.0 / 8
        assert_close(target(x), y, torch.float32, "load_peft_lokr")
        trainable = {n for n, p in target.named_parameters() if p.requires_grad}
        assert trainable == {f"{m}.kron_{p}" for m in ("proj", "block.1") for p in ("u", "v", "sigma")}
    # A module's own state_dict: keys end in the adapter name, no PEFT prefix.
    target = copy.deepcopy(plain)
    lrk.nn.kron.load_peft_lokr(target, pm.base_model.model.state_dict(), cfg, prefix="")
    assert_close(target(x), y, torch.float32, "load_peft_lokr, module state_dict")


def test_load_peft_lokr_bad_input():
    model = _TwoLayers()
    w = {"lokr_w1": torch.randn(4, 4), "lokr_w2": torch.randn(5, 6)}
    with pytest.raises(ValueError, match="config: expected a LoKrConfig or a dict with 'r' and 'alpha'"):
        lrk.nn.kron.load_peft_lokr(model, {}, {"r": 2})
    with pytest.raises(ValueError, match="state_dict: no LoKr weights"):
        lrk.nn.kron.load_peft_lokr(model, {"proj.weight": torch.randn(20, 24)}, {"r": 2, "alpha": 1})
    with pytest.raises(ValueError, match="state_dict: LoKr weights for 'missing', which _TwoLayers does not have"):
        lrk.nn.kron.load_peft_lokr(model, {f"missing.{k}": t for k, t in w.items()}, {"r": 2, "alpha": 1},
                                   prefix="")
    with pytest.raises(ValueError, match="state_dict: LoKr weights for 'block', a Sequential"):
        lrk.nn.kron.load_peft_lokr(model, {f"block.{k}": t for k, t in w.items()}, {"r": 2, "alpha": 1},
                                   prefix="")
    with pytest.raises(ValueError, match="does not start with prefix 'base_model.model.'"):
        lrk.nn.kron.load_peft_lokr(model, {f"proj.{k}": t for k, t in w.items()}, {"r": 2, "alpha": 1})


# ----------------------------------------------------------------------------- dtypes, compile, arguments


def test_fp32_adapter_on_bf16_base_and_autocast():
    base = _base(dtype=torch.bfloat16)
    layer = KronLinear(base, terms=2, init="zero", dtype=torch.float32)
    with torch.no_grad():
        layer.kron_v.normal_()
    x = _x(4, 24, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.kron_u.grad.dtype == torch.float32 and layer.kron_v.grad.abs().sum() > 0
    expected = ref.kron_linear(x.double(), layer.kron_u.double(), layer.kron_v.double(),
                               layer.kron_sigma.double(), base.weight.double(), base.bias.double(), layer.scale)
    assert_close(y, expected, torch.bfloat16, "bf16 output")
    fp32_layer = KronLinear(_base(dtype=torch.float32), terms=2, init="zero")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fp32_layer(_x(4, 24, dtype=torch.float32))
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    layer = KronLinear(_base(dtype=torch.float32, device=device), terms=3, scale=0.5)
    x = _x(2, 5, 24, dtype=torch.float32, device=device)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss_c = compiled(x).square().sum()
    grads_c = torch.autograd.grad(loss_c, (layer.kron_u, layer.kron_v, layer.kron_sigma))
    loss_e = layer(x).square().sum()
    grads_e = torch.autograd.grad(loss_e, (layer.kron_u, layer.kron_v, layer.kron_sigma))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def test_default_factorization_and_bad_arguments():
    layer = KronLinear(_base(20, 24), terms=2)
    assert layer.factors == (4, 5, 4, 6)
    with pytest.raises(ValueError, match=r"factors: expected \(m1, m2, n1, n2\) with m1\*m2 = out_features = 20"):
        KronLinear(_base(20, 24), terms=1, factors=(4, 4, 4, 6))
    with pytest.raises(ValueError, match=r"terms: expected 1 <= terms <= min\(m1\*n1, m2\*n2\) = 16"):
        KronLinear(_base(20, 24), terms=17)
    with pytest.raises(ValueError, match="init: expected"):
        KronLinear(_base(20, 24), terms=1, init="pissa")
    with pytest.raises(ValueError, match="scale: expected"):
        KronLinear(_base(20, 24), terms=1, scale=0.0)
    with pytest.raises(TypeError, match="base: expected an nn.Linear"):
        KronLinear(nn.Conv1d(2, 2, 1), terms=1)


def test_apply_and_prune_on_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 12))
    x = torch.randn(5, 16)
    y = model(x).detach()
    lrk.nn.kron.apply_kron(model, ["0", "2"], terms=4)
    assert isinstance(model[0], KronLinear) and isinstance(model[2], KronLinear)
    assert model[0].factors == (4, 8, 4, 4) and model[2].factors == (3, 4, 4, 8)
    torch.testing.assert_close(model(x), y)  # KPSVD init keeps the output
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.kron_{p}" for i in (0, 2) for p in ("u", "v", "sigma")}
    kept = lrk.nn.kron.prune_kron(model, "energy", tau=0.5, merge_pruned=True)
    assert set(kept) == {"0", "2"} and all(1 <= k <= 4 for k in kept.values())
    torch.testing.assert_close(model(x), y)  # the pruned part went into the base weights
    with pytest.raises(ValueError, match="no module of Sequential matches"):
        lrk.nn.kron.apply_kron(model, ["q_proj"], terms=2)
    with pytest.raises(ValueError, match="'1' matches but is a ReLU, only nn.Linear can be adapted"):
        lrk.nn.kron.apply_kron(model, ["1"], terms=2)
