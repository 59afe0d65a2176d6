"""Shared test helpers: tolerances, relative error, output poisoning, LoRA inputs."""
import math

import pytest
import torch

# ||out - ref|| / ||ref|| bounds by dtype (architecture.md).
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 2e-2,
    torch.float16: 5e-3,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, (out64.shape, ref64.shape)
    if not torch.isfinite(out64).all():
        return float("inf")  # NaN never passes
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out, ref, dtype, what="", factor=1.0, magnitude=None):
    """||out - ref|| / ||ref|| < tolerance. When the reference is a sum whose terms
    cancel (one dot product decides a whole gradient at M = 1, say), rounding of
    the terms is what an implementation can be held to: pass ``magnitude``, the
    same computation on absolute values (sum of |terms|), and the error is also
    accepted relative to its norm."""
    err = rel_err(out, ref)
    tol = TOLERANCE[dtype] * factor
    if err < tol:
        return
    if magnitude is not None and err != float("inf"):
        # ||out - ref|| / ||magnitude|| directly: err is absolute when ref is all zeros,
        # and scaling it by ||ref|| (0) would pass any finite output.
        diff = (out.detach().double().cpu() - ref.detach().double().cpu()).norm().item()
        scaled = diff / max(magnitude.detach().double().norm().item(), 1e-300)
        assert scaled < tol, (f"{what}: relative error {err:.3e}, {scaled:.3e} relative to the terms' "
                              f"magnitude, >= {tol:.1e}")
        return
    raise AssertionError(f"{what}: relative error {err:.3e} >= {tol:.1e}")


