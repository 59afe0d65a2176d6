"""torch.ops.lrk.lora_fused: values and gradients vs the float64 reference,
gradcheck, opcheck, torch.compile, and bad input."""
import pytest
import torch

import lrk
from lrk import reference as ref
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import (assert_close, assert_compiled_grads_match_eager, check_gradients_of_exactly_the_needed, fp16_near_overflow_inputs, hopper_and_portable_cases, lora_inputs as _inputs,
                     near_overflow_cases, poison_cuda_allocator, reference_leaves, saved_activation_shapes, use_kernel_path)

# (leading dims of x, K, N, r): M = 0, 1, 7, 513; K and N not multiples of 8;
# ranks 1, 3, 64, 128; aligned shapes too (the CUDA kernels' vector path); ranks
# past one 64-rank tile (65, 128, 200, 256: several rank tiles, the last one
# partial) with odd M, K and N.
SHAPES = [
    ((0,), 40, 24, 3),
    ((1,), 33, 17, 1),
    ((7,), 29, 45, 3),
    ((2, 5), 21, 19, 4),          # 3-D input
    ((513,), 257, 130, 64),
    ((513,), 200, 136, 128),
    ((64,), 128, 96, 16),
    ((3, 100), 136, 264, 32),
    ((130,), 64, 520, 48),
    ((301,), 333, 259, 65),
    ((77,), 259, 131, 128),
    ((257,), 391, 301, 200),
    ((129,), 263, 517, 256),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def check_against_reference(device, dtype, lead, K, N, r, p, bias=True):
    scale, seed = 1.7, int(torch.randint(0, 2**40, ()).item())
    x, w, b, a, bb = _inputs(lead, K, N, r, dtype, device, bias=bias, weight_grad=(r == 3))
    poison_cuda_allocator(device)
    y = lrk.lora_fused(x, w, b, a, bb, scale, p, seed)
    leaf = reference_leaves(x, w, b, a, bb)
    y_ref = ref.lora_fused(*leaf, scale, p, seed)
    assert y.shape == y_ref.shape and y.dtype == dtype and y.device.type == device
    factor = 10 if device == "cuda" and dtype == torch.float32 else 1  # cuBLAS fp32 order: 1e-4 bound
    assert_close(y, y_ref, dtype, "y", factor)
    if y.numel() == 0:
        return
    gy = torch.randn_like(y_ref).to(dtype).to(device)
    poison_cuda_allocator(device)
    y.backward(gy)
    y_ref.backward(gy.double().cpu())
    # The same math on |inputs|: the size of the terms each gradient sums.
    abs_leaf = [t.detach().abs().requires_grad_(t.requires_grad) if t is not None else None for t in leaf]
    ref.lora_fused(*abs_leaf, abs(scale), p, seed).backward(gy.double().cpu().abs())
    for name, t, t_ref, t_abs in zip(("x", "weight", "bias", "lora_a", "lora_b"), (x, w, b, a, bb), leaf, abs_leaf):
        if t is None or not t.requires_grad:
            continue
        assert t.grad is not None, f"no gradient for {name}"
        assert t.grad.dtype == dtype and t.grad.shape == t.shape
        assert_close(t.grad, t_ref.grad, dtype, f"grad {name}", factor, magnitude=t_abs.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_forward_backward_match_reference(device, dtype, lead, K, N, r, p):
    if dtype == torch.float64 and device == "cuda" and lead[0] > 100:
        pytest.skip("fp64 on CUDA is covered by the small shapes")
    check_against_reference(device, dtype, lead, K, N, r, p)


@hopper_and_portable_cases
def test_hopper_and_portable_paths_match_reference(monkeypatch, path, dtype, lead, K, N, r, bias, p):
    use_kernel_path(monkeypatch, path)
    check_against_reference("cuda", dtype, lead, K, N, r, p, bias=bias)


@near_overflow_cases
def test_fp16_near_overflow_h_on_both_paths(monkeypatch, path, bias, b_init):
    """h = 40000 with scale 2: the Hopper path once packed s*h in fp16 (inf, and
    inf * B's zero columns = NaN); every path keeps it in range, as the portable
    one does, and returns h itself (rounded, unscaled) for the backward."""
    use_kernel_path(monkeypatch, path)
    x, w, b, a, bb, scale = fp16_near_overflow_inputs(bias, b_init, "cuda")
    poison_cuda_allocator("cuda")
    y, h = torch.ops.lrk.lora_fused_fwd(x, w, b, a, bb, scale, 0.0, 0)
    leaf = reference_leaves(x, w, b, a, bb)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert_close(h, leaf[0] @ leaf[3].t(), torch.float16, "h")
    assert_close(y, ref.lora_fused(*leaf, scale), torch.float16, "y")


@pytest.mark.parametrize("device", DEVICES)
def test_without_bias_and_frozen_x(device):
    x, w, _, a, bb = _inputs((9,), 31, 23, 5, torch.float32, device, bias=False)
    x = x.detach()
    y = lrk.lora_fused(x, w, None, a, bb, 0.5, 0.0, 0)
    y.sum().backward()
    leaf = reference_leaves(x, w, None, a, bb)
    y_ref = ref.lora_fused(*leaf, 0.5, 0.0, 0)
    y_ref.sum().backward()
    assert_close(y, y_ref, torch.float32, "y")
    assert x.grad is None
    assert_close(a.grad, leaf[3].grad, torch.float32, "grad lora_a")
    assert_close(bb.grad, leaf[4].grad, torch.float32, "grad lora_b")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, w, b, a, bb = _inputs((12,), 30, 22, 4, torch.float32, device)
    xt = x.detach().t().contiguous().t().requires_grad_()  # column-major [M, K]
    xs = torch.randn(12, 60, device=device)[:, ::2].requires_grad_()  # strided view
    wt = w.detach().t().contiguous().t()
    for xin in (xt, xs):
        y = lrk.lora_fused(xin, wt, b, a, bb, 2.0, 0.2, 5)
        leaf = reference_leaves(xin, wt, b, a, bb)
        y_ref = ref.lora_fused(*leaf, 2.0, 0.2, 5)
        assert_close(y, y_ref, torch.float32, "y")


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_mask_regenerated_in_backward(device):
    """Backward must use the forward's mask: compare with the reference at one seed,
    and check that another seed gives other gradients."""
    x, w, b, a, bb = _inputs((33,), 40, 20, 4, torch.float64, device)
    y = lrk.lora_fused(x, w, b, a, bb, 1.0, 0.5, 123)
    (ga1,) = torch.autograd.grad(y.sum(), a)
    y2 = lrk.lora_fused(x, w, b, a, bb, 1.0, 0.5, 124)
    (ga2,) = torch.autograd.grad(y2.sum(), a)
    assert not torch.allclose(ga1, ga2)
    leaf = reference_leaves(x, w, b, a, bb)
    y_ref = ref.lora_fused(*leaf, 1.0, 0.5, 123)
    y_ref.sum().backward()
    assert_close(ga1, leaf[3].grad, torch.float64, "grad lora_a")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck(device, p):
    x, w, b, a, bb = _inputs((2, 3), 7, 5, 2, torch.float64, device, weight_grad=True)
    fn = lambda *t: lrk.lora_fused(*t, 0.8, p, 11)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_h(device):
    """lora_fused_fwd's second output is differentiable too."""
    x, w, b, a, bb = _inputs((4,), 6, 5, 2, torch.float64, device, weight_grad=True)
    fn = lambda *t: torch.ops.lrk.lora_fused_fwd(*t, 0.8, 0.25, 3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b, a, bb))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x, w, b, a, bb = _inputs((2, 9), 24, 16, 4, dtype, device)
    for p in (0.0, 0.2):
        torch.library.opcheck(torch.ops.lrk.lora_fused_fwd.default, (x, w, b, a, bb, 1.5, p, 9))
        torch.library.opcheck(torch.ops.lrk.lora_fused.default, (x, w, b, a, bb, 1.5, p, 9))
        y, h = torch.ops.lrk.lora_fused_fwd(x, w, b, a, bb, 1.5, p, 9)
        gy = torch.randn_like(y)
        for need_x in (True, False):
            torch.library.opcheck(torch.ops.lrk.lora_fused_bwd.default,
                                  (gy, x.detach(), w, a.detach(), bb.detach(), h.detach(), 1.5, p, 9, need_x))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x, w, b, a, bb = _inputs((5, 7), 24, 16, 4, torch.float32, device)

    def step(x, w, b, a, bb):
        return torch.nn.functional.gelu(lrk.lora_fused(x, w, b, a, bb, 2.0, 0.1, 42)).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    loss_c = compiled(x, w, b, a, bb)
    grads_c = torch.autograd.grad(loss_c, (x, a, bb))
    loss_e = step(x, w, b, a, bb)
    grads_e = torch.autograd.grad(loss_e, (x, a, bb))
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_dynamic_shapes(device):
    """One compiled graph with a symbolic batch serves several input shapes."""
    torch._dynamo.reset()

    def step(x, w, b, a, bb):
        return lrk.lora_fused(x, w, b, a, bb, 2.0, 0.1, 42).square().sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True,
                             backend="aot_eager" if device == "cpu" else "inductor")
    for lead in ((5, 7), (3, 11), (13,)):
        x, w, b, a, bb = _inputs(lead, 24, 16, 4, torch.float32, device)
        assert_compiled_grads_match_eager(compiled, step, (x, w, b, a, bb), (x, a, bb))


