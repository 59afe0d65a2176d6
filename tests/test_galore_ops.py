"""GaLore-family ops (ops.md section 3): projectors, int4 storage and the AdamW
step against lrk.reference_galore; opcheck, torch.compile, bad input."""
import math

import pytest
import torch

import lrk
import lrk.galore_ops as go
import lrk.reference_galore as ref
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close, poison_cuda_allocator, rel_err

SHAPES = [(1, 1), (7, 3), (5, 12), (33, 20), (24, 24), (17, 65)]
RANKS = {(1, 1): 1, (7, 3): 2, (5, 12): 3, (33, 20): 4, (24, 24): 8, (17, 65): 6}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These matrices are tiny: one intra-op thread avoids OpenMP barrier costs
    that dominate on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))


def low_rank_plus_noise(m, n, k, noise=0.05, dtype=torch.float64, device="cpu", gen=None):
    """A gradient-like matrix: rank-k signal with decaying, well separated singular
    values (so that singular vectors are well defined) plus Gaussian noise."""
    gen = gen or _gen()
    k = min(k, m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    s = torch.tensor([2.0 ** -i for i in range(k)], dtype=torch.float64) * 10
    g = (u * s) @ v.t() + noise * torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(max(m, n))
    return g.to(dtype).to(device)


def captured_energy(grad, proj, left):
    g = grad.double().cpu()
    p = proj.double().cpu()
    r = p.t() @ g if left else g @ p
    return (r.square().sum() / g.square().sum()).item()


# ----------------------------------------------------------------------------- random numbers


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 7), (64, 33)])
def test_philox_normal_matches_reference(device, dtype, shape):
    seed = int(torch.randint(0, 2**62, ()).item())
    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
    go.philox_normal_(out, seed, 0.5)
    expected = ref.philox_normal(shape, seed, 0.5, dtype=torch.float64)
    tol = {torch.float64: 1e-14, torch.float32: 1e-7, torch.bfloat16: 5e-3}[dtype]
    assert rel_err(out, expected) < tol


def test_philox_normal_statistics_and_seeds():
    a = go.philox_normal_(torch.empty(200_000, dtype=torch.float64), 7)
    assert abs(a.mean().item()) < 0.01 and abs(a.std().item() - 1.0) < 0.01
    assert abs((a[:-1] * a[1:]).mean().item()) < 0.01  # neighbours (cos/sin pairs) uncorrelated
    b = go.philox_normal_(torch.empty(200_000, dtype=torch.float64), 8)
    assert abs((a * b).mean().item()) < 0.01
    assert torch.equal(a, go.philox_normal_(torch.empty(200_000, dtype=torch.float64), 7))


