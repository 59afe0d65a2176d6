"""lrk.nn.LoRALinear and apply_lora: values and gradients vs a float64 evaluation of
the same math, PEFT-style init and scaling, merge/unmerge, dropout seeding, state
dict names, model surgery, argument checks, torch.compile."""
import math

import pytest
import torch
from torch import nn

from lrk import reference as ref
from lrk.nn import LoRALinear, apply_lora
from helpers import assert_close

HAS_DORA = hasattr(torch.ops.lrk, "dora_fused")
DORA_SKIP = pytest.mark.skipif(not HAS_DORA, reason="this lrk build has no dora_fused yet")
DORA = [pytest.param(False, id="lora"), pytest.param(True, id="dora", marks=DORA_SKIP)]

IN, OUT, R = 37, 29, 3  # awkward sizes on purpose


def _layer(use_dora=False, dtype=torch.float32, bias=True, **kw):
    base = nn.Linear(IN, OUT, bias=bias, dtype=dtype)
    layer = LoRALinear(base, R, lora_alpha=kw.pop("lora_alpha", 5), use_dora=use_dora, **kw)
    with torch.no_grad():  # a non-zero adapter, and a magnitude that is not the plain norm
        layer.lora_B.normal_(0, 0.3)
        if use_dora:
            layer.lora_magnitude_vector.mul_(torch.empty_like(layer.lora_magnitude_vector).uniform_(0.5, 1.5))
    return layer


def _reference(layer, x, dropout_p=0.0, seed=0):
    """float64 leaves of (x, A, B, m) and the float64 output of the layer's math."""
    leaves = {"x": x, "lora_A": layer.lora_A, "lora_B": layer.lora_B}
    if layer.use_dora:
        leaves["lora_magnitude_vector"] = layer.lora_magnitude_vector
    leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    w = layer.base_layer.weight.detach().double()
    b = None if layer.base_layer.bias is None else layer.base_layer.bias.detach().double()
    x64, a, bb = leaves["x"], leaves["lora_A"], leaves["lora_B"]
    if layer.use_dora:
        norm = torch.linalg.vector_norm(w + layer.scaling * bb @ a, dim=1).detach()
        g = leaves["lora_magnitude_vector"] / norm
        y = g * (x64 @ w.t() + layer.scaling * (ref.dropout(x64, dropout_p, seed) @ a.t()) @ bb.t())
        y = y if b is None else y + b
    else:
        y = ref.lora_fused(x64, w, b, a, bb, layer.scaling, dropout_p, seed)
    return leaves, y


@pytest.mark.parametrize("use_dora", DORA)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64_math(use_dora, dtype, dropout_p, use_rslora, bias):
    layer = _layer(use_dora, dtype, bias=bias, lora_dropout=dropout_p, use_rslora=use_rslora).train()
    x = torch.randn(2, 5, IN, dtype=dtype, requires_grad=True)
    # The layer draws its seed from the default generator: replay that draw.
    torch.manual_seed(1234)
    seed = int(torch.randint(0, 2**62, ()).item()) if dropout_p > 0 else 0
    torch.manual_seed(1234)
    y = layer(x)
    leaves, y_ref = _reference(layer, x, dropout_p, seed)
    assert y.shape == (2, 5, OUT) and y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    gy = torch.randn_like(y_ref)
    y.backward(gy.to(dtype))
    y_ref.backward(gy)
    tensors = {"x": x, **{n: p for n, p in layer.named_parameters() if p.requires_grad}}
    assert set(tensors) == set(leaves)
    for name, t in tensors.items():
        assert t.grad is not None and t.grad.dtype == dtype, name
        assert_close(t.grad, leaves[name].grad, dtype, f"grad {name}")
    assert layer.base_layer.weight.grad is None
    assert bias is False or layer.base_layer.bias.grad is None


@pytest.mark.parametrize("use_dora", DORA)
def test_fresh_layer_is_the_base_layer(use_dora):
    base = nn.Linear(IN, OUT)
    layer = LoRALinear(base, R, lora_alpha=16, use_dora=use_dora)
    x = torch.randn(7, IN)
    assert torch.count_nonzero(layer.lora_B) == 0
    if use_dora:
        torch.testing.assert_close(layer.lora_magnitude_vector, base.weight.detach().norm(dim=1))
    assert_close(layer(x), base(x), torch.float32, "y at init")


def test_default_init_statistics():
    """A ~ kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in)); B = 0."""
    fan_in = 400
    layer = LoRALinear(nn.Linear(fan_in, 300), 64)
    a = layer.lora_A.detach()
    bound = 1 / math.sqrt(fan_in)
    assert a.abs().max() <= bound
    assert abs(a.var().item() / (bound**2 / 3) - 1) < 0.05
    assert abs(a.mean().item()) < 0.05 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert not layer.base_layer.weight.requires_grad and not layer.base_layer.bias.requires_grad


def test_gaussian_init_statistics():
    r = 4
    layer = LoRALinear(nn.Linear(2500, 50), r, init_lora_weights="gaussian")
    a = layer.lora_A.detach()
    assert abs(a.std().item() * r - 1) < 0.05
    assert abs(a.mean().item()) < 0.05 / r
    assert torch.count_nonzero(layer.lora_B) == 0