def poison_cuda_allocator(device="cuda", nbytes=1 << 28):
    """Fill the caching allocator's free blocks with NaN so that an op output that
    is not fully written shows up as NaN instead of stale zeros."""
    if torch.device(device).type != "cuda":
        return
    blocks = []
    for size in (nbytes, nbytes // 16, nbytes // 256):
        t = torch.empty(size // 4, dtype=torch.float32, device=device)
        t.fill_(float("nan"))
        blocks.append(t)
    del blocks


def lora_inputs(lead, K, N, r, dtype, device, bias=True, weight_grad=False):
    """Fresh random x [*lead, K], W [N, K], bias [N], A [r, K], B [N, r] at LoRA-like
    scales; x, A, B require grad, W and bias when weight_grad."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    x = rnd(*lead, K).requires_grad_()
    w = rnd(N, K, std=1 / math.sqrt(K)).requires_grad_(weight_grad)
    b = rnd(N).requires_grad_(weight_grad) if bias else None
    a = rnd(r, K, std=1 / math.sqrt(K)).requires_grad_()
    bb = rnd(N, r, std=1 / math.sqrt(r)).requires_grad_()
    return x, w, b, a, bb


def reference_leaves(*tensors):
    """float64 CPU copies (leaves, same requires_grad) for the reference computation."""
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]


def check_gradients_of_exactly_the_needed(op, reference, named: dict, needs: str, device):
    """Only the inputs named in `needs` (comma-separated) require grad; op(*named)
    must give them the float64 reference's gradients and give the others none."""
    for name, t in named.items():
        if t is not None:
            t.requires_grad_(name in needs.split(","))
    y = op(*named.values())
    leaf = reference_leaves(*named.values())
    y_ref = reference(*leaf)
    gy = torch.randn_like(y_ref)
    y.backward(gy.to(device))
    y_ref.backward(gy)
    for (name, t), t_ref in zip(named.items(), leaf):
        if t is None:
            continue
        if t.requires_grad:
            assert_close(t.grad, t_ref.grad, torch.float64, f"grad {name}")
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


def assert_compiled_grads_match_eager(compiled, step, args, wrt):
    """The gradients of compiled(*args) and step(*args) (scalars) with respect to wrt agree."""
    grads_c = torch.autograd.grad(compiled(*args), wrt)
    grads_e = torch.autograd.grad(step(*args), wrt)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def saved_activation_shapes(run, inputs) -> tuple:
    """(sorted shapes of the tensors autograd saves while run() executes, other
    than the inputs themselves: what the backward keeps alive; run's output)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    input_ptrs = {t.data_ptr() for t in inputs}
    return sorted(tuple(t.shape) for t in saved if t.data_ptr() not in input_ptrs), out


# lora_fused / dora_fused shapes for the Hopper path (sm_90a builds on an H100/H200,
# bf16/fp16), which needs K and N multiples of 8. They cross its tile edges: M
# past the 128-row tile, N past a 256-column tile, K past a 64-deep k-tile, ranks
# whose rows need padding, LoRA's bias column (k2 = r + 1), and r = 256 with a
# bias, one column too many for LoRA's kernel, which must fall back.
HOPPER_SHAPES = [
    ((300,), 1032, 776, 5),
    ((257,), 384, 264, 200),
    ((2, 48), 2056, 136, 17),
    ((129,), 64, 8, 1),
    ((65,), 256, 264, 256),
]


def use_kernel_path(monkeypatch, path: str) -> None:
    """Sends lora_fused / dora_fused to the Hopper kernels ("hopper") or the portable
    ones ("portable"); on other GPUs both settings take the portable path."""
    monkeypatch.setenv("LRK_SM90", "0" if path == "portable" else "1")


def hopper_and_portable_cases(test):
    """Parametrises a CUDA test over the LoRA kernel path (Hopper / portable, set
    through LRK_SM90 by the test), bf16/fp16, HOPPER_SHAPES, bias and dropout."""
    from conftest import CUDA_SKIP

    marks = [
        CUDA_SKIP,
        pytest.mark.cuda,
        pytest.mark.parametrize("path", ["hopper", "portable"], ids=["path_sm90", "path_portable"]),
        pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"]),
        pytest.mark.parametrize("lead,K,N,r", HOPPER_SHAPES),
        pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"]),
        pytest.mark.parametrize("p", [0.0, 0.1], ids=["nodrop", "dropout"]),
    ]
    for mark in reversed(marks):
        test = mark(test)
    return test


def near_overflow_cases(test):
    """Parametrises a CUDA test over the LoRA kernel path (as hopper_and_portable_cases),
    bias, and B zero (LoRA's initialisation) or small, for fp16_near_overflow_inputs."""
    from conftest import CUDA_SKIP

    marks = [
        CUDA_SKIP,
        pytest.mark.cuda,
        pytest.mark.parametrize("path", ["hopper", "portable"], ids=["path_sm90", "path_portable"]),
        pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"]),
        pytest.mark.parametrize("b_init", ["zero", "small"]),
    ]
    for mark in reversed(marks):
        test = mark(test)
    return test


def fp16_near_overflow_inputs(bias: bool, b_init: str, device):
    """fp16 LoRA inputs (r = 16, alpha = 32: scale 2; K and N suit the Hopper path)
    where token 5 has h = x @ A^T = 40000 in every rank: in fp16's range, but
    2 * h is not. Returns x, W, bias, A, B, scale."""
    g = torch.Generator().manual_seed(4000)
    M, K, N, r, scale = 130, 64, 72, 16, 2.0

    def rnd(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    x = rnd(M, K)
    x[5] = 0.0
    x[5, 0] = 1000.0
    a = rnd(r, K, std=1 / math.sqrt(K))
    a[:, 0] = 40.0
    w = rnd(N, K, std=1 / math.sqrt(K))
    bb = torch.zeros(N, r, dtype=torch.float64) if b_init == "zero" else rnd(N, r, std=1e-3)
    b = rnd(N) if bias else None
    x, w, b, a, bb = (t.to(torch.float16).to(device) if t is not None else None for t in (x, w, b, a, bb))
    return x, w, b, a, bb, scale
