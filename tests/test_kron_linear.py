"""torch.ops.lrk.kron_linear: values and gradients vs the dense torch.kron reference
(float64), gradcheck, opcheck, torch.compile, row chunking, and bad input."""
import math

import pytest
import torch

import lrk
import lrk.kron_ops  # noqa: F401  (registers fakes and autograd)
from lrk import reference_kron as ref
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close, poison_cuda_allocator, reference_leaves

# (leading dims of x, terms k, m1, n1, m2, n2): empty batch, m1 = 1, n1 = m2 = 1,
# non-square factors, k = 1 and 64, 3-D input, and square 8x8 / 16x16 factors.
SHAPES = [
    ((0,), 2, 3, 2, 4, 5),
    ((1,), 1, 1, 6, 7, 3),
    ((7,), 3, 5, 2, 3, 4),
    ((2, 5), 4, 2, 3, 4, 2),
    ((33,), 64, 3, 4, 2, 5),
    ((9,), 3, 6, 1, 1, 7),
    ((65,), 2, 8, 8, 8, 8),
    ((40,), 4, 16, 16, 16, 16),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def kron_inputs(lead, k, m1, n1, m2, n2, dtype, device, sigma=True, base=True, base_grad=False):
    """Fresh random x, u, v, sigma, weight, bias at adapter-like scales; x, u, v and sigma
    require grad, weight and bias when base_grad."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    K, N = n1 * n2, m1 * m2
    x = rnd(*lead, K).requires_grad_()
    u = rnd(k, m1, n1, std=1 / math.sqrt(n1)).requires_grad_()
    v = rnd(k, m2, n2, std=1 / math.sqrt(n2 * k)).requires_grad_()
    s = rnd(k).requires_grad_() if sigma else None
    w = rnd(N, K, std=1 / math.sqrt(K)).requires_grad_(base_grad) if base else None
    b = rnd(N).requires_grad_(base_grad) if base else None
    return x, u, v, s, w, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,k,m1,n1,m2,n2", SHAPES)
@pytest.mark.parametrize("variant", ["adapter", "base+sigma"])
def test_forward_backward_match_reference(device, dtype, lead, k, m1, n1, m2, n2, variant):
    with_base = variant == "base+sigma"
    x, u, v, s, w, b = kron_inputs(lead, k, m1, n1, m2, n2, dtype, device, sigma=with_base, base=with_base,
                                   base_grad=with_base and k == 3)
    scale = 0.7
    poison_cuda_allocator(device)
    y = lrk.kron_ops.kron_linear(x, u, v, s, w, b, scale)
    leaf = reference_leaves(x, u, v, s, w, b)
    y_ref = ref.kron_linear(*leaf, scale)
    assert y.shape == y_ref.shape and y.dtype == dtype and y.device.type == device
    factor = 10 if device == "cuda" and dtype == torch.float32 else 1  # cuBLAS fp32 summation order
    assert_close(y, y_ref, dtype, "y", factor)
    if y.numel() == 0:
        return
    gy = torch.randn(y_ref.shape, dtype=torch.float64).to(dtype).to(device)
    poison_cuda_allocator(device)
    y.backward(gy)
    y_ref.backward(gy.double().cpu())
    for name, t, t_ref in zip(("x", "u", "v", "sigma", "weight", "bias"), (x, u, v, s, w, b), leaf):
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.dtype == dtype and t.grad.shape == t.shape, name
        if name == "sigma":
            _assert_grad_sigma_close(t.grad, t_ref.grad, gy, leaf, scale, dtype, factor)
        else:
            assert_close(t.grad, t_ref.grad, dtype, f"grad {name}", factor)


def _assert_grad_sigma_close(grad, grad_ref, gy, leaf, scale, dtype, factor):
    """grad sigma_t = scale * <dY, T_t x> is one long dot product that may cancel to
    nearly nothing, so its error is measured against the sum of the magnitudes of its
    summands (the dot product's condition), not against its value."""
    x, u, v = (t.detach() for t in leaf[:3])
    gy64 = gy.double().cpu().reshape(-1, u.shape[1] * v.shape[1])
    x2 = x.reshape(-1, u.shape[2] * v.shape[2])
    magnitude = torch.stack([(gy64 * (x2 @ torch.kron(u[t], v[t]).t())).abs().sum() * abs(scale)
                             for t in range(u.shape[0])])
    err = (grad.double().cpu() - grad_ref).norm() / magnitude.norm()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype] * factor
    assert err < tol, f"grad sigma: error {err:.3e} relative to the summands' magnitude >= {tol:.1e}"


@pytest.mark.parametrize("device", DEVICES)
def test_partial_gradients(device):
    """Only what requires grad is computed; frozen x, and an adapter with frozen u."""
    x, u, v, s, w, b = kron_inputs((6,), 3, 4, 3, 2, 5, torch.float64, device)
    x = x.detach()
    u = u.detach()
    y = lrk.kron_ops.kron_linear(x, u, v, s, w, b, 1.5)
    y.sum().backward()
    leaf = reference_leaves(x, u, v, s, w, b)
    ref.kron_linear(*leaf, 1.5).sum().backward()
    assert x.grad is None and u.grad is None
    assert_close(v.grad, leaf[2].grad, torch.float64, "grad v")
    assert_close(s.grad, leaf[3].grad, torch.float64, "grad sigma")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, u, v, s, w, b = kron_inputs((12,), 2, 3, 4, 5, 6, torch.float32, device)
    xs = torch.randn(12, 48, device=device)[:, ::2].requires_grad_()  # strided view
    ut = u.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    vt = v.detach().transpose(1, 2).contiguous().transpose(1, 2)
    wt = w.detach().t().contiguous().t()
    y = lrk.kron_ops.kron_linear(xs, ut, vt, s, wt, b, 0.5)
    leaf = reference_leaves(xs, ut, vt, s, wt, b)
    y_ref = ref.kron_linear(*leaf, 0.5)
    assert_close(y, y_ref, torch.float32, "y")
    y.sum().backward()
    y_ref.sum().backward()
    assert_close(xs.grad, leaf[0].grad, torch.float32, "grad x")
    assert_close(ut.grad, leaf[1].grad, torch.float32, "grad u")


@pytest.mark.parametrize("device", DEVICES)
def test_row_chunks_give_the_same_result(device, monkeypatch):
    """A small intermediate budget splits the rows into many chunks (the path that
    bounds memory for many terms); values and gradients must not change."""
    x, u, v, s, w, b = kron_inputs((37,), 5, 3, 4, 2, 3, torch.float64, device)
    outs = []
    for budget in (None, "50"):  # 50 elements: n1*k*m2 = 40 per row, so one row per chunk
        if budget is None:
            monkeypatch.delenv("LRK_KRON_MAX_INTERMEDIATE", raising=False)
        else:
            monkeypatch.setenv("LRK_KRON_MAX_INTERMEDIATE", budget)
        y = lrk.kron_ops.kron_linear(x, u, v, s, w, b, 0.9)
        grads = torch.autograd.grad(y.square().sum(), (x, u, v, s))
        outs.append((y, *grads))
    leaf = reference_leaves(x, u, v, s, w, b)
    y_ref = ref.kron_linear(*leaf, 0.9)
    assert_close(outs[1][0], y_ref, torch.float64, "y, chunked")
    for a, c in zip(outs[0], outs[1]):
        assert_close(c, a, torch.float64, "chunked vs whole")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lead,k,m1,n1,m2,n2", [
    ((2, 3), 3, 2, 3, 4, 2),
    ((3,), 1, 1, 4, 3, 2),    # m1 = 1, one term
    ((2,), 64, 2, 1, 1, 3),   # 64 terms, n1 = m2 = 1
])
def test_gradcheck(device, lead, k, m1, n1, m2, n2):
    args = kron_inputs(lead, k, m1, n1, m2, n2, torch.float64, device, base_grad=True)
    fn = lambda *t: lrk.kron_ops.kron_linear(*t, 0.8)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_without_sigma_and_base(device):
    x, u, v, _, _, _ = kron_inputs((4,), 2, 1, 5, 3, 2, torch.float64, device, sigma=False, base=False)
    fn = lambda *t: lrk.kron_ops.kron_linear(*t, None, None, None, 1.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, u, v))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x, u, v, s, w, b = kron_inputs((2, 5), 3, 2, 4, 3, 2, dtype, device)
    for args in [(x, u, v, s, w, b, 1.5), (x, u, v, None, None, None, 1.0)]:
        torch.library.opcheck(torch.ops.lrk.kron_linear.default, args)
    gy = torch.randn(2, 5, 6, dtype=dtype, device=device)
    xd, ud, vd, sd = x.detach(), u.detach(), v.detach(), s.detach()
    for mask, sig, wt in (([True, True, True, True], sd, w), ([True, False, False, False], None, None),
                          ([False, True, True, True], sd, None)):
        torch.library.opcheck(torch.ops.lrk.kron_linear_bwd.default, (gy, xd, ud, vd, sig, wt, 1.5, mask))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, u, v, s, w, b = kron_inputs((5, 7), 4, 3, 4, 2, 6, torch.float32, device)

    def step(x, u, v, s, w, b):
        return torch.nn.functional.silu(lrk.kron_ops.kron_linear(x, u, v, s, w, b, 2.0)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss_c = compiled(x, u, v, s, w, b)
    grads_c = torch.autograd.grad(loss_c, (x, u, v, s))
    loss_e = step(x, u, v, s, w, b)
    grads_e = torch.autograd.grad(loss_e, (x, u, v, s))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_never_materialises_the_kronecker_product():
    """4096 x 4096 adapter (64x64 ⊗ 64x64) on 16 rows: the dense product would need
    32 MiB in bf16; forward and backward must stay far below it."""
    if not lrk.has_cuda_kernels():
        pytest.skip("lrk built without CUDA")
    x, u, v, s, _, _ = kron_inputs((16,), 1, 64, 64, 64, 64, torch.bfloat16, "cuda", base=False)
    lrk.kron_ops.kron_linear(x, u, v, s).float().sum().backward()  # warm-up: cuBLAS workspaces
    for t in (x, u, v, s):
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = lrk.kron_ops.kron_linear(x, u, v, s)
    y.float().sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < 4 * 2**20, f"peak extra memory {extra / 2**20:.1f} MiB"


# Shapes the fused CUDA kernel takes (bf16/fp16, factor sizes multiples of 16, output
# tiles up to 64 x 64, factors in shared memory): the 64x64 ⊗ 64x64 and others.
FUSED_SHAPES = [
    ((37,), 4, 64, 64, 64, 64),
    ((3,), 1, 16, 16, 16, 16),
    ((2, 65), 3, 32, 16, 16, 48),
    ((1000,), 5, 64, 32, 32, 64),
    ((5,), 64, 16, 16, 16, 32),   # 64 terms, non-square v
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead,k,m1,n1,m2,n2", FUSED_SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_fused_cuda_forward(dtype, lead, k, m1, n1, m2, n2, with_base, monkeypatch):
    """The fused kernel against a float64 reference (on the GPU: these factors make a
    dense product too large for a quick CPU reference) and against the portable path."""
    if not lrk.has_cuda_kernels():
        pytest.skip("lrk built without CUDA")
    x, u, v, s, w, b = kron_inputs(lead, k, m1, n1, m2, n2, dtype, "cuda", base=with_base)
    monkeypatch.delenv("LRK_KRON_FUSED", raising=False)
    poison_cuda_allocator("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y = lrk.kron_ops.kron_linear(x, u, v, s, w, b, 0.6)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert any("kron_fused_fwd_kernel" in n for n in names), "the fused kernel did not run"
    leaf = [t.detach().double() if t is not None else None for t in (x, u, v, s, w, b)]
    y_ref = ref.kron_linear(*leaf, 0.6)
    assert_close(y, y_ref, dtype, "y (fused)")
    monkeypatch.setenv("LRK_KRON_FUSED", "0")
    y_portable = lrk.kron_ops.kron_linear(x, u, v, s, w, b, 0.6)
    assert_close(y, y_portable, dtype, "fused vs portable")
    monkeypatch.delenv("LRK_KRON_FUSED")
    gy = torch.randn_like(y)
    y.backward(gy)  # backward is the portable path; check one gradient end to end
    leaf_u = leaf[1].clone().requires_grad_()
    ref.kron_linear(leaf[0], leaf_u, *leaf[2:], 0.6).backward(gy.double())
    assert_close(u.grad, leaf_u.grad, dtype, "grad u")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
@pytest.mark.parametrize("lead,k,m1,n1,m2,n2", FUSED_SHAPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_fused_cuda_grad_x_only(lead, k, m1, n1, m2, n2, with_base, monkeypatch):
    """Frozen factors: grad x alone is the transposed adapter, run by the fused kernel."""
    if not lrk.has_cuda_kernels():
        pytest.skip("lrk built without CUDA")
    x, u, v, s, w, b = kron_inputs(lead, k, m1, n1, m2, n2, torch.bfloat16, "cuda", base=with_base)
    u, v, s = u.detach(), v.detach(), s.detach()
    monkeypatch.delenv("LRK_KRON_FUSED", raising=False)
    y = lrk.kron_ops.kron_linear(x, u, v, s, w, b, 0.6)
    gy = torch.randn_like(y)
    poison_cuda_allocator("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        y.backward(gy)
        torch.cuda.synchronize()
    assert any("kron_fused_fwd_kernel" in e.name for e in prof.events()), "grad x did not take the fused kernel"
    assert u.grad is None and v.grad is None and s.grad is None
    leaf = [t.detach().double() if t is not None else None for t in (x, u, v, s, w, b)]
    leaf[0].requires_grad_()
    ref.kron_linear(*leaf, 0.6).backward(gy.double())
    assert_close(x.grad, leaf[0].grad, torch.bfloat16, "grad x (fused, transposed factors)")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.cuda
def test_fused_cuda_shared_memory_sizes_in_any_order(monkeypatch):
    """The fused kernel's shared-memory allowance and occupancy are set up once per
    (device, dtype, size): a large size (past the 48 KiB default), a small one, the
    large one again and one in between, each against the float64 reference."""
    if not lrk.has_cuda_kernels():
        pytest.skip("lrk built without CUDA")
    monkeypatch.delenv("LRK_KRON_FUSED", raising=False)
    for dtype in (torch.float16, torch.bfloat16):
        for lead, k, m1, n1, m2, n2 in [((37,), 4, 64, 64, 64, 64), ((3,), 1, 16, 16, 16, 16),
                                        ((37,), 4, 64, 64, 64, 64), ((1000,), 5, 64, 32, 32, 64)]:
            x, u, v, s, w, b = kron_inputs(lead, k, m1, n1, m2, n2, dtype, "cuda")
            with torch.no_grad():
                y = lrk.kron_ops.kron_linear(x, u, v, s, w, b, 0.6)
            leaf = [t.detach().double() for t in (x, u, v, s, w, b)]
            assert_close(y, ref.kron_linear(*leaf, 0.6), dtype, f"y (fused) {m1}x{n1} (x) {m2}x{n2}, k={k}")


# ----------------------------------------------------------------------------- bad input


def _good(device="cpu", dtype=torch.float32):
    def t(*shape):
        return torch.randn(*shape, dtype=dtype, device=device)
    # k = 2 terms, u [2, 3, 4], v [2, 5, 2]: N = 15, K = 8
    return dict(x=t(4, 8), u=t(2, 3, 4), v=t(2, 5, 2), sigma=t(2), weight=t(15, 8), bias=t(15), scale=1.0)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.randn(4, 9)), r"x: expected in_features = u.shape\[2\] \* v.shape\[2\] = 4 \* 2 = 8"),
        (dict(x=torch.tensor(1.0)), "x: expected a tensor of shape"),
        (dict(x=torch.ones(4, 8, dtype=torch.int64)), "x: expected dtype float32"),
        (dict(u=torch.randn(2, 3, 4, dtype=torch.float64)), "u: expected dtype Float"),
        (dict(u=torch.randn(3, 4)), "u: expected a 3-D tensor"),
        (dict(u=torch.randn(0, 3, 4), v=torch.randn(0, 5, 2), sigma=torch.randn(0)), "u: expected at least one"),
        (dict(u=torch.randn(2, 0, 4)), "u: expected factors"),
        (dict(v=torch.randn(3, 5, 2)), r"v: expected size 2 in dim 0 \(number of terms = u.shape\[0\]\)"),
        (dict(sigma=torch.randn(3)), r"sigma: expected size 2 in dim 0 \(number of terms"),
        (dict(sigma=torch.randn(2, 1)), "sigma: expected a 1-D tensor"),
        (dict(weight=torch.randn(16, 8)), r"weight: expected out_features = u.shape\[1\] \* v.shape\[1\] = 3 \* 5 = 15"),
        (dict(weight=torch.randn(15, 9)), "weight: expected size 8 in dim 1"),
        (dict(bias=torch.randn(14)), "bias: expected out_features = .* = 15"),
        (dict(scale=float("nan")), "scale: expected a finite number"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        lrk.kron_ops.kron_linear(**args)


def test_bad_backward_input_names_the_argument():
    a = _good()
    gy = torch.randn(4, 14)
    with pytest.raises(RuntimeError, match=r"grad_y: expected shape \[\.\.\., 15\]"):
        torch.ops.lrk.kron_linear_bwd(gy, a["x"], a["u"], a["v"], a["sigma"], a["weight"], 1.0, [True] * 4)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_on_device(device):
    args = _good(device, torch.bfloat16)
    args["v"] = args["v"].float()
    with pytest.raises(RuntimeError, match="v: expected dtype BFloat16"):
        lrk.kron_ops.kron_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mix():
    args = _good("cuda")
    args["sigma"] = args["sigma"].cpu()
    with pytest.raises(RuntimeError, match="sigma: expected a tensor on cuda"):
        lrk.kron_ops.kron_linear(**args)