def test_init_false_gives_a_nonzero_adapter():
    layer = LoRALinear(nn.Linear(IN, OUT), R, init_lora_weights=False)
    assert torch.count_nonzero(layer.lora_B) == layer.lora_B.numel()


@pytest.mark.parametrize("r,alpha", [(3, 5), (16, 32), (1, 2)])
def test_scaling_and_rslora(r, alpha):
    base = nn.Linear(IN, OUT)
    assert LoRALinear(base, r, lora_alpha=alpha).scaling == pytest.approx(alpha / r)
    rs = LoRALinear(nn.Linear(IN, OUT), r, lora_alpha=alpha, use_rslora=True)
    assert rs.scaling == pytest.approx(alpha / math.sqrt(r))


@pytest.mark.parametrize("use_dora", DORA)
def test_merge_unmerge_round_trip(use_dora):
    layer = _layer(use_dora).eval()
    w0 = layer.base_layer.weight.detach().clone()
    params0 = {n: p.detach().clone() for n, p in layer.named_parameters() if p.requires_grad}
    x = torch.randn(3, 4, IN)
    y0 = layer(x)
    layer.merge()
    assert layer.merged
    assert not torch.allclose(layer.base_layer.weight, w0)
    assert_close(layer(x), y0, torch.float32, "merged forward")
    assert_close(layer.base_layer(x), y0, torch.float32, "merged base alone")
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.base_layer.weight, w0, torch.float32, "weight after unmerge")
    for n, p in layer.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, params0[n]), n
    assert_close(layer(x), y0, torch.float32, "unmerged forward")
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


@pytest.mark.parametrize("use_dora", DORA)
def test_eval_mode_ignores_dropout(use_dora):
    layer = _layer(use_dora, lora_dropout=0.5).eval()
    x = torch.randn(6, IN)
    state = torch.get_rng_state()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(torch.get_rng_state(), state), "eval forward must not draw a seed"
    assert torch.equal(y1, y2)
    _, y_ref = _reference(layer, x, 0.0)
    assert_close(y1, y_ref, torch.float32, "eval y")


@pytest.mark.parametrize("use_dora", DORA)
def test_train_dropout_seeding(use_dora):
    layer = _layer(use_dora, lora_dropout=0.4).train()
    x = torch.randn(8, IN)
    torch.manual_seed(7)
    y_a = layer(x)
    torch.manual_seed(7)
    y_b = layer(x)
    y_c = layer(x)  # the next call draws another seed
    torch.manual_seed(8)
    y_d = layer(x)
    assert torch.equal(y_a, y_b)
    assert not torch.allclose(y_b, y_c)
    assert not torch.allclose(y_a, y_d)


@pytest.mark.parametrize("use_dora", DORA)
def test_activation_checkpointing_replays_the_seed(use_dora):
    """torch.utils.checkpoint restores the CPU RNG state before recomputing, so the
    recomputed forward draws the same seed and backward sees the same mask."""
    from torch.utils.checkpoint import checkpoint

    layer = _layer(use_dora, lora_dropout=0.5).train()
    x = torch.randn(10, IN, requires_grad=True)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    torch.manual_seed(21)
    grads_plain = torch.autograd.grad(layer(x).square().sum(), params)
    torch.manual_seed(21)
    y = checkpoint(layer, x, use_reentrant=False)
    torch.manual_seed(99)  # whatever happens to the generator between forward and backward
    grads_ckpt = torch.autograd.grad(y.square().sum(), params)
    for gp, gc in zip(grads_plain, grads_ckpt):
        torch.testing.assert_close(gc, gp)


@pytest.mark.parametrize("use_dora", DORA)
def test_state_dict_names(use_dora):
    layer = LoRALinear(nn.Linear(IN, OUT), R, use_dora=use_dora)
    expected = {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}
    if use_dora:
        expected.add("lora_magnitude_vector")
    sd = layer.state_dict()
    assert set(sd) == expected
    assert sd["lora_A"].shape == (R, IN) and sd["lora_B"].shape == (OUT, R)
    if use_dora:
        assert sd["lora_magnitude_vector"].shape == (OUT,)
    other = LoRALinear(nn.Linear(IN, OUT), R, use_dora=use_dora)
    other.load_state_dict(sd)
    x = torch.randn(2, IN)
    torch.testing.assert_close(other(x), layer(x))


def test_extra_repr_and_drop_in_attributes():
    layer = LoRALinear(nn.Linear(IN, OUT), R, lora_alpha=6, lora_dropout=0.1)
    text = repr(layer)
    for part in ("r=3", "in_features=37", "out_features=29", "scaling=2", "lora_dropout=0.1", "merged=False"):
        assert part in text, (part, text)
    assert layer.in_features == IN and layer.out_features == OUT
    assert layer.weight is layer.base_layer.weight and layer.bias is layer.base_layer.bias


