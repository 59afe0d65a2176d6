"""lrk.nn.init (PiSSA, LoRA-GA, LoRA-One, EVA) on lrk LoRALinear and PEFT LoRA
layers: the subspaces found against the exact float64 SVD, PEFT equivalence (same
residual weight and adapter up to the SVD's sign per triplet), the model's output
at init, EVA's rank budget, bad input."""
import copy

import pytest
import torch
from torch import nn

import lrk
from lrk import reference_spectral as ref
from lrk.nn import LoRALinear, init as li

peft = pytest.importorskip("peft")
from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights  # noqa: E402


def spectral_weight(n, k, decay=0.85, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = min(n, k)
    u = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(k, m, generator=g, dtype=torch.float64))[0]
    return ((u * decay ** torch.arange(m, dtype=torch.float64)) @ v.t()).float()


class MLP(nn.Module):
    def __init__(self, k=48, hidden=40, n=24, seed=0, classes=3):
        super().__init__()
        torch.manual_seed(seed)
        self.up = nn.Linear(k, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, n)
        self.head = nn.Linear(n, classes)
        with torch.no_grad():
            self.up.weight.copy_(spectral_weight(hidden, k, seed=seed + 1) * 3)
            self.down.weight.copy_(spectral_weight(n, hidden, seed=seed + 2) * 3)

    def forward(self, x):
        return self.head(self.down(self.act(self.up(x))))


def peft_model(base, **kw):
    cfg = dict(r=4, lora_alpha=8, target_modules=["up", "down"])
    cfg.update(kw)
    return get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))


