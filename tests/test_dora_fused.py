"""torch.ops.lrk.dora_fused and dora_weight_norm: values and gradients vs the
float64 reference, gradcheck, opcheck, torch.compile, and bad input."""
import pytest
import torch

import lrk
from lrk import reference as ref
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import (assert_close, assert_compiled_grads_match_eager, check_gradients_of_exactly_the_needed, fp16_near_overflow_inputs, hopper_and_portable_cases, lora_inputs,
                     near_overflow_cases, poison_cuda_allocator, reference_leaves, saved_activation_shapes, use_kernel_path)

SHAPES = [
    ((0,), 40, 24, 3),
    ((1,), 33, 17, 1),
    ((2, 5), 21, 19, 4),
    ((513,), 257, 130, 64),
    ((64,), 128, 96, 16),
    ((130,), 64, 520, 48),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _magnitude(w, dtype, device):
    # PEFT initialises m to the row norms of W; perturb so that g != 1.
    m = torch.linalg.vector_norm(w.detach().double(), dim=1) * (0.5 + torch.rand(w.shape[0], dtype=torch.float64, device=w.device))
    return m.to(dtype).to(device).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_backward_match_reference(device, dtype, lead, K, N, r, p):
    if dtype == torch.float64 and device == "cuda" and lead[0] > 100:
        pytest.skip("fp64 on CUDA is covered by the small shapes")
    check_dora_against_reference(device, dtype, lead, K, N, r, p)


@hopper_and_portable_cases
def test_hopper_and_portable_paths_match_reference(monkeypatch, path, dtype, lead, K, N, r, bias, p):
    use_kernel_path(monkeypatch, path)  # Hopper: g and the bias in the GEMM's epilogue
    check_dora_against_reference("cuda", dtype, lead, K, N, r, p, bias=bias)


@near_overflow_cases
def test_fp16_near_overflow_h_on_both_paths(monkeypatch, path, bias, b_init):
    """h = 40000 with scale 2 (fp16): the Hopper forward once packed s*h in fp16
    (inf, then NaN); y, y_unscaled and h (rounded, unscaled) match the reference."""
    use_kernel_path(monkeypatch, path)
    x, w, b, a, bb, scale = fp16_near_overflow_inputs(bias, b_init, "cuda")
    g = torch.Generator().manual_seed(4001)
    m = torch.linalg.vector_norm(w.double(), dim=1).cpu() * (0.5 + torch.rand(w.shape[0], generator=g, dtype=torch.float64))
    m = m.to(torch.float16).cuda()
    poison_cuda_allocator("cuda")
    y, h, y_unscaled, norm = torch.ops.lrk.dora_fused_fwd(x, w, b, a, bb, m, scale, 0.0, 0, None)
    leaf = reference_leaves(x, w, b, a, bb, m)
    assert torch.isfinite(y).all() and torch.isfinite(y_unscaled).all() and torch.isfinite(h).all()
    assert_close(h, leaf[0] @ leaf[3].t(), torch.float16, "h")
    assert_close(y_unscaled, ref.lora_fused(leaf[0], leaf[1], None, leaf[3], leaf[4], scale), torch.float16,
                 "y_unscaled")
    assert_close(y, ref.dora_fused(*leaf, scale), torch.float16, "y")


def check_dora_against_reference(device, dtype, lead, K, N, r, p, bias=True):
    scale, seed = 1.3, int(torch.randint(0, 2**40, ()).item())
    x, w, b, a, bb = lora_inputs(lead, K, N, r, dtype, device, bias=bias, weight_grad=(r == 4))
    m = _magnitude(w, dtype, device)
    poison_cuda_allocator(device)
    y = lrk.dora_fused(x, w, b, a, bb, m, scale, p, seed)
    leaf = reference_leaves(x, w, b, a, bb, m)
    y_ref = ref.dora_fused(*leaf, scale, p, seed)
    assert y.shape == y_ref.shape and y.dtype == dtype
    factor = 10 if device == "cuda" and dtype == torch.float32 else 1
    assert_close(y, y_ref, dtype, "y", factor)
    if y.numel() == 0:
        return
    gy = torch.randn_like(y_ref).to(dtype).to(device)
    y.backward(gy)
    y_ref.backward(gy.double().cpu())
    magnitudes = _gradient_magnitudes(leaf, gy.double().cpu(), scale, p, seed)
    for name, t, t_ref in zip(("x", "weight", "bias", "lora_a", "lora_b", "magnitude"), (x, w, b, a, bb, m), leaf):
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype and t.grad.shape == t.shape, name
        assert_close(t.grad, t_ref.grad, dtype, f"grad {name}", factor, magnitude=magnitudes[name])


def _gradient_magnitudes(leaf, gy, scale, p, seed):
    """Sizes of the terms each DoRA gradient sums (the math on |inputs|, g from the
    true norms), for gradients that one cancelling dot product decides (M = 1)."""
    x, w, b, a, bb, m = [t.detach() if t is not None else None for t in leaf]
    g = (m / ref.dora_weight_norm(w, a, bb, scale)).abs()
    abs_in = [t.abs().requires_grad_() for t in (x, w, a, bb)]
    y_abs = ref.lora_fused(abs_in[0], abs_in[1], None, abs_in[2], abs_in[3], abs(scale), p, seed)
    (y_abs * g).backward(gy.abs())
    n = w.shape[0]
    rows = gy.abs().reshape(-1, n)
    return {"x": abs_in[0].grad, "weight": abs_in[1].grad, "lora_a": abs_in[2].grad, "lora_b": abs_in[3].grad,
            "bias": rows.sum(0), "magnitude": (rows * y_abs.detach().reshape(-1, n)).sum(0) * g / m.abs()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_weight_norm_without_dense_sum(device, dtype):
    _, w, _, a, bb = lora_inputs((1,), 77, 45, 6, dtype, device)
    leaf = reference_leaves(w, a, bb)
    expected = ref.dora_weight_norm(*leaf, 0.9)
    norm = lrk.dora_weight_norm(w, a, bb, 0.9)
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(norm, expected, dtype, "norm")
    cached = torch.linalg.vector_norm(w.detach().to(norm.dtype), dim=1).square()
    assert_close(lrk.dora_weight_norm(w, a, bb, 0.9, cached), expected, dtype, "norm, cached ||W||^2")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
def test_weight_norm_keeps_the_cross_term_in_float32(device, dtype, grad):
    """B steers W's rows nearly to 0 (W = -s B A + a 5% residual): ||W_n||^2 and the
    quadratic term cancel the cross term 2 s B_n . (A W^T)[:, n] to 1/400 of their
    size, so A W^T rounded to bf16 (or fp16) would put the norm off by tens of
    percent. With grad, autograd records the op (on CUDA: the upcast path, the
    float32-output product having no derivative)."""
    g = torch.Generator().manual_seed(1234)
    N, K, r, s = 64, 96, 4, 2.0
    a = (torch.randn(r, K, generator=g, dtype=torch.float64) / K ** 0.5).to(dtype)
    bb = torch.randn(N, r, generator=g, dtype=torch.float64).to(dtype)
    sba = s * (bb.double() @ a.double())
    e = torch.randn(N, K, generator=g, dtype=torch.float64)
    w = (-sba + e * (0.05 * sba.norm(dim=1, keepdim=True) / e.norm(dim=1, keepdim=True))).to(dtype)
    leaf = reference_leaves(w, a, bb)
    expected = ref.dora_weight_norm(*leaf, s)
    assert (w.double().norm(dim=1) > 10 * expected).all()  # the cancellation the test is about
    w, a, bb = (t.to(device).requires_grad_(grad) for t in (w, a, bb))
    norm = lrk.dora_weight_norm(w, a, bb, s)
    assert norm.dtype == torch.float32
    assert_close(norm, expected, dtype, "norm")
    if grad:  # differentiable (values not compared: each term's gradient reaches a bf16 leaf rounded, then cancels)
        norm.backward(torch.randn(N, generator=g).to(device))
        for t in (w, a, bb):
            assert t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_magnitude_in_float32_with_bf16_weights(device):
    x, w, b, a, bb = lora_inputs((9,), 40, 24, 4, torch.bfloat16, device)
    m = _magnitude(w, torch.float32, device)
    y = lrk.dora_fused(x, w, b, a, bb, m, 2.0)
    y.float().sum().backward()
    leaf = reference_leaves(x, w, b, a, bb, m)
    ref.dora_fused(*leaf, 2.0).sum().backward()
    assert m.grad.dtype == torch.float32
    assert_close(m.grad, leaf[5].grad, torch.bfloat16, "grad magnitude")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck(device, p):
    x, w, b, a, bb = lora_inputs((2, 3), 7, 5, 2, torch.float64, device, weight_grad=True)
    m = _magnitude(w, torch.float64, device)
    # The norm is a constant in DoRA's backward by definition, so finite differences
    # in W, A or B (which move the norm) are not its gradient: check x, bias and m
    # here; W, A and B are checked against the detached-norm reference above.
    fn = lambda x, b, m: lrk.dora_fused(x, w.detach(), b, a.detach(), bb.detach(), m, 0.8, p, 11)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b, m))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x, w, b, a, bb = lora_inputs((2, 9), 24, 16, 4, dtype, device)
    m = _magnitude(w, dtype, device)
    for p in (0.0, 0.2):
        torch.library.opcheck(torch.ops.lrk.dora_fused_fwd.default, (x, w, b, a, bb, m, 1.5, p, 9, None))
        torch.library.opcheck(torch.ops.lrk.dora_fused.default, (x, w, b, a, bb, m, 1.5, p, 9, None))
        y, h, yu, wn = torch.ops.lrk.dora_fused_fwd(x, w, b, a, bb, m, 1.5, p, 9, None)
        gy = torch.randn_like(y)
        for need_x in (True, False):
            torch.library.opcheck(torch.ops.lrk.dora_fused_bwd.default,
                                  (gy, x.detach(), w, a.detach(), bb.detach(), m.detach(), h, yu, wn, 1.5, p, 9,
                                   need_x))
    torch.library.opcheck(torch.ops.lrk.dora_weight_norm.default, (w, a, bb, 0.5, None))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, w, b, a, bb = lora_inputs((5, 7), 24, 16, 4, torch.float32, device)
    m = _magnitude(w, torch.float32, device)

    def step(x, w, b, a, bb, m):
        return torch.nn.functional.silu(lrk.dora_fused(x, w, b, a, bb, m, 2.0, 0.1, 42)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss_c = compiled(x, w, b, a, bb, m)
    grads_c = torch.autograd.grad(loss_c, (x, a, bb, m))
    loss_e = step(x, w, b, a, bb, m)
    grads_e = torch.autograd.grad(loss_e, (x, a, bb, m))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_dynamic_shapes(device):
    """One compiled graph with a symbolic batch serves several input shapes."""
    torch._dynamo.reset()

    def step(x, w, b, a, bb, m):
        return lrk.dora_fused(x, w, b, a, bb, m, 2.0, 0.1, 42).square().sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True,
                             backend="aot_eager" if device == "cpu" else "inductor")
    for lead in ((5, 7), (3, 11), (13,)):
        x, w, b, a, bb = lora_inputs(lead, 24, 16, 4, torch.float32, device)
        m = _magnitude(w, torch.float32, device)
        assert_compiled_grads_match_eager(compiled, step, (x, w, b, a, bb, m), (x, a, bb, m))


