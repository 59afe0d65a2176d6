"""Selection ops: torch.ops.lrk.abs_kth_value (radix select), abs_topk_mask
(exactly k, ties in flat order) and block_scores, against sort-based references;
sizes above 2^24 (where torch.quantile fails), opcheck, compile, bad input."""
import pytest
import torch

import lrk
import lrk.sparse_ops as sp
from lrk import reference_sparse as ref
from conftest import DEVICES, DEVICES_NO_EMU

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 17), (3, 100, 5), (4099,)])
def test_abs_kth_value_matches_sort(device, dtype, shape):
    gen = _gen()
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    n = x.numel()
    ks = sorted({1, n, (n + 1) // 2, int(torch.randint(1, n + 1, (), generator=gen))})
    xd = x.to(device)
    for k in ks:
        for largest in (True, False):
            got = sp.abs_kth_value(xd, k, largest)
            want = ref.abs_kth_value(x, k, largest)
            assert got.shape == () and got.dtype == dtype and got.device.type == device
            assert got.cpu() == want, (k, largest, got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_abs_kth_value_ties_signs_and_specials(device):
    x = torch.tensor([-0.0, 0.0, 2.0, -2.0, 2.0, float("inf"), -1.0, 1e-40, -3.0, float("-inf")])
    xs = x.to(device)
    assert sp.abs_kth_value(xs, 1).item() == float("inf")
    assert sp.abs_kth_value(xs, 2).item() == float("inf")
    assert sp.abs_kth_value(xs, 3).item() == 3.0
    for k in (4, 5, 6):
        assert sp.abs_kth_value(xs, k).item() == 2.0
    assert sp.abs_kth_value(xs, 1, largest=False).item() == 0.0
    assert sp.abs_kth_value(xs, 3, largest=False).item() == pytest.approx(1e-40, rel=1e-3)  # a subnormal


def test_abs_kth_value_above_2_pow_24():
    n = (1 << 24) + 1001
    x = torch.randn(n, generator=torch.Generator().manual_seed(3))
    k = 12345
    want = torch.kthvalue(x.abs(), n - k + 1).values
    assert sp.abs_kth_value(x, k).item() == want.item()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_abs_topk_mask_exact_count_with_ties(device, dtype):
    gen = _gen()
    # Few distinct magnitudes: most of the budget is decided by ties.
    x = (torch.randint(-4, 5, (37, 29), generator=gen).to(torch.float64) / 4).to(dtype)
    for k in (0, 1, 100, 500, x.numel()):
        for largest in (True, False):
            got = sp.abs_topk_mask(x.to(device), k, largest)
            assert got.dtype == torch.bool and got.shape == x.shape
            assert int(got.sum()) == k
            assert torch.equal(got.cpu(), ref.abs_topk_mask(x, k, largest)), (k, largest)


@pytest.mark.parametrize("device", DEVICES)
def test_abs_topk_mask_nan_counts_as_largest(device):
    x = torch.tensor([1.0, float("nan"), -5.0, 2.0, float("nan")], device=device)
    assert sp.abs_topk_mask(x, 1).tolist() == [False, True, False, False, False]
    assert sp.abs_topk_mask(x, 3).tolist() == [False, True, True, False, True]
    assert sp.abs_topk_mask(x, 2, largest=False).tolist() == [True, False, False, True, False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,b", [((70, 50), 16), ((33, 130), 32), ((64, 64), 64), ((5, 300), 128)])
def test_block_scores(device, dtype, shape, b):
    gen = _gen()
    w = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    got = sp.block_scores(w.to(device), b)
    want = ref.block_scores(w, b)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=1e-6)
    thr = 0.5
    got_c = sp.block_scores(w.to(device), b, "count_below", thr)
    assert torch.equal(got_c.cpu(), ref.block_scores(w, b, "count_below", thr))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_block_indices_sorted(device):
    scores = torch.tensor([[1.0, 5.0, 2.0], [7.0, 0.5, 6.0]], device=device)
    idx = sp.topk_block_indices(scores, 3)
    assert idx.tolist() == [[0, 1], [1, 0], [1, 2]]
    assert sp.topk_block_indices(scores, 2, largest=False).tolist() == [[0, 0], [1, 1]]


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x = torch.randn(40, 37, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.lrk.abs_kth_value.default, (x, 17, True))
    torch.library.opcheck(torch.ops.lrk.abs_kth_value.default, (x, 3, False))
    torch.library.opcheck(torch.ops.lrk.abs_topk_mask.default, (x, 100, True))
    torch.library.opcheck(torch.ops.lrk.block_scores.default, (x, 16, "norm", 0.0))
    torch.library.opcheck(torch.ops.lrk.block_scores.default, (x, 32, "count_below", 0.3))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x = torch.randn(30, 20, device=device)

    def fn(x):
        mask = sp.abs_topk_mask(x * 2, 50)
        return (x * mask).sum() + sp.abs_kth_value(x, 7) + sp.block_scores(x, 16).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x), fn(x))


@pytest.mark.parametrize("call,match", [
    (lambda: sp.abs_kth_value(torch.randn(10), 0), r"k: expected a rank in \[1, numel\(x\)\] = \[1, 10\], got 0"),
    (lambda: sp.abs_kth_value(torch.randn(10), 11), "k: expected a rank in"),
    (lambda: sp.abs_kth_value(torch.empty(0), 1), "x: expected at least one element"),
    (lambda: sp.abs_kth_value(torch.ones(3, dtype=torch.int64), 1), "x: expected dtype float32"),
    (lambda: sp.abs_topk_mask(torch.randn(10), 11), r"k: expected a count in \[0, numel\(x\)\]"),
    (lambda: sp.block_scores(torch.randn(10, 10), 8), "block_size: expected one of 16, 32, 64, 128, got 8"),
    (lambda: sp.block_scores(torch.randn(10), 16), "weight: expected a 2-D tensor"),
    (lambda: sp.block_scores(torch.randn(10, 10), 16, "max"), "score: expected 'norm' or 'count_below', got 'max'"),
])
def test_bad_input(call, match):
    with pytest.raises(RuntimeError, match=match):
        call()