# ----------------------------------------------------------------------------- projectors


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_svd_projector_matches_reference(device, dtype, shape):
    rank = RANKS[shape]
    g = low_rank_plus_noise(*shape, rank + 1, dtype=dtype, device=device)
    left = ref.projects_left(shape)
    p = go.svd_projector(g, rank, left)
    assert p.shape == (shape[0] if left else shape[1], rank)
    assert p.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    expected = ref.svd_projector(g.cpu().double(), rank, left)
    assert_close(p, expected, torch.float32 if dtype == torch.bfloat16 else dtype, "P", factor=100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("power_iters", [0, 2])
def test_rsvd_projector_matches_reference(device, dtype, shape, power_iters):
    rank = RANKS[shape]
    g = low_rank_plus_noise(*shape, rank + 2, dtype=dtype, device=device)
    left = ref.projects_left(shape)
    seed = int(torch.randint(0, 2**40, ()).item())
    p = go.rsvd_projector(g, rank, left, 3, power_iters, seed)
    expected = ref.rsvd_projector(g.cpu().double(), rank, left, 3, power_iters, seed)
    assert p.shape == expected.shape
    assert_close(p, expected, dtype, "P", factor=100)
    # A range finder on a low-rank-plus-noise matrix captures what the SVD captures.
    exact = captured_energy(g, ref.svd_projector(g.cpu().double(), rank, left), left)
    assert captured_energy(g, p, left) >= 0.97 * exact


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rsvd_projector_on_a_gradient_of_lower_rank(device, dtype):
    """A rank-3 gradient sketched with 11 columns: the sketch's columns are
    dependent (in float64 the range finder's Cholesky-QR gives way to Householder
    QR); the projector is still orthonormal and captures all of the gradient."""
    g = low_rank_plus_noise(90, 70, 3, noise=0.0, dtype=dtype, device=device)
    p = go.rsvd_projector(g, 8, True, 3, 2, 7)
    assert torch.isfinite(p).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (p.t() @ p - torch.eye(8, dtype=dtype, device=device)).abs().max().item() < tol
    assert captured_energy(g, p, True) >= 1 - 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_rsvd_projector_on_an_ill_conditioned_gradient(device):
    """Singular values from 1 to 1e-14 and a sketch of all of them: the range
    finder's Cholesky factorization can succeed on such a sketch, yet one more
    Cholesky-QR pass does not make it orthonormal (1e-4 before the fix); the
    projector must stay orthonormal anyway."""
    n, k = 40, 10
    for seed in range(8):
        gen = torch.Generator().manual_seed(seed)
        u = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))[0]
        v = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=gen))[0]
        g = (u @ torch.diag(torch.logspace(0, -14, k, dtype=torch.float64)) @ v.t()).to(device)
        p = go.rsvd_projector(g, k, True, 3, 0, seed)
        err = (p.t() @ p - torch.eye(k, dtype=torch.float64, device=device)).abs().max().item()
        assert err < 1e-12, f"seed {seed}: |p^T p - I| = {err:.1e}"


@pytest.mark.parametrize("device", DEVICES)
def test_rsvd_projector_is_orthonormal_and_seeded(device):
    g = low_rank_plus_noise(96, 40, 12, device=device, dtype=torch.float32)
    p1 = go.rsvd_projector(g, 10, False, 8, 1, 5)
    p2 = go.rsvd_projector(g, 10, False, 8, 1, 5)
    assert torch.equal(p1, p2)
    assert (p1.t() @ p1 - torch.eye(10, device=device)).abs().max().item() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_random_projector_matches_reference(device, dtype, shape):
    rank = RANKS[shape]
    g = torch.randn(*shape, dtype=dtype, device=device)
    for left in (True, False):
        p = go.random_projector(g, rank, left, 1234)
        expected = ref.random_projector(g.cpu(), rank, left, 1234)
        assert p.dtype == expected.dtype and p.shape == expected.shape
        assert rel_err(p, expected) < (1e-14 if dtype == torch.float64 else 1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_dct_scores_and_selection_match_reference(device, dtype, shape):
    rank = RANKS[shape]
    g = torch.randn(*shape, dtype=torch.float64).to(dtype).to(device)
    for left in (True, False):
        scores = go.dct_scores(g, left)
        expected = ref.dct_scores(g.cpu(), left)
        assert_close(scores, expected, torch.float32 if dtype == torch.bfloat16 else dtype, "scores", factor=10)
        idx = go.dct_select(g, rank, left)
        assert idx.dtype == torch.int64 and idx.shape == (rank,)
        # Same choice as the reference's up to float rounding of near-equal scores.
        picked = expected[idx.cpu()].sum()
        best = expected.sort(descending=True)[0][:rank].sum()
        assert picked >= best * (1 - 1e-5)


def test_dct_selection_ties_go_to_the_lower_index():
    # A gradient equal to basis vectors 5 and 2 with equal weight, plus vector 7 weaker.
    d = ref.dct_basis(16)
    g = (d[:, 5] + d[:, 2]).unsqueeze(1) @ torch.ones(1, 20, dtype=torch.float64)
    g = g + 0.5 * d[:, 7].unsqueeze(1) @ torch.ones(1, 20, dtype=torch.float64)
    assert go.dct_select(g, 3, True).tolist() == [2, 5, 7]
    assert go.dct_select(g.t().contiguous(), 2, False).tolist() == [2, 5]
    # All-zero gradient: every score ties, the first indices win.
    assert go.dct_select(torch.zeros(9, 30), 4, True).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [1, 2, 7, 64, 100])
