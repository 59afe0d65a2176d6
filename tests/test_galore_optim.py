"""lrk.optim.GaLoreAdamW: galore-torch semantics and param groups, validation,
checkpoints (weights_only, bit-identical resume), gradient accumulation, lazy
refresh, moment rotation, and a small real training run against AdamW."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import lrk
import lrk.galore_ops  # noqa: F401  (registers the GaLore fakes)
import lrk.reference_galore as ref
from conftest import DEVICES
from helpers import assert_close
from lrk.optim import GaLoreAdamW

PROJ_TYPES = ["svd", "rsvd", "dct", "random"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one intra-op thread avoids OpenMP barrier costs on a shared machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _mlp(device="cpu", dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    # Weights [24, 10] (right projection), [6, 24] (left), [24, 24] (square: right); biases are 1-D.
    return torch.nn.Sequential(torch.nn.Linear(10, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24), torch.nn.Tanh(),
                               torch.nn.Linear(24, 6)).to(device=device, dtype=dtype)


def _groups(model, **galore):
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return [{"params": rest}, {"params": mats, **galore}]


def _batch(step, device="cpu", dtype=torch.float32, n=16):
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(n, 10, generator=g).to(device, dtype), torch.randn(n, 6, generator=g).to(device, dtype))


def _train(model, opt, steps, start=0, device="cpu", dtype=torch.float32):
    for s in range(start, start + steps):
        x, y = _batch(s, device, dtype)
        opt.zero_grad()
        F.mse_loss(model(x).float(), y.float()).backward()
        opt.step()


class _GaloreTorchReference:
    """galore-torch's GaLoreAdamW step, eagerly, on lrk.reference_galore (exact SVD
    with canonical column signs, refresh at steps 0, T, 2T, ...)."""

    def __init__(self, model, rank, gap, scale, lr, wd, betas=(0.9, 0.999), eps=1e-6):
        self.params = list(model.parameters())
        self.rank, self.gap, self.scale, self.lr, self.wd, self.betas, self.eps = rank, gap, scale, lr, wd, betas, eps
        self.state = {}

    def step(self):
        for p in self.params:
            st = self.state.setdefault(p, {"step": 0})
            g = p.grad.double()
            proj, left = None, False
            if p.dim() == 2:
                left = ref.projects_left(p.shape)
                if st["step"] % self.gap == 0:
                    st["proj"] = ref.svd_projector(g, self.rank, left)
                proj = st["proj"]
            if "m" not in st:
                low = (self.rank, p.shape[1]) if left else (p.shape[0], self.rank)
                shape = low if proj is not None else p.shape
                st["m"], st["v"] = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
            st["step"] += 1
            w = p.detach().double()
            ref.adamw_step(w, g, st["m"], st["v"], proj, left, st["step"], self.lr, self.betas[0], self.betas[1],
                           self.eps, self.wd, self.scale)
            with torch.no_grad():
                p.copy_(w)


def test_galore_torch_param_groups_give_galore_torch_semantics():
    model = _mlp(dtype=torch.float64)
    model_ref = copy.deepcopy(model)
    # The keys the HuggingFace Trainer and galore-torch's README pass.
    opt = GaLoreAdamW(_groups(model, rank=3, update_proj_gap=4, scale=0.25, proj_type="std"), lr=0.01,
                      weight_decay=0.1)
    ref_opt = _GaloreTorchReference(model_ref, rank=3, gap=4, scale=0.25, lr=0.01, wd=0.1)
    for s in range(10):  # three refreshes
        x, y = _batch(s, dtype=torch.float64)
        for m, o in ((model, opt), (model_ref, ref_opt)):
            for p in m.parameters():
                p.grad = None
            F.mse_loss(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), model_ref.parameters()):
        assert_close(p, q, torch.float64, "param", factor=1e3)
    group = opt.param_groups[1]
    assert group["proj_type"] == "svd" and group["proj_side"] == "std"
    w_left = model[4].weight  # [6, 24]: left projection, moments [rank, n]
    assert opt.state[w_left]["exp_avg"].shape == (3, 24)
    assert opt.state[model[0].weight]["exp_avg"].shape == (24, 3)
    assert opt.state[model[0].bias]["exp_avg"].shape == (24,)


def test_galore_torch_quant_and_side_keys():
    model = _mlp()
    opt = GaLoreAdamW(_groups(model, rank=2, update_proj_gap=5, scale=1.0, proj_type="left", proj_quant=True,
                              quant_group_size=8), lr=1e-3)
    group = opt.param_groups[1]
    assert group["proj_type"] == "svd" and group["proj_side"] == "left" and group["proj_bits"] == 4
    _train(model, opt, 2)
    st = opt.state[model[0].weight]  # [24, 10] projected on the left by request
    assert st["exp_avg"].shape == (2, 10)
    assert st["proj_packed"].dtype == torch.uint8 and st["proj_packed"].shape == (2, 12)
    assert "proj" not in st


def test_q_galore_keys_and_adamw_signature():
    """Q-GaLore's group keys (quant, quant_n_bit, quant_group_size, cos_threshold,
    gamma_proj, queue_size) and galore-torch's AdamW keyword no_deprecation_warning."""
    model = _mlp()
    opt = GaLoreAdamW(_groups(model, rank=2, update_proj_gap=1, scale=0.25, proj_type="std", quant=True,
                              quant_n_bit=4, quant_group_size=8, cos_threshold=0.0, gamma_proj=2, queue_size=1),
                      lr=1e-3, weight_decay=0.0, no_deprecation_warning=True)
    group = opt.param_groups[1]
    assert group["proj_bits"] == 4 and group["lazy_refresh"] and "quant" not in group and "quant_n_bit" not in group
    _train(model, opt, 3)
    st = opt.state[model[0].weight]
    assert st["proj_packed"].dtype == torch.uint8 and st["proj_scales"].shape == (2, 2)  # 10 rows in groups of 8
    assert st["proj_gap"] == 4  # refreshes at steps 0, 1, 2; cos >= 0 doubles the gap at steps 1 and 2
    plain = GaLoreAdamW(_groups(_mlp(), rank=2, quant=False, quant_n_bit=4), lr=1e-3)
    assert plain.param_groups[1]["proj_bits"] == 32 and not plain.param_groups[1]["lazy_refresh"]
    with pytest.raises(ValueError, match="quant_n_bit"):
        GaLoreAdamW(_groups(_mlp(), rank=2, quant=True, quant_n_bit=8), lr=1e-3)