# Backward computes the gradients of exactly the inputs that need one; an absent
# bias shifts the positions of the later inputs in autograd's bookkeeping.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("needs", ["x,lora_a,lora_b", "weight,bias", "lora_b", "x,weight", "lora_a,bias"])
def test_gradients_of_exactly_the_inputs_that_need_them(device, bias, needs):
    x, w, b, a, bb = _inputs((3, 5), 12, 10, 3, torch.float64, device, bias=bias)
    check_gradients_of_exactly_the_needed(lambda *t: lrk.lora_fused(*t, 1.3, 0.2, 7),
                                          lambda *t: ref.lora_fused(*t, 1.3, 0.2, 7),
                                          dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb), needs, device)


@pytest.mark.parametrize("device", DEVICES)
def test_autograd_grad_of_one_input(device):
    """torch.autograd.grad asking for lora_b alone gets the same gradient as backward."""
    x, w, b, a, bb = _inputs((6,), 9, 7, 2, torch.float64, device, bias=False)
    y = lrk.lora_fused(x, w, b, a, bb, 0.7, 0.0, 1)
    gy = torch.randn_like(y)
    (gb,) = torch.autograd.grad(y, (bb,), gy, retain_graph=True)
    y.backward(gy)
    torch.testing.assert_close(gb, bb.grad)
    assert x.grad is not None and a.grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_backward_keeps_only_x_and_h(device, p):
    """Besides the inputs themselves, backward keeps h = dropout(x) @ A^T alone:
    no mask, no dropped copy of x, nothing of y's size."""
    x, w, b, a, bb = _inputs((3, 11), 40, 24, 4, torch.float32, device)
    shapes, y = saved_activation_shapes(lambda: lrk.lora_fused(x, w, b, a, bb, 1.5, p, 5), (x, w, a, bb))
    assert shapes == [(3, 11, 4)]
    y.sum().backward()
    assert x.grad is not None and a.grad is not None and bb.grad is not None