def test_dct_basis_is_the_orthonormal_dct(device, size):
    idx = torch.arange(size, device=device)
    basis = go.dct_basis(idx, size, torch.float64)
    assert_close(basis, ref.dct_basis(size), torch.float64, "basis")
    assert (basis.t() @ basis - torch.eye(size, dtype=torch.float64, device=device)).abs().max() < 1e-12
    cols = torch.tensor([size - 1, 0], device=device)
    assert_close(go.dct_basis(cols, size), ref.dct_basis(size)[:, [size - 1, 0]], torch.float32, "columns")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size,rank,group", [(1, 1, 0), (33, 4, 8), (64, 5, 0), (130, 3, 256), (17, 2, 1)])
def test_int4_round_trip_matches_reference(device, size, rank, group):
    p = torch.linalg.qr(torch.randn(size, rank, dtype=torch.float64))[0].float()
    packed, scales, zeros = go.quantize_int4(p.to(device), group)
    groups = 1 if group <= 0 else -(-size // group)
    assert packed.shape == (rank, (size + 1) // 2) and packed.dtype == torch.uint8
    assert scales.shape == (rank, groups) and zeros.shape == (rank, groups) and zeros.dtype == torch.uint8
    codes, ref_scales, ref_zeros = ref.quantize_int4(p, group)
    assert torch.equal(ref.unpack_int4(packed.cpu(), size), codes)
    assert torch.equal(scales.cpu(), ref_scales) and torch.equal(zeros.cpu(), ref_zeros)
    deq = go.dequantize_int4(packed, scales, zeros, size, group)
    assert deq.shape == (size, rank) and deq.dtype == torch.float32
    assert torch.equal(deq.cpu(), ref.dequantize_codes(codes, ref_scales, ref_zeros, group))
    # Error bound: half a quantisation step per element.
    step = ref_scales.repeat_interleave(size if group <= 0 else group, 1)[:, :size].t()
    assert ((deq.cpu() - p).abs() <= 0.5 * step + 1e-6).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_project_matches_matmul(device, dtype):
    g = torch.randn(9, 21, dtype=dtype, device=device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p_left = torch.randn(9, 3, dtype=acc, device=device)
    p_right = torch.randn(21, 3, dtype=acc, device=device)
    assert_close(go.project(g, p_left, True), p_left.double().t() @ g.double(), acc, "left")
    assert_close(go.project(g, p_right, False), g.double() @ p_right.double(), acc, "right")


# ----------------------------------------------------------------------------- the step


def _f64_copy(t):
    """A float64 CPU copy that never aliases t (.cpu().double() may return t itself)."""
    return t.detach().to("cpu", torch.float64, copy=True)


def _step_inputs(shape, dtype, device, left, low_rank=True, gen=None):
    gen = gen or _gen()
    m, n = shape
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype).to(device)
    rank = RANKS.get(shape, min(m, n))
    if not low_rank:
        states = [torch.zeros(m, n, dtype=acc, device=device) for _ in range(2)]
        return w, None, states
    size = m if left else n
    p = torch.linalg.qr(torch.randn(size, rank, generator=gen, dtype=torch.float64))[0].to(acc).to(device)
    low = (rank, n) if left else (m, rank)
    states = [torch.zeros(low, dtype=acc, device=device) for _ in range(2)]
    return w, p, states


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fira", [False, True])
def test_step_matches_reference(device, dtype, shape, fira):
    gen = _gen()
    left = ref.projects_left(shape)
    w, p, (m1, v1) = _step_inputs(shape, dtype, device, left, gen=gen)
    w_ref, p_ref, m_ref, v_ref = (_f64_copy(t) for t in (w, p, m1, v1))
    acc = m1.dtype
    fira_norm = torch.full((1,), -1.0, dtype=acc, device=device) if fira else None
    fira_norm_ref = torch.full((1,), -1.0, dtype=torch.float64) if fira else None
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, scale=0.7)
    # exp_avg is a sum of projected gradients over the steps, which can cancel (at
    # shape (1, 1) it is one number, e.g. 4e-5 out of terms of 0.1): its rounding
    # is bounded relative to the same sums on absolute values.
    m_mag = torch.zeros_like(m_ref)
    for step in range(1, 4):
        g = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        poison_cuda_allocator(device)
        go.galore_adamw_step(w, g, m1, v1, p, left=left, step=step, fira=fira, fira_prev_norm=fira_norm, **hyper)
        ref.adamw_step(w_ref, g.cpu().double(), m_ref, v_ref, p_ref, left, step, fira=fira,
                       fira_prev_norm=fira_norm_ref, **hyper)
        g_abs = g.cpu().double().abs()
        r_abs = p_ref.abs().t() @ g_abs if left else g_abs @ p_ref.abs()
        m_mag.mul_(hyper["beta1"]).add_(r_abs, alpha=1.0 - hyper["beta1"])
    tol_dtype = torch.float32 if dtype in (torch.float32, torch.float64) and device == "cuda" else dtype
    factor = 10 if dtype == torch.float32 else 1
    assert_close(m1, m_ref, torch.float64 if dtype == torch.float64 else torch.float32, "exp_avg", factor,
                 magnitude=m_mag)
    assert_close(v1, v_ref, torch.float64 if dtype == torch.float64 else torch.float32, "exp_avg_sq", factor)
    assert_close(w, w_ref, tol_dtype, "param", factor)
    if fira:
        assert_close(fira_norm, fira_norm_ref, torch.float64 if dtype == torch.float64 else torch.float32, "norm",
                     factor)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0,), (1,), (5, 3, 2), (33, 20)])
