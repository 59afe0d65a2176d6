"""SNELLA's across-layer budget: lrk.nn.allocate_snell_budget (sums to the budget,
respects the bounds, follows the scores by water filling, deterministic, sets each
layer's sparsity to keep exactly its share), SNELLImportance (the EMAs by hand) and
the cubic schedule; bad input names the argument."""
import math

import pytest
import torch

import lrk
import lrk.sparse_ops as sp
from lrk.nn.snell import apply_snell
from lrk.nn.snell_budget import SNELLImportance, allocate_snell_budget, snell_budget_schedule, snell_layers

SHAPES = [(40, 30), (17, 64), (64, 64), (9, 5), (33, 21)]  # (in, out) of each layer


def _model(block_size=0, shapes=SHAPES, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(k, n) for k, n in shapes])
    apply_snell(model, rank=4, kernel="linear", sparsity=0.9, block_size=block_size)
    return model


def _sizes(model):
    return {name: m.in_features * m.out_features for name, m in snell_layers(model).items()}


def _kept(model):
    return {name: sp.keep_count(m.in_features * m.out_features, 1.0 - m.sparsity)
            for name, m in snell_layers(model).items()}


@pytest.mark.parametrize("total,bounds", [(0.05, (0.0, 1.0)), (0.3, (0.0, 1.0)), (0.77, (0.0, 1.0)), (1.0, (0.0, 1.0)),
                                          (0.05, (0.02, 0.6)), (0.3, (0.02, 0.6)), (0.59, (0.02, 0.6))])
def test_sums_to_budget_within_bounds_and_sets_sparsity(total, bounds):
    model = _model()
    lo_r, hi_r = bounds
    scores = {name: float(v) for name, v in zip(_sizes(model), [5.0, 0.1, 1.0, 30.0, 0.0])}
    ratios = allocate_snell_budget(model, total, scores, min_keep_ratio=lo_r, max_keep_ratio=hi_r)
    sizes, kept = _sizes(model), _kept(model)
    assert list(ratios) == list(sizes)
    assert sum(kept.values()) == round(total * sum(sizes.values()))
    for name, n in sizes.items():
        assert kept[name] == round(ratios[name] * n)  # the layer keeps exactly its share
        assert max(1, math.ceil(lo_r * n - 1e-9)) <= kept[name] <= math.floor(hi_r * n + 1e-9), name
        assert 0.0 <= snell_layers(model)[name].sparsity < 1.0


def test_water_filling_follows_the_scores():
    model = _model()
    names = list(_sizes(model))
    scores = dict(zip(names, [4.0, 1.0, 2.0, 0.5, 0.0]))
    allocate_snell_budget(model, 0.2, scores, max_keep_ratio=0.5)
    sizes, kept = _sizes(model), _kept(model)
    assert kept[names[4]] == 1  # score 0: the minimum (one entry)
    # Layers strictly inside their bounds share one level lam: k_l ~ lam * s_l * n_l (within rounding).
    free = [n for n in names if scores[n] > 0 and 1 < kept[n] < math.floor(0.5 * sizes[n])]
    assert len(free) >= 2
    lam = [kept[n] / (scores[n] * sizes[n]) for n in free]
    for n, level in zip(free, lam):
        assert abs(kept[n] - lam[0] * scores[n] * sizes[n]) <= 2.0, (n, lam)
    # Capped layers would want more than their cap.
    for n in names:
        if kept[n] == math.floor(0.5 * sizes[n]):
            assert lam[0] * scores[n] * sizes[n] >= kept[n] - 1


def test_equal_scores_give_equal_ratios_and_none_means_equal():
    model = _model()
    ratios = allocate_snell_budget(model, 0.25)
    for name, n in _sizes(model).items():
        assert abs(ratios[name] - 0.25) <= 1.0 / n + 1e-12
    again = allocate_snell_budget(_model(seed=1), 0.25, {name: 7.0 for name in _sizes(model)})
    assert again == ratios
    zeros = allocate_snell_budget(_model(), 0.25, {name: 0.0 for name in _sizes(model)})
    assert zeros == ratios


def test_deterministic():
    scores = dict(zip(_sizes(_model()), [0.3, 0.3, 0.3, 0.1, 0.2]))  # ties among layers
    results = [allocate_snell_budget(_model(seed=s), 0.37, scores, 0.01, 0.9) for s in range(3)]
    assert results[0] == results[1] == results[2]


def test_zero_score_layers_take_the_rest_when_the_others_are_full():
    model = _model()
    names = list(_sizes(model))
    scores = dict(zip(names, [1.0, 0.0, 0.0, 0.0, 0.0]))
    allocate_snell_budget(model, 0.6, scores, max_keep_ratio=0.7)
    sizes, kept = _sizes(model), _kept(model)
    assert kept[names[0]] == math.floor(0.7 * sizes[names[0]])
    assert sum(kept.values()) == round(0.6 * sum(sizes.values()))
    rest = [kept[n] / sizes[n] for n in names[1:]]
    assert max(rest) - min(rest) < 0.05  # shared by size


def test_block_layers_follow_their_ratio():
    model = _model(block_size=16, shapes=[(64, 64), (96, 48), (40, 70)])
    scores = dict(zip(_sizes(model), [1.0, 3.0, 0.5]))
    ratios = allocate_snell_budget(model, 0.4, scores)
    total = 0
    for name, layer in snell_layers(model).items():
        tiles = math.ceil(layer.out_features / 16) * math.ceil(layer.in_features / 16)
        bm = lrk.reference_sparse.block_scores(layer.delta(), 16) != 0
        assert int(bm.sum()) == sp.keep_count(tiles, 1.0 - layer.sparsity)
        assert abs(int(bm.sum()) / tiles - ratios[name]) <= 0.5 / tiles + 1e-12
        total += int((layer.delta() != 0).sum())
    assert total > 0


