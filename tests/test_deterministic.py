"""torch.use_deterministic_algorithms(True): the CUDA kernels that split a reduction
over the grid (LoRA's skinny products, DoRA's column sums, the multi-LoRA shrink
tiles) give the same bits on every run, and still the float64 reference's values.
The shapes split the long reductions (K = 4096 over few row blocks; M = 300 over
few column blocks), so that by default their partial sums meet through atomicAdd."""
import contextlib
import math

import pytest
import torch

import lrk
import lrk.multi_lora_ops as mlo
from lrk import reference as ref
from lrk import reference_multi_lora as ref_ml
from conftest import DEVICES
from helpers import assert_close, poison_cuda_allocator, reference_leaves


@contextlib.contextmanager
def deterministic_algorithms(monkeypatch):
    """Deterministic mode for the block, the previous setting restored afterwards.
    cuBLAS (the base GEMMs) refuses deterministic mode without a fixed workspace."""
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def _lora_leaves(M, K, N, r, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).to(device)

    x = rnd(M, K).requires_grad_()
    w = rnd(N, K, std=1 / math.sqrt(K))
    b = rnd(N)
    a = rnd(r, K, std=1 / math.sqrt(K)).requires_grad_()
    bb = rnd(N, r, std=1 / math.sqrt(r)).requires_grad_()
    m = (torch.linalg.vector_norm(w.double(), dim=1) * (0.5 + torch.rand(N, generator=g, dtype=torch.float64).to(device)))
    return x, w, b, a, bb, m.to(dtype).requires_grad_()


def _run(op, leaves, gy, scale, p, seed):
    """Forward and backward on fresh leaves; returns y and the gradients."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in leaves]
    poison_cuda_allocator(gy.device.type)
    y = op(*leaves, scale, p, seed)
    y.backward(gy)
    return [y.detach()] + [t.grad for t in leaves if t.requires_grad]


LORA_SHAPES = [(300, 4096, 257, 16), (300, 4096, 257, 128)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["lora", "dora"])
@pytest.mark.parametrize("M,K,N,r", LORA_SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_backward_is_bit_identical(monkeypatch, device, op, M, K, N, r, p):
    dtype, scale, seed = torch.bfloat16, 1.7, 1234
    x, w, b, a, bb, m = _lora_leaves(M, K, N, r, dtype, device, seed=11)
    gy = (torch.randn(M, N, generator=torch.Generator().manual_seed(12), dtype=torch.float64)).to(dtype).to(device)
    if op == "lora":
        leaves, fused, reference = (x, w, b, a, bb), lrk.lora_fused, ref.lora_fused
        names = ("y", "grad x", "grad lora_a", "grad lora_b")
    else:
        leaves, fused, reference = (x, w, b, a, bb, m), lrk.dora_fused, ref.dora_fused
        names = ("y", "grad x", "grad lora_a", "grad lora_b", "grad magnitude")
    with deterministic_algorithms(monkeypatch):
        first = _run(fused, leaves, gy, scale, p, seed)
        second = _run(fused, leaves, gy, scale, p, seed)
    for name, u, v in zip(names, first, second):
        assert torch.equal(u, v), f"{op} {name}: two runs in deterministic mode differ"
    leaf = reference_leaves(*leaves)
    y_ref = reference(*leaf, scale, p, seed)
    y_ref.backward(gy.double().cpu())
    expected = [y_ref] + [t.grad for t in leaf if t.requires_grad]
    for name, u, e in zip(names, first, expected):
        assert_close(u, e, dtype, f"{op} {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r_max", [16, 128])
def test_multi_lora_shrink_tiles_are_bit_identical(monkeypatch, device, r_max):
    # 300 tokens in 4 segments (>= 16 tokens per segment: the tile kernels on CUDA).
    dtype, M, K, n = torch.bfloat16, 300, 4096, 3
    g = torch.Generator().manual_seed(21)
    ranks = torch.tensor([r_max, r_max // 2, 5])
    a = torch.randn(n, r_max, K, generator=g, dtype=torch.float64) / math.sqrt(K)
    for j in range(n):
        a[j, int(ranks[j]):] = 0
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype)
    offsets, adapters = torch.tensor([0, 70, 150, 151, 300]), torch.tensor([0, 1, 2, -1])
    lora_a = [a.to(dtype).to(device)]
    args = (x.to(device), lora_a, ranks.to(device), offsets.to(device), adapters.to(device))
    with deterministic_algorithms(monkeypatch):
        poison_cuda_allocator(device)
        h1 = mlo.multi_lora_shrink_segments(*args)
        poison_cuda_allocator(device)
        h2 = mlo.multi_lora_shrink_segments(*args)
    assert torch.equal(h1, h2), "multi_lora shrink: two runs in deterministic mode differ"
    ids = ref_ml.segments_to_adapter_ids(offsets, adapters, M)
    h_ref = ref_ml.multi_lora_shrink(x.double(), [lora_a[0].double().cpu()], ranks, ids)
    assert_close(h1, h_ref, dtype, "h")


def test_deterministic_setting_is_restored(monkeypatch):
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_algorithms(monkeypatch):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