def test_plain_adamw_step_matches_reference(device, dtype, shape):
    gen = _gen()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    m1, v1 = torch.zeros(shape, dtype=acc, device=device), torch.zeros(shape, dtype=acc, device=device)
    w_ref, m_ref, v_ref = (_f64_copy(t) for t in (w, m1, v1))
    for step in range(1, 4):
        g = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
        go.galore_adamw_step(w, g, m1, v1, None, left=False, step=step, lr=0.02, weight_decay=0.05)
        ref.adamw_step(w_ref, g.cpu().double(), m_ref, v_ref, None, False, step, lr=0.02, weight_decay=0.05)
    assert_close(w, w_ref, dtype, "param")
    assert_close(m1, m_ref, acc, "exp_avg")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,group", [((33, 20), 8), ((17, 65), 0), ((24, 24), 5)])
def test_int4_step_equals_step_with_dequantised_projector(device, dtype, shape, group):
    gen = _gen()
    left = ref.projects_left(shape)
    w, p, (m1, v1) = _step_inputs(shape, dtype, device, left, gen=gen)
    packed, scales, zeros = go.quantize_int4(p, group)
    p_deq = go.dequantize_int4(packed, scales, zeros, p.shape[0], group)
    w2, m2, v2 = w.clone(), m1.clone(), v1.clone()
    g = torch.randn(*shape, generator=gen).to(dtype).to(device)
    hyper = dict(left=left, step=1, lr=0.01, weight_decay=0.01, scale=0.5)
    go.galore_adamw_step(w, g, m1, v1, packed, proj_scales=scales, proj_zeros=zeros, quant_group_size=group, **hyper)
    go.galore_adamw_step(w2, g, m2, v2, p_deq, **hyper)
    assert_close(m1, m2, torch.float32, "exp_avg")
    assert_close(w, w2, dtype, "param")


@pytest.mark.parametrize("device", DEVICES)
def test_step_with_given_low_rank_grad(device):
    gen = _gen()
    w, p, (m1, v1) = _step_inputs((33, 20), torch.float32, device, False, gen=gen)
    g = torch.randn(33, 20, generator=gen).to(device)
    w2, m2, v2 = w.clone(), m1.clone(), v1.clone()
    go.galore_adamw_step(w, g, m1, v1, p, left=False, step=2, lr=0.01)
    go.galore_adamw_step(w2, g, m2, v2, p, left=False, step=2, lr=0.01, low_rank_grad=go.project(g, p, False))
    assert torch.equal(m1, m2)
    assert_close(w, w2, torch.float32, "param")