def test_strided_parameters_are_stepped_in_place():
    """A channels_last conv weight (plain AdamW) and a transposed 2-D view (GaLore)
    follow the same trajectory as their contiguous copies and keep their strides."""
    gen = torch.Generator().manual_seed(5)
    conv = torch.randn(4, 3, 2, 2, generator=gen).to(memory_format=torch.channels_last)
    mat = torch.randn(12, 7, generator=gen).t()  # [7, 12], strides (1, 7)
    strided = [torch.nn.Parameter(conv.clone()), torch.nn.Parameter(mat.clone())]
    dense = [torch.nn.Parameter(conv.contiguous()), torch.nn.Parameter(mat.contiguous())]
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    opts = [GaLoreAdamW([{"params": ps[:1]}, {"params": ps[1:], "rank": 2, "update_proj_gap": 2}], lr=0.01,
                        weight_decay=0.1) for ps in (strided, dense)]
    for _ in range(3):
        grads = [torch.randn(t.shape, generator=gen) for t in dense]
        for ps, opt in zip((strided, dense), opts):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(strided, dense):
        assert torch.equal(a.contiguous(), b)
    assert strided[0].is_contiguous(memory_format=torch.channels_last) and strided[1].stride() == (1, 7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_params_get_adamw(dtype):
    model = _mlp(dtype=dtype)
    ref_model = copy.deepcopy(model).double()
    opt = GaLoreAdamW(model.parameters(), lr=0.01, weight_decay=0.05)  # no rank: AdamW everywhere
    states = {}
    for s in range(3):
        x, y = _batch(s)
        opt.zero_grad()
        F.mse_loss(model(x.to(dtype)).float(), y).backward()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            st = states.setdefault(q, [torch.zeros(q.shape, dtype=torch.float64) for _ in range(2)])
            w = q.detach().clone()
            ref.adamw_step(w, p.grad.double(), st[0], st[1], None, False, s + 1, 0.01, weight_decay=0.05)
            with torch.no_grad():
                q.copy_(w)
        opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_close(p, q, dtype, "param", factor=10)
        assert opt.state[p]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize(
    "groups,match",
    [
        (lambda m: _groups(m, rank=7), r"rank 7 is larger than min\(m, n\) = 6 of parameter 2"),
        (lambda m: [{"params": list(m.parameters()), "rank": 2}], r"parameter 1 has shape \(24,\); GaLore projects 2-D"),
        (lambda m: _groups(m, rank=0), "rank must be an integer >= 1"),
        (lambda m: _groups(m, rank=2, proj_type="qr"), "proj_type must be one of"),
        (lambda m: _groups(m, rank=2, proj_type="dct", proj_bits=4), "proj_bits=4 applies to svd and rsvd"),
        (lambda m: _groups(m, rank=2, proj_bits=8), r"proj_bits \(Q-GaLore.s quant_n_bit\) must be 32 or 4"),
        (lambda m: _groups(m, rank=2, update_proj_gap=0), "update_proj_gap must be an integer >= 1"),
        (lambda m: _groups(m, rank=2, moment_update="reset"), "moment_update must be one of"),
        (lambda m: _groups(m, rank=2, dim=3), "projects 2-D matrices only"),
    ],
)
def test_bad_groups_raise_value_error(groups, match):
    with pytest.raises(ValueError, match=match):
        GaLoreAdamW(groups(_mlp()), lr=1e-3)


def test_bad_hyperparameters_raise_value_error():
    with pytest.raises(ValueError, match="lr must be"):
        GaLoreAdamW(_mlp().parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="betas must be"):
        GaLoreAdamW(_mlp().parameters(), betas=(0.9, 1.0))


def _only_tensors_and_plain_values(obj):
    if torch.is_tensor(obj):
        return True
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _only_tensors_and_plain_values(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_only_tensors_and_plain_values(v) for v in obj)
    return obj is None or isinstance(obj, (bool, int, float, str))


RESUME_CASES = [dict(proj_type=t) for t in PROJ_TYPES] + [
    dict(proj_type="svd", proj_bits=4, quant_group_size=8),
    dict(proj_type="rsvd", proj_bits=4, quant_group_size=0, fira=True),
    dict(proj_type="dct", fira=True, moment_update="rotate"),
    dict(proj_type="random", moment_update="rotate", lazy_refresh=True, queue_size=1, cos_threshold=0.0),
    dict(proj_type="svd", lazy_refresh=True, queue_size=2),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", RESUME_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_checkpoint_resume_is_bit_identical(device, dtype, case):
    if dtype == torch.bfloat16 and case.get("proj_bits") == 4:
        pytest.skip("int4 with bf16 is covered by the op tests")
    settings = dict(rank=3, update_proj_gap=3, scale=0.5, **case)
    straight = _mlp(device, dtype)
    opt = GaLoreAdamW(_groups(straight, **settings), lr=0.01, weight_decay=0.01)
    _train(straight, opt, 8, device=device, dtype=dtype)

    first = _mlp(device, dtype)
    opt1 = GaLoreAdamW(_groups(first, **settings), lr=0.01, weight_decay=0.01)
    _train(first, opt1, 4, device=device, dtype=dtype)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    sd = opt1.state_dict()
    assert _only_tensors_and_plain_values(sd)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = _mlp(device, dtype, seed=123)  # different init, overwritten by the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = GaLoreAdamW(_groups(resumed, **settings), lr=0.01, weight_decay=0.01)
    opt2.load_state_dict(ckpt["optim"])
    for p, q in zip(first.parameters(), resumed.parameters()):  # float32 states of bf16 params stay float32
        for key, value in opt1.state[p].items():
            if torch.is_tensor(value):
                assert opt2.state[q][key].dtype == value.dtype, key
    _train(resumed, opt2, 4, start=4, device=device, dtype=dtype)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            other = opt2.state[q][key]
            assert torch.equal(value, other) if torch.is_tensor(value) else value == other, key


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_gradient_accumulation(proj_type):
    settings = dict(rank=3, update_proj_gap=2, proj_type=proj_type)
    whole, accum = _mlp(dtype=torch.float64), _mlp(dtype=torch.float64)
    opt_w = GaLoreAdamW(_groups(whole, **settings), lr=0.01)
    opt_a = GaLoreAdamW(_groups(accum, **settings), lr=0.01)
    for s in range(4):
        x, y = _batch(s, dtype=torch.float64, n=16)
        opt_w.zero_grad()
        F.mse_loss(whole(x), y).backward()
        opt_w.step()
        opt_a.zero_grad()
        for part in range(4):  # four micro-batches of 4 rows, gradients summed in p.grad
            sl = slice(4 * part, 4 * part + 4)
            (F.mse_loss(accum(x[sl]), y[sl]) / 4).backward()
        opt_a.step()
    for p, q in zip(whole.parameters(), accum.parameters()):
        assert_close(q, p, torch.float64, "param", factor=1e3)


def test_lazy_refresh_doubles_the_gap_when_projectors_agree():
    w = torch.nn.Parameter(torch.randn(8, 20))
    grad = ref.svd_projector(torch.randn(8, 20, dtype=torch.float64), 2, True).float() @ torch.randn(2, 20)
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 1, "lazy_refresh": True, "queue_size": 2,
                        "cos_threshold": 0.9, "gamma_proj": 2}], lr=1e-3)
    gaps = []
    for _ in range(8):
        w.grad = grad.clone()  # the same gradient: consecutive projectors agree (|cos| = 1)
        opt.step()
        gaps.append(opt.state[w]["proj_gap"])
    # Refreshes at steps 0, 1, 2 fill the queue (two cosines) and double the gap at
    # step 2; then at step 4 (gap 2) again -> 4, next refresh at step 8.
    assert gaps == [1, 1, 2, 2, 4, 4, 4, 4]
    assert opt.state[w]["refreshes"] == 4