def adapters(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def align(a, b, a_ref, b_ref):
    """Flip each triplet of (a rows, b columns) to the signs of the reference's."""
    sign = torch.sign((a * a_ref).sum(1))
    return a * sign.unsqueeze(1), b * sign.unsqueeze(0)


# ----------------------------------------------------------------------------- PiSSA

@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_exact_equals_peft_pissa(use_rslora):
    base = MLP()
    ours = peft_model(base, use_rslora=use_rslora)
    theirs = peft_model(base, use_rslora=use_rslora, init_lora_weights="pissa")
    assert li.pissa_(ours, method="exact") == list(adapters(ours))
    for name, mine in adapters(ours).items():
        other = adapters(theirs)[name]
        a, b = mine.lora_A["default"].weight, mine.lora_B["default"].weight
        a_ref, b_ref = other.lora_A["default"].weight, other.lora_B["default"].weight
        a, b = align(a, b, a_ref, b_ref)
        torch.testing.assert_close(a, a_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(b, b_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(mine.base_layer.weight, other.base_layer.weight, atol=1e-5, rtol=0)
    # Same state dict layout: saves and loads like PEFT's.
    sd, sd_ref = ours.state_dict(), theirs.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in sd_ref.items()}
    assert all(sd[k].dtype == sd_ref[k].dtype for k in sd)


def test_pissa_peft_model_saves_and_loads(tmp_path):
    from peft import PeftModel
    base = MLP()
    ours = peft_model(base)
    li.pissa_(ours)
    ours.save_pretrained(tmp_path / "adapter")
    residual = copy.deepcopy(ours).merge_and_unload()  # W_res + s B A = W: the base model again
    x = torch.randn(4, 48)
    torch.testing.assert_close(residual(x), base(x), atol=1e-5, rtol=1e-5)
    # The usual PiSSA flow: the residual base is saved with the adapter and both load back.
    res_base = copy.deepcopy(base)
    for name, mine in adapters(ours).items():
        res_base.get_submodule(name.rsplit(".", 1)[-1]).weight.data = mine.base_layer.weight.detach().clone()
    loaded = PeftModel.from_pretrained(res_base, tmp_path / "adapter")
    torch.testing.assert_close(loaded(x), ours(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loaded(x), base(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_pissa_keeps_the_output_and_finds_the_principal_subspace(dtype):
    base = MLP().to(dtype)
    model = copy.deepcopy(base)
    model.up = LoRALinear(model.up, r=6, lora_alpha=12)
    model.down = LoRALinear(model.down, r=6, lora_alpha=12)
    w_up = base.up.weight.detach().double()
    li.pissa_(model)  # randomized, the default
    x = torch.randn(5, 48, dtype=dtype)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(model(x), base(x), atol=tol, rtol=tol)
    # residual + adapter = W, and the adapter spans W's top-6 right singular subspace
    delta = model.up.scaling * model.up.lora_B.double() @ model.up.lora_A.double()
    torch.testing.assert_close(model.up.base_layer.weight.double() + delta, w_up, atol=tol * 10, rtol=0)
    if dtype != torch.bfloat16:
        assert ref.captured_energy(w_up, model.up.lora_A.detach(), 6) >= 0.999


def test_pissa_randomized_on_a_peft_model_matches_the_exact_one():
    base = MLP()
    exact, fast = peft_model(base, init_lora_weights="pissa"), peft_model(base)
    li.pissa_(fast, method="randomized", oversample=8, power_iters=2)
    for name, mine in adapters(fast).items():
        other = adapters(exact)[name]
        delta = mine.lora_B["default"].weight @ mine.lora_A["default"].weight
        delta_ref = other.lora_B["default"].weight @ other.lora_A["default"].weight
        torch.testing.assert_close(delta, delta_ref, atol=5e-4, rtol=1e-3)  # entries up to ~3


def test_pissa_bad_input():
    small = peft_model(MLP(), target_modules=["up", "head"])  # head is 3 x 24: r = 4 > 3
    with pytest.raises(ValueError, match=r"head: r = 4 exceeds min\(out_features, in_features\) = 3"):
        li.pissa_(small)
    pm = peft_model(MLP())
    with pytest.raises(ValueError, match="head.*without a LoRA adapter.*PEFT did not adapt it"):
        li.pissa_(pm, targets=["head"])
    with pytest.raises(ValueError, match="no module of .* is named 'nothing'"):
        li.pissa_(pm, targets=["nothing"])
    with pytest.raises(ValueError, match="method: expected"):
        li.pissa_(pm, method="qr")
    with pytest.raises(ValueError, match="no LoRA layer"):
        li.pissa_(MLP())
    with pytest.raises(ValueError, match="adapter_name: no LoRA layer of .* has an adapter 'other'"):
        li.pissa_(pm, adapter_name="other")


# ----------------------------------------------------------------------------- LoRA-GA, LoRA-One

def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 48, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def train_step_of(model, data):
    def step():
        for x, y in data:
            nn.functional.cross_entropy(model(x), y).backward()
    return step


def exact_mean_gradients(base, data):
    model = copy.deepcopy(base)
    for x, y in data:
        nn.functional.cross_entropy(model(x), y).backward()
    return {"up": model.up.weight.grad.double() / len(data), "down": model.down.weight.grad.double() / len(data)}


@pytest.mark.parametrize("exact", [False, True])
def test_gradient_svds_find_the_gradient_subspace(exact):
    # 3 batches of 5 tokens: G has rank <= 15 < the sketch's 24 columns, so its
    # top singular triplets come out exactly (the sketch's accuracy on decaying
    # spectra is test_spectral_ops' concern).
    base = MLP(k=200, hidden=160, n=24)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 200, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(3)]
    grads = exact_mean_gradients(base, data)
    model = peft_model(base, r=4)
    params_before = {n: p.requires_grad for n, p in model.named_parameters()}
    out = li.gradient_svds(model, train_step_of(model, data), 8, exact=exact)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == params_before
    assert all(p.grad is None for p in model.parameters())  # no weight gradient was formed
    for view, u, s, vh, nbytes in out:
        g = grads[view.name.rsplit(".", 1)[-1]]
        torch.testing.assert_close(s.double(), torch.linalg.svdvals(g)[:8], atol=1e-7, rtol=1e-4)
        assert ref.captured_energy(g, vh, 8) >= 0.999
        n, k = g.shape
        if exact or n * k <= (n + k) * 3 * 24:
            assert nbytes == n * k * 4
        else:  # the two-sided sketch: O((N + K) * sketch), below N * K
            assert nbytes == 4 * (n * 24 + k * 49 + k * 24 + n * 49) < n * k * 4


@pytest.mark.parametrize("direction", ["ArBr", "A2rBr", "ArB2r"])
@pytest.mark.parametrize("scale", ["stable", "gd_scale", "unit"])
def test_lora_ga_equals_peft_lora_ga(direction, scale):
    from peft import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga
    # Layers of min(N, K) <= 4r, where PEFT's svd_lowrank(G, q=4r) is exact too;
    # 10 classes, so that the gradients have rank > 2r.
    base, data = MLP(hidden=12, n=10, classes=10), batches(3)
    cfg = LoraConfig(r=3, lora_alpha=6, target_modules=["up", "down"], init_lora_weights="lora_ga",
                     lora_ga_config=LoraGAConfig(direction=direction, scale=scale))
    theirs_base = copy.deepcopy(base)
    preprocess_loraga(theirs_base, cfg, train_step_of(theirs_base, data))
    torch.manual_seed(0)
    theirs = get_peft_model(theirs_base, cfg)
    ours = peft_model(base, r=3, lora_alpha=6)
    li.lora_ga_(ours, train_step_of(ours, data), direction=direction, scale=scale, exact=True)
    x = torch.randn(4, 48)
    torch.testing.assert_close(ours(x), base(x), atol=1e-5, rtol=1e-5)  # output unchanged at init
    for name, mine in adapters(ours).items():
        other = adapters(theirs)[name]
        a, b = mine.lora_A["default"].weight, mine.lora_B["default"].weight
        a_ref, b_ref = other.lora_A["default"].weight, other.lora_B["default"].weight
        # A's rows and B's columns are different singular vectors: align each separately.
        a = a * torch.sign((a * a_ref).sum(1, keepdim=True))
        b = b * torch.sign((b * b_ref).sum(0, keepdim=True))
        torch.testing.assert_close(a, a_ref, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(b, b_ref, atol=1e-4, rtol=1e-3)
        w = mine.base_layer.weight
        torch.testing.assert_close(w + mine.scaling["default"] * mine.lora_B["default"].weight @
                                   mine.lora_A["default"].weight, base.get_submodule(name.split(".")[-1]).weight,
                                   atol=1e-6, rtol=0)


def test_lora_one_is_a_best_rank_r_gradient_step():
    base, data = MLP(), batches(3)
    grads = exact_mean_gradients(base, data)
    model = copy.deepcopy(base)
    model.up = LoRALinear(model.up, r=4, lora_alpha=8, use_rslora=True)
    model.down = LoRALinear(model.down, r=4, lora_alpha=8, use_rslora=True)
    li.lora_one_(model, train_step_of(model, data), stable_gamma=64)
    for name in ("up", "down"):
        layer = getattr(model, name)
        u, s, vh = torch.linalg.svd(grads[name], full_matrices=False)
        best = (u[:, :4] * s[:4]) @ vh[:4]
        step = layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
        torch.testing.assert_close(step, -(layer.scaling / 64) * best, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.base_layer.weight, getattr(base, name).weight)  # base kept
    model2 = copy.deepcopy(base)
    model2.up = LoRALinear(model2.up, r=4)
    li.lora_one_(model2, train_step_of(model2, data), subtract_from_base=True)
    x = torch.randn(3, 48)
    torch.testing.assert_close(model2(x), base(x), atol=1e-5, rtol=1e-5)


def test_gradient_init_bad_input():
    model = MLP()
    model.head = LoRALinear(model.head, r=2)  # LoRA-GA needs 2r = 4 > min(3, 24) triplets
    with pytest.raises(ValueError, match=r"head: the number of gradient singular triplets needed = 4 exceeds"):
        li.lora_ga_(model, lambda: None)
    pm = peft_model(MLP())
    with pytest.raises(RuntimeError, match="train_step ran no backward pass"):
        li.lora_one_(pm, lambda: None)
    with pytest.raises(ValueError, match="direction"):
        li.lora_ga_(pm, lambda: None, direction="BA")
    with pytest.raises(ValueError, match="stable_gamma"):
        li.lora_one_(pm, lambda: None, stable_gamma=0)


# ----------------------------------------------------------------------------- EVA

class Encoder(nn.Module):
    """Inputs with a clear spectrum (a few strong directions), q/k/v sharing one input."""

    def __init__(self, k=32):
        super().__init__()
        torch.manual_seed(1)
        self.q, self.k, self.v = nn.Linear(k, k), nn.Linear(k, k), nn.Linear(k, k)
        self.o = nn.Linear(k, k)
        self.ff = nn.Linear(k, 2 * k)

    def forward(self, x):
        h = self.o(torch.tanh(self.q(x) + self.k(x) * self.v(x)))
        return self.ff(h)


def eva_data(k=32, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * (0.6 ** torch.arange(k)).unsqueeze(1)
    return [torch.randn(64, k, generator=g) @ mix + 0.3 for _ in range(n)]


def eva_config(**kw):
    return LoraConfig(r=3, lora_alpha=6, target_modules=["q", "k", "v", "o", "ff"], init_lora_weights="eva",
                      eva_config=EvaConfig(**kw))


def test_eva_equals_peft_eva_on_a_clear_spectrum():
    base, data = Encoder(), eva_data()
    theirs = get_peft_model(copy.deepcopy(base), eva_config(rho=2.0, tau=0.99))
    initialize_lora_eva_weights(theirs, data, forward_fn=lambda m, b: m(b), prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    ours = get_peft_model(copy.deepcopy(base), eva_config(rho=2.0, tau=0.99))
    ranks = li.eva_(ours, data)
    assert sum(ranks.values()) == 5 * 3  # the budget
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    assert ours.peft_config["default"].alpha_pattern == theirs.peft_config["default"].alpha_pattern
    for name, mine in adapters(ours).items():
        a, a_ref = mine.lora_A["default"].weight, adapters(theirs)[name].lora_A["default"].weight
        assert a.shape == a_ref.shape
        cos = (a * a_ref).sum(1)  # same sign rule: no alignment
        assert bool((cos[:2] > 0.99).all()), (name, cos)
        assert not mine.lora_B["default"].weight.any()


def test_eva_on_lrk_layers_redistributes_the_budget_by_explained_variance():
    base, data = Encoder(), eva_data()
    model = copy.deepcopy(base)
    for name in ("q", "k", "v", "o", "ff"):
        setattr(model, name, LoRALinear(getattr(model, name), r=3, lora_alpha=6))
    ranks = li.eva_(model, data, rho=2.0)
    assert sum(ranks.values()) == 15 and max(ranks.values()) <= 6
    assert ranks["q"] >= ranks["k"] and ranks["q"] >= ranks["v"]  # the group's leader keeps the largest
    # components against the exact PCA of the centred inputs of q
    x = torch.cat(data).double()
    x = x - x.mean(0)
    vh = torch.linalg.svd(x, full_matrices=False)[2]
    for name in ("q", "o", "ff"):
        layer = getattr(model, name)
        if isinstance(layer, LoRALinear):
            assert layer.r == ranks[name] and layer.lora_alpha == pytest.approx(6 * ranks[name] / 3)
            assert layer.scaling == pytest.approx(2.0)
    # EVA stops once consecutive estimates agree (tau 0.99), before it has seen all
    # 12 batches: the leading components still agree with the PCA of all of them.
    a = model.q.lora_A.double()
    assert ((a @ vh[: a.shape[0]].t()).diagonal().abs() > 0.99).all()
    y = model(data[0])
    assert torch.allclose(y, base(data[0]), atol=1e-6)  # B = 0: the output is the base model's


def test_eva_bad_input():
    base = Encoder()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, target_modules=["q"]))
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        li.eva_(pm, eva_data(n=2))
    pm = get_peft_model(copy.deepcopy(base), eva_config())
    with pytest.raises(ValueError, match="dataloader: is empty"):
        li.eva_(pm, [])
    with pytest.raises(ValueError, match=r"round\(r \* rho\) = 60 exceeds"):
        li.eva_(pm, eva_data(n=2), rho=20.0)
    with pytest.raises(ValueError, match="rho"):
        li.eva_(pm, eva_data(n=2), rho=0.5)


def test_eva_early_exit_changes_nothing_but_the_work():
    base, data = Encoder(), eva_data()
    results = []
    for early_exit in (False, True):
        model = copy.deepcopy(base)
        for name in ("q", "k", "v", "o", "ff"):
            setattr(model, name, LoRALinear(getattr(model, name), r=3, lora_alpha=6))
        calls = []
        model.ff.register_forward_hook(lambda m, a, o: calls.append(1))
        ranks = li.eva_(model, data, early_exit=early_exit)
        results.append((ranks, {n: m.lora_A.detach().clone() for n, m in model.named_children()
                                if isinstance(m, LoRALinear)}, len(calls)))
    (r0, a0, c0), (r1, a1, c1) = results
    assert r0 == r1 and all(torch.equal(a0[n], a1[n]) for n in a0)
    assert c1 < c0  # ff runs last: skipped once it has converged and an earlier layer has not