# ----------------------------------------------------------------------------- opcheck, compile


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_opcheck(device):
    g = low_rank_plus_noise(12, 30, 4, dtype=torch.float32, device=device)
    # One side per projector op (the side only changes shapes); both for the step.
    torch.library.opcheck(torch.ops.lrk.galore_svd_projector.default, (g, 3, True))
    torch.library.opcheck(torch.ops.lrk.galore_rsvd_projector.default, (g, 3, False, 4, 1, 7))
    torch.library.opcheck(torch.ops.lrk.galore_random_projector.default, (g, 3, True, 7))
    torch.library.opcheck(torch.ops.lrk.galore_dct_scores.default, (g, False))
    torch.library.opcheck(torch.ops.lrk.galore_dct_select.default, (g, 3, True))
    for left in (True, False):
        p = go.svd_projector(g, 3, left)
        if left:
            torch.library.opcheck(torch.ops.lrk.galore_project.default, (g, p, left))
            torch.library.opcheck(torch.ops.lrk.galore_quantize_int4.default, (p, 8))
        packed, scales, zeros = go.quantize_int4(p, 8)
        if not left:
            torch.library.opcheck(torch.ops.lrk.galore_dequantize_int4.default, (packed, scales, zeros, p.shape[0], 8))
        low = (3, 30) if left else (12, 3)
        w = torch.randn(12, 30, device=device)
        states = [torch.zeros(low, device=device), torch.zeros(low, device=device)]
        torch.library.opcheck(torch.ops.lrk.galore_adamw_step.default,
                              (w, g, *states, p, None, None, 0, left, 1, 0.01, 0.9, 0.999, 1e-6, 0.0, 1.0, True,
                               None, True, torch.full((1,), -1.0, device=device)))
        torch.library.opcheck(torch.ops.lrk.galore_adamw_step.default,
                              (w, g, *states, packed, scales, zeros, 8, left, 2, 0.01, 0.9, 0.999, 1e-6, 0.1, 1.0,
                               True, None, False, None))
    torch.library.opcheck(torch.ops.lrk.galore_dct_basis.default, (torch.tensor([0, 3], device=device), 8, None))
    torch.library.opcheck(torch.ops.lrk.philox_normal_.default, (torch.empty(5, 3, device=device), 3, 1.0))
    full = [torch.zeros(4, 5, device=device) for _ in range(2)]
    torch.library.opcheck(torch.ops.lrk.galore_adamw_step.default,
                          (torch.randn(4, 5, device=device), torch.randn(4, 5, device=device), *full, None, None,
                           None, 0, False, 1, 0.01, 0.9, 0.999, 1e-6, 0.0, 1.0, True, None, False, None))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def refresh_and_step(w, g, m1, v1, seed):
        p = go.rsvd_projector(g, 3, True, 4, 1, 11)
        q = go.random_projector(g, 3, True, 5)
        idx = go.dct_select(g, 3, True)
        d = go.dct_basis(idx, g.shape[0])
        go.galore_adamw_step(w, g, m1, v1, p, left=True, step=1, lr=0.01, weight_decay=0.1)
        return p, q, d

    g = low_rank_plus_noise(10, 24, 4, dtype=torch.float32, device=device)
    w = torch.randn(10, 24, device=device)
    m1, v1 = torch.zeros(3, 24, device=device), torch.zeros(3, 24, device=device)
    w2, m2, v2 = w.clone(), m1.clone(), v1.clone()
    compiled = torch.compile(refresh_and_step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out_c = compiled(w, g, m1, v1, 0)
    out_e = refresh_and_step(w2, g, m2, v2, 0)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(m1, m2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: go.svd_projector(torch.randn(4, 6), 5, True), "rank: expected 1 <= rank <= min"),
        (lambda: go.rsvd_projector(torch.randn(4, 6), 0, True), "rank: expected 1 <= rank"),
        (lambda: go.rsvd_projector(torch.randn(4, 6), 2, True, -1), "oversample: expected"),
        (lambda: go.rsvd_projector(torch.randn(4, 6), 2, True, 2, 100), "power_iters: expected"),
        (lambda: go.random_projector(torch.randn(4, 6, 2), 2, True, 0), "grad: expected a 2-D tensor"),
        (lambda: go.dct_select(torch.randn(0, 6), 1, True), "grad: expected a non-empty matrix"),
        (lambda: go.dct_scores(torch.randint(0, 3, (4, 5)), True), "grad: expected dtype float32"),
        (lambda: go.dct_basis(torch.tensor([0, 9]), 8), r"indices: expected values in \[0, 8\)"),
        (lambda: go.dct_basis(torch.tensor([0.0]), 8), "indices: expected dtype int64"),
        (lambda: go.dequantize_int4(torch.zeros(2, 3, dtype=torch.uint8), torch.ones(2, 1), torch.zeros(2, 1, dtype=torch.uint8), 9, 0),
         "packed: expected size 5 in dim 1"),
        (lambda: go.dequantize_int4(torch.zeros(2, 5, dtype=torch.uint8), torch.ones(2, 2), torch.zeros(2, 1, dtype=torch.uint8), 9, 0),
         "proj_scales: expected size 1 in dim 1"),
        (lambda: go.project(torch.randn(4, 6), torch.randn(6, 2), True), "proj: expected size 4 in dim 0"),
        (lambda: go.project(torch.randn(4, 6), torch.randn(4, 2, dtype=torch.float64), True), "proj: expected dtype Float"),
    ],
)
def test_projector_bad_input_names_the_argument(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()


def _step_args(**change):
    args = dict(param=torch.randn(4, 6), grad=torch.randn(4, 6), exp_avg=torch.zeros(2, 6), exp_avg_sq=torch.zeros(2, 6),
                proj=torch.linalg.qr(torch.randn(4, 2))[0], left=True, step=1, lr=0.01)
    args.update(change)
    return args


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(grad=torch.randn(4, 5)), r"grad: expected shape \[4, 6\]"),
        (dict(grad=torch.randn(4, 6, dtype=torch.float64)), "grad: expected dtype Float"),
        (dict(exp_avg=torch.zeros(6, 2)), r"exp_avg: expected shape \[2, 6\]"),
        (dict(exp_avg_sq=torch.zeros(2, 6, dtype=torch.float64)), "exp_avg_sq: expected dtype Float"),
        (dict(proj=torch.randn(6, 2)), "proj: expected size 4 in dim 0"),
        (dict(proj=torch.randn(4, 0)), r"proj: rank \(dim 1\) must be at least 1"),
        (dict(step=0), "step: expected the step count"),
        (dict(lr=float("nan")), "lr: expected a finite number"),
        (dict(beta1=1.0), r"beta1: expected a number in \[0, 1\)"),
        (dict(eps=-1.0), "eps: expected a finite number >= 0"),
        (dict(weight_decay=-0.1), "weight_decay: expected"),
        (dict(scale=float("inf")), "scale: expected a finite number"),
        (dict(fira=True), "fira_prev_norm: fira needs its norm state"),
        (dict(fira=True, fira_prev_norm=torch.zeros(2)), "fira_prev_norm: expected one Float element"),
        (dict(low_rank_grad=torch.zeros(3, 6)), r"low_rank_grad: expected shape \[2, 6\]"),
        (dict(proj=None, fira=True, exp_avg=torch.zeros(4, 6), exp_avg_sq=torch.zeros(4, 6)), "fira: needs a projector"),
        (dict(param=torch.randn(6, 4).t()), "param: expected a contiguous tensor"),
        (dict(proj=torch.zeros(2, 2, dtype=torch.uint8)), "proj: a uint8 .int4. projector needs proj_scales"),
        (dict(proj_scales=torch.ones(2, 1)), "proj_scales/proj_zeros: only for a uint8"),
    ],
)
def test_step_bad_input_names_the_argument(change, match):
    args = _step_args(**change)
    with pytest.raises(RuntimeError, match=match):
        go.galore_adamw_step(args.pop("param"), args.pop("grad"), args.pop("exp_avg"), args.pop("exp_avg_sq"),
                             args.pop("proj"), **args)