def test_lazy_refresh_keeps_the_gap_when_projectors_change():
    w = torch.nn.Parameter(torch.randn(8, 20))
    opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 1, "lazy_refresh": True, "queue_size": 2,
                        "cos_threshold": 0.99}], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        w.grad = torch.randn(8, 20, generator=gen)
        opt.step()
    assert opt.state[w]["proj_gap"] == 1 and opt.state[w]["refreshes"] == 6


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)])
def test_rotate_moments_on_refresh(shape):
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    results = {}
    for mode in ("keep", "rotate"):
        w = torch.nn.Parameter(torch.zeros(*shape, dtype=torch.float64))
        opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2, "moment_update": mode}], lr=1e-3)
        for i, g in enumerate(grads):
            w.grad = g.clone()
            if i == 2:
                m_before = opt.state[w]["exp_avg"].clone()
                p_old = opt.state[w]["proj"].clone()
            opt.step()
        results[mode] = (opt.state[w]["exp_avg"], m_before, p_old, opt.state[w]["proj"])
    left = shape[0] < shape[1]
    m_keep, m_before, _, _ = results["keep"]
    m_rot, _, p_old, p_new = results["rotate"]
    r = p_new.t() @ grads[2] if left else grads[2] @ p_new
    c = p_new.t() @ p_old
    rotated = c @ m_before if left else m_before @ c.t()
    assert_close(m_rot, 0.9 * rotated + 0.1 * r, torch.float64, "rotated exp_avg")
    assert_close(m_keep, 0.9 * m_before + 0.1 * r, torch.float64, "kept exp_avg")


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_params_keep_fp32_states(device):
    model = _mlp(device, torch.bfloat16)
    opt = GaLoreAdamW(_groups(model, rank=3, update_proj_gap=2, proj_type="rsvd", fira=True), lr=0.01)
    _train(model, opt, 3, device=device, dtype=torch.bfloat16)
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all()
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
        if p.dim() == 2:
            assert st["proj"].dtype == torch.float32 and st["fira_norm"].dtype == torch.float32


