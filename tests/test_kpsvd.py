"""torch.ops.lrk.kpsvd (Kronecker-product SVD) and the rank / factorisation helpers:
the KPSVD optimality property against the exact SVD of the rearranged matrix, the
randomized variant against the exact optimum, awkward factorisations, opcheck,
compile, and bad input."""
import pytest
import torch

import lrk
import lrk.kron_ops  # noqa: F401  (registers fakes)
from lrk import reference_kron as ref
from lrk.kron_ops import kpsvd, kron_dense
from lrk.kron_select import choose_factorization, divisors, elbow_rank, energy_rank
from conftest import DEVICES, DEVICES_NO_EMU

# (m1, m2, n1, n2, rank): square, non-square, m1 = 1, n1 = m2 = 1, full rank.
FACTORS = [
    (4, 5, 3, 6, 3),
    (1, 12, 7, 2, 2),
    (6, 1, 1, 9, 4),
    (8, 8, 8, 8, 16),
    (3, 2, 2, 3, 6),   # rank = min(m1*n1, m2*n2): exact reconstruction
    (8, 8, 8, 8, 64),  # 64 terms, full rank
    (2, 9, 16, 4, 7),  # non-square R [32, 36], rank not a power of two
]


def _weight(m1, m2, n1, n2, dtype=torch.float64, device="cpu", decay=None, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(0, 2**31, ()).item()))
    w = torch.randn(m1 * m2, n1 * n2, generator=g, dtype=torch.float64)
    if decay is not None:  # a spectrum of R(W) decaying like decay**t, as trained weights have
        R = ref.rearrange(w, m1, m2, n1, n2)
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        S = S[0] * decay ** torch.arange(S.numel(), dtype=torch.float64)
        R = (U * S) @ Vh
        w = R.reshape(m1, n1, m2, n2).permute(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)
    return w.to(dtype).to(device)


def _approx_error(w, factors):
    return (w.double().cpu() - kron_dense(factors.u.double().cpu(), factors.v.double().cpu(),
                                          factors.sigma.double().cpu())).norm()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m1,m2,n1,n2,rank", FACTORS)
def test_exact_kpsvd_matches_the_svd_of_the_rearrangement(device, m1, m2, n1, n2, rank):
    w = _weight(m1, m2, n1, n2, device=device)
    f = kpsvd(w, (m1, m2, n1, n2), rank, method="exact")
    assert f.sigma.shape == (rank,) and f.u.shape == (rank, m1, n1) and f.v.shape == (rank, m2, n2)
    assert f.sigma.dtype == torch.float64 and f.sigma.device.type == device
    s_ref, u_ref, v_ref = ref.kpsvd(w.cpu(), m1, m2, n1, n2, rank)
    torch.testing.assert_close(f.sigma.cpu(), s_ref, rtol=1e-10, atol=1e-12)
    # Unit-norm factors; each term equals the reference's (signs cancel in u ⊗ v).
    torch.testing.assert_close(f.u.flatten(1).norm(dim=1).cpu(), torch.ones(rank, dtype=torch.float64))
    torch.testing.assert_close(f.v.flatten(1).norm(dim=1).cpu(), torch.ones(rank, dtype=torch.float64))
    for t in range(rank):
        torch.testing.assert_close(torch.kron(f.u[t], f.v[t]).cpu(), torch.kron(u_ref[t], v_ref[t]),
                                   rtol=1e-8, atol=1e-10)
    # Deterministic sign: the largest entry of every u_t is positive.
    flat = f.u.flatten(1)
    assert (flat.gather(1, flat.abs().argmax(1, keepdim=True)) > 0).all()


@pytest.mark.parametrize("m1,m2,n1,n2,rank", FACTORS)
def test_kpsvd_is_the_best_sum_of_kronecker_products(m1, m2, n1, n2, rank):
    """Frobenius error = the optimum sqrt(sum of the discarded sigma^2 of R(W)), and no
    other sum of `rank` Kronecker products tried does better."""
    w = _weight(m1, m2, n1, n2)
    f = kpsvd(w, (m1, m2, n1, n2), rank, method="exact")
    err = _approx_error(w, f)
    optimum = ref.kpsvd_error(w, m1, m2, n1, n2, rank)
    torch.testing.assert_close(err, optimum, rtol=1e-9, atol=1e-10)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # perturbed factors, and another set of terms entirely
        pu = f.u + 0.05 * torch.randn(f.u.shape, generator=g, dtype=torch.float64)
        pv = f.v + 0.05 * torch.randn(f.v.shape, generator=g, dtype=torch.float64)
        assert (w - kron_dense(pu, pv, f.sigma)).norm() >= err - 1e-12
    other = kpsvd(w + 0.3 * torch.randn(w.shape, generator=g, dtype=torch.float64), (m1, m2, n1, n2), rank)
    assert _approx_error(w, other) >= err - 1e-12