@pytest.mark.parametrize("use_dora", DORA)
def test_autocast_bf16(use_dora):
    """Under CPU autocast the fused op runs in bf16; fp32 adapter params get fp32 grads."""
    layer = _layer(use_dora)
    x = torch.randn(9, IN, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    leaves, y_ref = _reference(layer, x)
    assert_close(y, y_ref, torch.bfloat16, "y")
    y.float().sum().backward()
    y_ref.sum().backward()
    for name in leaves.keys() - {"x"}:
        g = getattr(layer, name).grad
        assert g.dtype == torch.float32
        assert_close(g, leaves[name].grad, torch.bfloat16, f"grad {name}")


# ----------------------------------------------------------------------------- apply_lora


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(IN, OUT)
        self.k_proj = nn.Linear(IN, OUT)
        self.v_proj = nn.Linear(IN, OUT, bias=False)
        self.norm = nn.LayerNorm(OUT)
        self.out = nn.Linear(OUT, 5)

    def forward(self, x):
        return self.out(self.norm(self.q_proj(x) + self.k_proj(x) * self.v_proj(x)))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Sequential(nn.Linear(IN, IN), nn.ReLU(), nn.Linear(IN, IN))

    def forward(self, x):
        x = self.head(x)
        return sum(block(x) for block in self.layers)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_apply_lora_by_names():
    model = _Model()
    x = torch.randn(4, IN)
    y0 = model(x)
    out = apply_lora(model, ["q_proj", "v_proj"], r=R, lora_alpha=8)
    assert out is model
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert _trainable(model) == {f"{n}.{p}" for n in adapted for p in ("lora_A", "lora_B")}
    assert all(m.scaling == pytest.approx(8 / R) for m in model.modules() if isinstance(m, LoRALinear))
    assert_close(model(x), y0, torch.float32, "zero-initialised adapters change nothing")
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_apply_lora_on_sequential_with_regex_and_dora():
    model = nn.Sequential(nn.Linear(IN, OUT), nn.GELU(), nn.Linear(OUT, OUT), nn.Linear(OUT, 3))
    kwargs = dict(use_dora=True) if HAS_DORA else {}
    apply_lora(model, r"[02]", r=2, lora_alpha=4, lora_dropout=0.1, use_rslora=True, **kwargs)
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear)
    assert type(model[3]) is nn.Linear
    assert model[0].lora_dropout == 0.1 and model[0].scaling == pytest.approx(4 / math.sqrt(2))
    expected = {f"{i}.{p}" for i in (0, 2) for p in ("lora_A", "lora_B")}
    if HAS_DORA:
        expected |= {"0.lora_magnitude_vector", "2.lora_magnitude_vector"}
    assert _trainable(model) == expected
    model(torch.randn(2, IN)).sum().backward()


def test_apply_lora_errors():
    with pytest.raises(ValueError, match="target_modules: no module"):
        apply_lora(_Model(), ["o_proj"], r=R)
    with pytest.raises(ValueError, match="target_modules: no module"):
        apply_lora(_Model(), "proj", r=R)  # a regex must match the whole name, as in PEFT
    with pytest.raises(ValueError, match="target_modules: 'layers.0.norm' .* LayerNorm"):
        apply_lora(_Model(), ["norm"], r=R)
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(_Model(), [], r=R)
    model = apply_lora(_Model(), ["q_proj"], r=R)
    with pytest.raises(ValueError, match="already has a LoRALinear adapter"):
        apply_lora(model, ["q_proj"], r=R)
    with pytest.raises(ValueError, match="r: rank 40"):  # bad LoRALinear arguments surface too
        apply_lora(_Model(), ["k_proj"], r=40)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(r=0), "r: expected a rank of at least 1"),
        (dict(r=-2), "r: expected a rank of at least 1"),
        (dict(r=30), r"r: rank 30 is larger than min\(in_features, out_features\)"),
        (dict(r=2.0), "r: expected an int"),
        (dict(lora_dropout=1.0), r"lora_dropout: expected a probability in \[0, 1\)"),
        (dict(lora_dropout=-0.1), "lora_dropout: expected a probability"),
        (dict(lora_alpha=float("nan")), "lora_alpha: expected a finite number"),
        (dict(init_lora_weights="pissa"), "init_lora_weights: expected True, False or 'gaussian'"),
        (dict(base=nn.Conv1d(IN, OUT, 1)), "base: expected an nn.Linear, got Conv1d"),
        (dict(base=nn.Embedding(10, IN)), "base: expected an nn.Linear, got Embedding"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    args = dict(base=nn.Linear(IN, OUT), r=R)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        LoRALinear(**args)


@pytest.mark.parametrize("use_dora", DORA)
def test_torch_compile_eval_fullgraph(use_dora):
    torch._dynamo.reset()
    layer = _layer(use_dora, lora_dropout=0.2).eval()
    x = torch.randn(3, 5, IN, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_c = compiled(x)
    y_e = layer(x)
    torch.testing.assert_close(y_c, y_e)
    params = [x] + [p for p in layer.parameters() if p.requires_grad]
    grads_c = torch.autograd.grad(y_c.square().sum(), params)
    grads_e = torch.autograd.grad(y_e.square().sum(), params)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