# ----------------------------------------------------------------------------- a real training run

_TEACHER_NOISE = 0.1


def _regression_task():
    """Online regression on a random tanh teacher with label noise; the held-out
    loss floor is the noise variance (0.01)."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))

    def data(n, gen):
        x = torch.randn(n, 32, generator=gen)
        with torch.no_grad():
            return x, teacher(x) + _TEACHER_NOISE * torch.randn(n, 8, generator=gen)

    student = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                                  torch.nn.Linear(64, 8))
    return data, student


def _fit(model, opt, data, steps=500):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = data(64, gen)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    x, y = data(2048, torch.Generator().manual_seed(99))
    with torch.no_grad():
        return F.mse_loss(model(x), y).item()


@pytest.fixture(scope="module")
def adamw_reference_loss():
    data, student = _regression_task()
    model = copy.deepcopy(student)
    return _fit(model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0, eps=1e-6), data)


TRAIN_CASES = [dict(proj_type=t) for t in PROJ_TYPES] + [
    dict(proj_type="svd", proj_bits=4, quant_group_size=16),
    dict(proj_type="rsvd", fira=True),
    dict(proj_type="dct", moment_update="rotate"),
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_small_training_run_matches_adamw(case, adamw_reference_loss):
    data, student = _regression_task()
    model = copy.deepcopy(student)
    x0, y0 = data(2048, torch.Generator().manual_seed(99))
    with torch.no_grad():
        initial = F.mse_loss(model(x0), y0).item()
    hidden = [model[0].weight, model[2].weight]  # [64, 32] and [64, 64]; the head and biases get AdamW
    rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
    opt = GaLoreAdamW([{"params": rest}, {"params": hidden, "rank": 16, "update_proj_gap": 25, "scale": 1.0, **case}],
                      lr=3e-3)
    loss = _fit(model, opt, data)
    assert loss < 0.25 * initial, f"did not learn: {loss:.4f} vs initial {initial:.4f}"
    assert loss <= 1.10 * adamw_reference_loss, f"GaLore {loss:.5f} vs AdamW {adamw_reference_loss:.5f}"


# ----------------------------------------------------------------------------- reduced-precision GEMMs
# Stated tolerance: with TF32 (or comparably rounded) GEMMs, the weight change
# after 20 steps is within 2% (relative, per parameter) of the fp32 run's. The
# batches have 4 rows, so every weight gradient has rank <= 4 = the projection
# rank and its range is a well-defined subspace: with many near-equal singular
# values (larger batches) a 1e-3 perturbation can swap a projector column, and
# the weights then differ by tens of percent in one layer in any precision.

TRAJECTORY_TOL = 2e-2


def _weight_change(proj_type, device="cpu", grad_noise=0.0, steps=20):
    model = _mlp(device)
    start = [p.detach().clone() for p in model.parameters()]
    opt = GaLoreAdamW(_groups(model, rank=4, update_proj_gap=5, proj_type=proj_type), lr=1e-3)
    gen = torch.Generator().manual_seed(7)
    for s in range(steps):
        x, y = _batch(s, device, n=4)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if grad_noise:
            for p in model.parameters():
                p.grad.mul_(1 + grad_noise * torch.randn(p.grad.shape, generator=gen).to(device))
        opt.step()
    return [p.detach() - s for p, s in zip(model.parameters(), start)]


@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_trajectory_tolerates_gemm_rounding(proj_type):
    """CPU model of reduced-precision GEMMs: every gradient entry perturbed by a
    relative 1e-3 (about two TF32 ulps) before each step keeps the weight change
    within the stated tolerance of the unperturbed run's. The deviation grows in
    proportion (about 0.15% here, 1.5% at a relative 1e-2), so the margin is ~10x."""
    for noisy, exact in zip(_weight_change(proj_type, grad_noise=1e-3), _weight_change(proj_type)):
        assert_close(noisy, exact, torch.float32, "weight change", factor=TRAJECTORY_TOL / 1e-5)


@pytest.mark.parametrize("device", [d for d in DEVICES if d.id == "cuda"])
@pytest.mark.parametrize("proj_type", ["rsvd", "dct"])
def test_tf32_gemms_stay_close_to_the_fp32_trajectory(device, proj_type):
    """TF32 GEMMs (torch.backends.cuda.matmul.allow_tf32: the model's, the
    step's projection and back projection, the rsvd refresh) keep the weight
    change within the stated tolerance of the fp32 run's."""
    runs = {}
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            runs[tf32] = _weight_change(proj_type, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    for d_tf32, d_fp32 in zip(runs[True], runs[False]):
        assert_close(d_tf32, d_fp32, torch.float32, "weight change", factor=TRAJECTORY_TOL / 1e-5)