def test_recovers_a_sum_of_kronecker_products():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    b = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    w = sum(torch.kron(a[t], b[t]) for t in range(3))
    f = kpsvd(w, (4, 5, 6, 2), 3)
    torch.testing.assert_close(kron_dense(f.u, f.v, f.sigma), w, rtol=1e-10, atol=1e-10)
    single = kpsvd(torch.kron(a[0], b[0]), (4, 5, 6, 2), 1)
    torch.testing.assert_close(single.sigma, (a[0].norm() * b[0].norm()).reshape(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decay", [0.97, None])
def test_randomized_is_within_tolerance_of_the_optimum(device, decay):
    m1 = m2 = n1 = n2 = 24  # R is 576 x 576: "auto" would pick the randomized path
    w = _weight(m1, m2, n1, n2, dtype=torch.float32, device=device, decay=decay, seed=11)
    rank = 16
    optimum = ref.kpsvd_error(w.double().cpu(), m1, m2, n1, n2, rank)
    f = kpsvd(w, (m1, m2, n1, n2), rank, method="randomized", seed=5)
    assert f.sigma.dtype == torch.float32
    err = _approx_error(w, f)
    assert err <= optimum * (1 + 1e-3), f"randomized error {err:.6e} vs optimum {optimum:.6e}"
    assert (f.sigma[:-1] >= f.sigma[1:]).all()
    auto = kpsvd(w, (m1, m2, n1, n2), rank, seed=5)
    torch.testing.assert_close(auto.sigma, f.sigma)  # auto chose the randomized path, same seed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomized_factors_are_orthonormal(device, dtype):
    """The range finder's re-orthonormalisation (Cholesky-QR) keeps the terms'
    factors orthonormal: vec(U_t) and vec(V_t) are the singular vectors of R(W)."""
    w = _weight(24, 24, 24, 24, dtype=dtype, device=device, decay=0.9, seed=8)
    f = kpsvd(w, (24, 24, 24, 24), 12, method="randomized", seed=3)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    eye = torch.eye(12, dtype=dtype, device=device)
    for factor in (f.u, f.v):
        flat = factor.flatten(1)
        torch.testing.assert_close(flat @ flat.t(), eye, rtol=0, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_randomized_on_a_weight_of_lower_kronecker_rank(device, dtype):
    """R(W) of rank 3 while the sketch has 12 columns: the sketch's columns are
    dependent (in float64 Cholesky-QR gives way to Householder QR here; in float32
    rounding noise keeps the Gram matrix factorizable), and the result is still
    W's exact decomposition with zeros after the third term."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 20, 18, generator=g, dtype=torch.float64)
    b = torch.randn(3, 16, 22, generator=g, dtype=torch.float64)
    w = sum(torch.kron(a[t], b[t]) for t in range(3)).to(dtype).to(device)
    f = kpsvd(w, (20, 16, 18, 22), 8, method="randomized", oversample=4, power_iters=2, seed=1)
    assert torch.isfinite(f.sigma).all() and torch.isfinite(f.u).all() and torch.isfinite(f.v).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert (f.sigma[3:] <= tol * f.sigma[0]).all(), f.sigma
    assert _approx_error(w, f) <= tol * w.double().norm().cpu()


def test_randomized_is_seeded():
    w = _weight(20, 30, 30, 20, dtype=torch.float32, seed=2)
    a = kpsvd(w, (20, 30, 30, 20), 8, method="randomized", seed=1, power_iters=0)
    b = kpsvd(w, (20, 30, 30, 20), 8, method="randomized", seed=1, power_iters=0)
    c = kpsvd(w, (20, 30, 30, 20), 8, method="randomized", seed=2, power_iters=0)
    assert torch.equal(a.sigma, b.sigma) and torch.equal(a.u, b.u) and torch.equal(a.v, b.v)
    assert not torch.equal(a.sigma, c.sigma)


def test_power_iterations_improve_a_flat_spectrum():
    w = _weight(24, 24, 24, 24, dtype=torch.float64, seed=4)
    optimum = ref.kpsvd_error(w, 24, 24, 24, 24, 8)
    errs = [_approx_error(w, kpsvd(w, (24, 24, 24, 24), 8, method="randomized", power_iters=q, oversample=4))
            for q in (0, 6)]
    assert optimum <= errs[1] < errs[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lower_precision_weights(device, dtype):
    w = _weight(4, 6, 5, 3, dtype=dtype, device=device)
    f = kpsvd(w, (4, 6, 5, 3), 4)
    assert f.sigma.dtype == torch.float32 and f.u.dtype == torch.float32
    s_ref, _, _ = ref.kpsvd(w.double().cpu(), 4, 6, 5, 3, 4)
    torch.testing.assert_close(f.sigma.double().cpu(), s_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_opcheck(device):
    w = _weight(4, 5, 3, 6, dtype=torch.float32, device=device)
    torch.library.opcheck(torch.ops.lrk.kpsvd.default, (w, 4, 5, 3, 6, 3, "exact", 10, 4, 0))
    torch.library.opcheck(torch.ops.lrk.kpsvd.default, (w, 4, 5, 3, 6, 2, "randomized", 2, 1, 7))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    w = _weight(4, 5, 3, 6, dtype=torch.float32)

    def approx(w):
        s, u, v = torch.ops.lrk.kpsvd(w, 4, 5, 3, 6, 3)
        return kron_dense(u, v, s)

    compiled = torch.compile(approx, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(w), approx(w))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(m1=3), r"m1, m2: expected m1 \* m2 = out_features = weight.shape\[0\] = 20, got m1 \* m2 = 3 \* 5 = 15"),
        (dict(n2=5), r"n1, n2: expected n1 \* n2 = in_features = weight.shape\[1\] = 18, got n1 \* n2 = 3 \* 5 = 15"),
        (dict(m1=0), "m1, m2, n1, n2: expected factor sizes >= 1"),
        (dict(rank=0), r"rank: expected 1 <= rank <= min\(m1 \* n1, m2 \* n2\) = 12, got 0"),
        (dict(rank=13), r"rank: expected 1 <= rank <= min\(m1 \* n1, m2 \* n2\) = 12, got 13"),
        (dict(method="svd"), r'method: expected "auto", "exact" or "randomized", got "svd"'),
        (dict(oversample=-1), "oversample: expected a count >= 0"),
        (dict(power_iters=-2), "power_iters: expected a count >= 0"),
        (dict(weight=torch.randn(20)), "weight: expected a 2-D tensor"),
        (dict(weight=torch.ones(20, 18, dtype=torch.int32)), "weight: expected dtype float32"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(weight=torch.randn(20, 18), m1=4, m2=5, n1=3, n2=6, rank=3, method="auto", oversample=10,
                power_iters=4, seed=0)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lrk.kpsvd(**args)


# ----------------------------------------------------------------------------- rank selection


def test_energy_rank():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert energy_rank(s, 16 / 22) == 1
    assert energy_rank(s, 0.75) == 2
    assert energy_rank(s, 21 / 22) == 3
    assert energy_rank(s, 1.0) == 4
    assert energy_rank([1.0, 2.0, 4.0, 1.0], 0.75) == 2  # sorted first
    assert energy_rank(torch.zeros(3), 0.9) == 1
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="tau: expected an energy fraction"):
            energy_rank(s, bad)
    with pytest.raises(ValueError, match="sigma: expected at least one"):
        energy_rank(torch.tensor([]), 0.9)


def test_elbow_rank():
    # A sharp knee after three large values.
    s = torch.tensor([10.0, 9.0, 8.0, 1.0, 0.9, 0.8, 0.7, 0.6])
    assert elbow_rank(s) == 4  # the last large value sits at index 2; the farthest point is the first small one
    s2 = torch.tensor([10.0, 1.0, 0.9, 0.8, 0.7])
    assert elbow_rank(s2) == 2
    assert elbow_rank(s * 1000) == elbow_rank(s)  # scale-free
    assert elbow_rank(torch.ones(5)) == 5  # flat: no elbow
    assert elbow_rank([3.0, 1.0]) == 2
    assert elbow_rank([3.0]) == 1


def test_rank_of_a_planted_spectrum():
    """KPSVD of a weight that is 3 Kronecker terms plus small noise: both rules find 3."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    b = torch.randn(3, 4, 7, generator=g, dtype=torch.float64)
    w = sum((3 - t) * torch.kron(a[t], b[t]) for t in range(3)) + 1e-3 * torch.randn(24, 35, generator=g,
                                                                                      dtype=torch.float64)
    f = kpsvd(w, (6, 4, 5, 7), 20)
    assert energy_rank(f.sigma, 0.999) == 3
    assert elbow_rank(f.sigma) in (3, 4)


# ----------------------------------------------------------------------------- factorisation


def test_divisors():
    assert divisors(1) == [1]
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(49) == [1, 7, 49]
    with pytest.raises(ValueError):
        divisors(0)


@pytest.mark.parametrize(
    "n,k,factor,expected",
    [
        (4096, 4096, -1, (64, 64, 64, 64)),
        (11008, 4096, -1, (86, 128, 64, 64)),
        (127, 96, -1, (1, 127, 8, 12)),
        (4096, 768, 16, (16, 256, 16, 48)),
        (30, 7, 4, (3, 10, 1, 7)),
    ],
)
def test_choose_factorization(n, k, factor, expected):
    got = choose_factorization(n, k, factor)
    assert got == expected
    m1, m2, n1, n2 = got
    assert m1 * m2 == n and n1 * n2 == k


def test_choose_factorization_by_captured_energy():
    """A weight that is exactly one Kronecker product of shape (2x8) ⊗ (16x4): the
    energy-based choice finds that factorisation among the near-balanced ones."""
    g = torch.Generator().manual_seed(1)
    w = torch.kron(torch.randn(2, 8, generator=g, dtype=torch.float64),
                   torch.randn(16, 4, generator=g, dtype=torch.float64))
    assert choose_factorization(32, 32) == (4, 8, 4, 8)
    assert choose_factorization(32, 32, weight=w, rank=1) == (2, 16, 8, 4)
    with pytest.raises(ValueError, match="rank: expected a number of terms"):
        choose_factorization(32, 32, weight=w)
    with pytest.raises(ValueError, match="weight: expected shape"):
        choose_factorization(32, 16, weight=w, rank=1)