# ----------------------------------------------------------------------------- bad input


def _good(device="cpu", dtype=torch.float32):
    return dict(x=torch.randn(4, 16, dtype=dtype, device=device), weight=torch.randn(8, 16, dtype=dtype, device=device),
                bias=torch.randn(8, dtype=dtype, device=device), lora_a=torch.randn(2, 16, dtype=dtype, device=device),
                lora_b=torch.randn(8, 2, dtype=dtype, device=device), scale=1.0, dropout_p=0.0, seed=0)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.randn(4, 16, dtype=torch.float64)), "weight: expected dtype Double"),
        (dict(x=torch.ones(4, 16, dtype=torch.int64)), "x: expected dtype float32"),
        (dict(weight=torch.randn(8, 15)), "weight: expected size 16 in dim 1"),
        (dict(weight=torch.randn(8, 16, 1)), "weight: expected a 2-D tensor"),
        (dict(bias=torch.randn(7)), "bias: expected size 8 in dim 0"),
        (dict(lora_a=torch.randn(0, 16), lora_b=torch.randn(8, 0)), "lora_a: rank .* must be at least 1"),
        (dict(lora_a=torch.randn(9, 16), lora_b=torch.randn(8, 9)), "lora_a: rank 9 is larger than"),
        (dict(lora_a=torch.randn(2, 17)), "lora_a: expected size 16 in dim 1"),
        (dict(lora_b=torch.randn(8, 3)), "lora_b: expected size 2 in dim 1"),
        (dict(lora_b=torch.randn(7, 2)), "lora_b: expected size 8 in dim 0"),
        (dict(scale=float("inf")), "scale: expected a finite number"),
        (dict(scale=float("nan")), "scale: expected a finite number"),
        (dict(dropout_p=1.0), "dropout_p: expected a probability"),
        (dict(dropout_p=-0.5), "dropout_p: expected a probability"),
        (dict(x=torch.tensor(1.0)), "x: expected a tensor of shape"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    args = _good()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        lrk.lora_fused(**args)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_on_device(device):
    args = _good(device, torch.bfloat16)
    args["lora_b"] = args["lora_b"].float()
    with pytest.raises(RuntimeError, match="lora_b: expected dtype BFloat16"):
        lrk.lora_fused(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mix():
    args = _good("cuda")
    args["lora_a"] = args["lora_a"].cpu()
    with pytest.raises(RuntimeError, match="lora_a: expected a tensor on cuda"):
        lrk.lora_fused(**args)


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_compile_with_seed_drawn_in_the_graph(device):
    """The seed is a SymInt: a compiled training step may draw it from torch's RNG
    (capture_scalar_outputs) without a graph break or a recompile per seed."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    x, w, b, a, bb = _inputs((6,), 16, 12, 4, torch.float32, device)

    def step(x):
        seed = torch.randint(0, 2**62, ()).item()
        return lrk.lora_fused(x, w, b, a, bb, 1.0, 0.3, seed).square().sum()

    old = torch._dynamo.config.capture_scalar_outputs, torch._inductor.config.fallback_random
    torch._dynamo.config.capture_scalar_outputs = True
    torch._inductor.config.fallback_random = True  # inductor draws from eager's RNG stream
    try:
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
        for trial in range(3):  # new seeds, one compilation
            torch.manual_seed(trial)
            loss_c = compiled(x)
            (ga_c,) = torch.autograd.grad(loss_c, a)
            torch.manual_seed(trial)
            loss_e = step(x)
            (ga_e,) = torch.autograd.grad(loss_e, a)
            torch.testing.assert_close(loss_c, loss_e)
            torch.testing.assert_close(ga_c, ga_e)
    finally:
        torch._dynamo.config.capture_scalar_outputs, torch._inductor.config.fallback_random = old



@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["lora", "dora"])
def test_double_backward_raises(device, op):
    """The backward ops have no derivative of their own: a second derivative
    through them raises instead of coming out silently wrong (with dropout it
    did on CPU; on CUDA it would for any p). First derivatives taken with
    create_graph=True stay the same."""
    g = torch.Generator().manual_seed(0)
    x, w, b, a, lb = (torch.randn(*s, dtype=torch.float64, generator=g).to(device) for s in
                      ((4, 7), (6, 7), (6,), (3, 7), (6, 3)))
    m = (torch.rand(6, dtype=torch.float64, generator=g) + 0.5).to(device)
    x.requires_grad_(True)
    a.requires_grad_(True)

    def loss():
        if op == "lora":
            y = torch.ops.lrk.lora_fused(x, w, b, a, lb, 0.5, 0.3, 3)
        else:
            y = torch.ops.lrk.dora_fused(x, w, b, a, lb, m, 0.5, 0.3, 3, None)
        return (y ** 2).sum()

    (gx,) = torch.autograd.grad(loss(), x, create_graph=True)
    (gx_plain,) = torch.autograd.grad(loss(), x)
    assert_close(gx.detach(), gx_plain, torch.float64)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(gx.sum(), a)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["lora", "dora"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_of_the_op(device, op, use_reentrant):
    """torch.utils.checkpoint around the op (no bias, dropout with a fixed seed):
    the recomputed forward and the C++ backward give the plain gradients."""
    from torch.utils.checkpoint import checkpoint

    x, w, _, a, lb = _inputs((2, 5), 12, 10, 3, torch.float64, device, bias=False)
    m = (torch.rand(10, dtype=torch.float64) + 0.5).to(device).requires_grad_()

    def f(x):
        if op == "lora":
            return torch.ops.lrk.lora_fused(x, w, None, a, lb, 0.5, 0.3, 9)
        return torch.ops.lrk.dora_fused(x, w, None, a, lb, m, 0.5, 0.3, 9, None)

    leaves = [x, a, lb] + ([m] if op == "dora" else [])
    expected = torch.autograd.grad(f(x).pow(2).sum(), leaves)
    checkpoint(f, x, use_reentrant=use_reentrant).pow(2).sum().backward()
    for name, leaf, e in zip(["x", "lora_a", "lora_b", "magnitude"], leaves, expected):
        assert leaf.grad is not None, name
        assert_close(leaf.grad, e, torch.float64, name)