# Backward computes the gradients of exactly the inputs that need one; an absent
# bias shifts the positions of the later inputs in autograd's bookkeeping.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", ["x,lora_a,lora_b,magnitude", "weight,bias", "magnitude", "x,weight", "lora_b,bias"])
def test_gradients_of_exactly_the_inputs_that_need_them(device, bias, needs):
    x, w, b, a, bb = lora_inputs((3, 5), 12, 10, 3, torch.float64, device, bias=bias)
    m = _magnitude(w, torch.float64, device)
    check_gradients_of_exactly_the_needed(lambda *t: lrk.dora_fused(*t, 1.3, 0.2, 7),
                                          lambda *t: ref.dora_fused(*t, 1.3, 0.2, 7),
                                          dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb, magnitude=m), needs, device)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_keeps_x_h_and_the_unscaled_output(device):
    """Backward keeps h, y_unscaled (for the magnitude's gradient) and the row
    norms besides the inputs: no mask, no dense W + s*B@A."""
    x, w, b, a, bb = lora_inputs((3, 11), 40, 24, 4, torch.float32, device)
    m = _magnitude(w, torch.float32, device)
    shapes, y = saved_activation_shapes(lambda: lrk.dora_fused(x, w, b, a, bb, m, 1.5, 0.1, 5), (x, w, a, bb, m))
    assert shapes == [(3, 11, 4), (3, 11, 24), (24,)]
    y.sum().backward()
    assert m.grad is not None and a.grad is not None


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(magnitude=torch.ones(7)), "magnitude: expected size 8 in dim 0"),
        (dict(magnitude=torch.ones(8, 1)), "magnitude: expected a 1-D tensor"),
        (dict(magnitude=torch.ones(8, dtype=torch.float64)), "magnitude: expected dtype Float"),
        (dict(weight_sq_norm=torch.ones(8, dtype=torch.float64)), "weight_sq_norm: expected dtype Float"),
        (dict(weight_sq_norm=torch.ones(5)), "weight_sq_norm: expected size 8 in dim 0"),
        (dict(lora_b=torch.randn(8, 3)), "lora_b: expected size 2 in dim 1"),
        (dict(scale=float("nan")), "scale: expected a finite number"),
        (dict(dropout_p=1.5), "dropout_p: expected a probability"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    args = dict(x=torch.randn(4, 16), weight=torch.randn(8, 16), bias=torch.randn(8), lora_a=torch.randn(2, 16),
                lora_b=torch.randn(8, 2), magnitude=torch.ones(8), scale=1.0, dropout_p=0.0, seed=0)
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        lrk.dora_fused(**args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead, N", [((0,), 24), ((1,), 8), ((7, 5), 19), ((300,), 2056), ((33,), 1031)])
def test_dora_grad_scale_matches_reference(device, dtype, lead, N):
    """DoRA backward's one pass over grad_y (its CUDA kernel: 8-wide vector and
    element paths, row splits, an empty batch) against the float64 reference."""
    gen = torch.Generator().manual_seed(hash((lead, N)) % 2**31)
    gy = torch.randn(*lead, N, generator=gen, dtype=torch.float64)
    yu = torch.randn(*lead, N, generator=gen, dtype=torch.float64)
    g = torch.rand(N, generator=gen, dtype=torch.float64) + 0.5
    gy_t, yu_t = gy.to(dtype).to(device), yu.to(dtype).to(device)
    scaled, sums = torch.ops.lrk.dora_grad_scale(gy_t, yu_t, g.float().to(device))
    ref_scaled, ref_sums = ref.dora_grad_scale(gy_t.double().cpu(), yu_t.double().cpu(), g.float().double())
    assert scaled.dtype == dtype and scaled.shape == gy.shape and sums.dtype == torch.float32 and sums.shape == (N,)
    assert_close(scaled, ref_scaled, dtype, "grad_y * g")
    magnitude = (gy_t.double().abs().reshape(-1, N) * yu_t.double().abs().reshape(-1, N)).sum(0).cpu()
    assert_close(sums, ref_sums, torch.float32, "column sums", magnitude=magnitude)


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_dora_grad_scale_opcheck_and_bad_input(device):
    gy = torch.randn(6, 16, device=device, dtype=torch.bfloat16)
    yu = torch.randn(6, 16, device=device, dtype=torch.bfloat16)
    g = torch.rand(16, device=device) + 0.5
    torch.library.opcheck(torch.ops.lrk.dora_grad_scale.default, (gy, yu, g))
    with pytest.raises(RuntimeError, match="y_unscaled: expected shape"):
        torch.ops.lrk.dora_grad_scale(gy, yu[:, :8], g)
    with pytest.raises(RuntimeError, match="g:"):
        torch.ops.lrk.dora_grad_scale(gy, yu, g[:8])
    with pytest.raises(RuntimeError, match="g: expected float32 or float64"):
        torch.ops.lrk.dora_grad_scale(gy, yu, g.half())
    with pytest.raises(RuntimeError, match="y_unscaled"):
        torch.ops.lrk.dora_grad_scale(gy, yu.float(), g)