def test_importance_by_hand():
    model = _model(shapes=[(12, 10), (10, 6)])
    imp = SNELLImportance(model, beta1=0.8, beta2=0.6)
    assert imp.scores() == {name: 0.0 for name in _sizes(model)}
    x = torch.randn(8, 12)
    model(x).square().sum().backward()
    imp.update()
    scores = imp.scores()
    for name, layer in snell_layers(model).items():
        want = 0.0
        for p in (layer.lora_a, layer.lora_b):
            ipt = (p.detach() * p.grad).abs()
            avg = 0.2 * ipt
            unc = 0.4 * (ipt - avg).abs()
            want += float((avg * unc).mean())
        assert scores[name] == pytest.approx(want, rel=1e-5)
        assert scores[name] > 0
    ratios = imp.allocate(0.3)
    assert sum(_kept(model).values()) == round(0.3 * sum(_sizes(model).values()))
    assert list(ratios) == list(_sizes(model))


def test_importance_state_survives_a_checkpoint(tmp_path):
    """state_dict holds tensors and numbers only, and a resumed tracker scores exactly as an uninterrupted one."""
    def step(model, imp, seed):
        model.zero_grad()
        model(torch.randn(8, 12, generator=torch.Generator().manual_seed(seed))).square().sum().backward()
        imp.update()

    model = _model(shapes=[(12, 10), (10, 6)])
    imp = SNELLImportance(model, beta1=0.7, beta2=0.9)
    for seed in range(3):
        step(model, imp, seed)
    torch.save(imp.state_dict(), tmp_path / "imp.pt")
    resumed = SNELLImportance(model)  # other betas: the state brings its own
    resumed.load_state_dict(torch.load(tmp_path / "imp.pt", weights_only=True))
    assert (resumed.beta1, resumed.beta2, resumed.steps) == (0.7, 0.9, 3)
    for seed in range(3, 5):
        step(model, imp, seed)
        step(model, resumed, seed)
    assert resumed.scores() == imp.scores()
    assert resumed.scores() and all(v > 0 for v in resumed.scores().values())

    other = SNELLImportance(_model(shapes=[(12, 10)]))
    with pytest.raises(ValueError, match="state_dict: layers differ from the model's"):
        other.load_state_dict(imp.state_dict())
    reshaped = SNELLImportance(_model(shapes=[(12, 11), (11, 6)]))
    with pytest.raises(ValueError, match=r"state_dict: 0.lora_a averages have shape \(10, 4\), the layer.s factor \(11, 4\)"):
        reshaped.load_state_dict(imp.state_dict())


def test_schedule():
    kw = dict(total_steps=100, initial_keep_ratio=0.9, final_keep_ratio=0.2, warmup_steps=10, final_steps=20)
    assert snell_budget_schedule(0, **kw) == snell_budget_schedule(10, **kw) == 0.9
    assert snell_budget_schedule(81, **kw) == snell_budget_schedule(100, **kw) == 0.2
    mid = snell_budget_schedule(45, **kw)
    assert mid == pytest.approx(0.2 + 0.7 * (1 - 35 / 70) ** 3)
    values = [snell_budget_schedule(s, **kw) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("call,match", [
    (lambda m: allocate_snell_budget(m, 0.0), r"total_keep_ratio: expected a value in \(0, 1\], got 0.0"),
    (lambda m: allocate_snell_budget(m, 1.5), r"total_keep_ratio: expected a value in \(0, 1\], got 1.5"),
    (lambda m: allocate_snell_budget(m, 0.5, min_keep_ratio=0.6), "total_keep_ratio: 0.5 keeps"),
    (lambda m: allocate_snell_budget(m, 0.5, max_keep_ratio=0.4), "total_keep_ratio: 0.5 keeps"),
    (lambda m: allocate_snell_budget(m, 0.5, min_keep_ratio=0.5, max_keep_ratio=0.3),
     "max_keep_ratio: expected a value in"),
    (lambda m: allocate_snell_budget(m, 0.5, min_keep_ratio=-0.1), r"min_keep_ratio: expected a value in \[0, 1\]"),
    (lambda m: allocate_snell_budget(m, 0.5, {"0": 1.0}), "scores: expected one score per SNELL layer; missing"),
    (lambda m: allocate_snell_budget(m, 0.5, {**{n: 1.0 for n in _sizes(m)}, "head": 1.0}), "unknown \\['head'\\]"),
    (lambda m: allocate_snell_budget(m, 0.5, {n: -1.0 for n in _sizes(m)}), "scores: expected non-negative finite"),
    (lambda m: allocate_snell_budget(m, 0.5, {n: math.nan for n in _sizes(m)}), "scores: expected non-negative"),
    (lambda m: allocate_snell_budget(torch.nn.Linear(3, 3), 0.5), "model: expected at least one SNELLLinear"),
    (lambda m: SNELLImportance(m, beta1=1.0), r"beta1: expected a value in \[0, 1\), got 1.0"),
    (lambda m: snell_budget_schedule(5, 10, 0.5, 0.2, warmup_steps=6, final_steps=4), "total_steps: expected more"),
    (lambda m: snell_budget_schedule(5, 10, 1.5, 0.2), r"initial_keep_ratio: expected a value in \(0, 1\]"),
])
def test_bad_input(call, match):
    model = _model(shapes=[(10, 10), (10, 10)])
    before = [layer.sparsity for layer in snell_layers(model).values()]
    with pytest.raises(ValueError, match=match):
        call(model)
    assert [layer.sparsity for layer in snell_layers(model).values()] == before  # nothing half-applied
