"""torch.ops.lrk.sddmm_block / sddmm_csr: masked gradients vs the dense float64
reference on random masks of awkward shapes (dims not multiples of the block, empty
and full masks, unsorted orders), opcheck, torch.compile and bad input."""
import math

import pytest
import torch

import lrk
import lrk.sparse_ops as sp
from lrk import reference_sparse as ref
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close, poison_cuda_allocator

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# (leading dims, N, K, block size, density of kept blocks)
BLOCK_CASES = [
    ((37,), 70, 50, 16, 0.3),
    ((1,), 33, 130, 32, 0.5),
    ((3, 100), 100, 64, 64, 0.4),     # 3-D inputs
    ((5,), 16, 16, 16, 1.0),          # full mask, one block
    ((64,), 130, 257, 128, 0.5),
    ((129,), 136, 72, 64, 1.0),       # full mask, vector path on CUDA (N, K % 8 == 0)
    ((2000,), 40, 48, 16, 0.25),      # long reduction: token splits on CUDA
    ((0,), 40, 48, 32, 0.5),          # no tokens: zeros
]


def _rand(shape, dtype, device, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))


def _block_mask(nbr, nbc, density, gen):
    m = torch.rand(nbr, nbc, generator=gen) < density
    if density >= 1.0:
        m[:] = True
    return m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,K,b,density", BLOCK_CASES)
def test_sddmm_block_matches_reference(device, dtype, lead, N, K, b, density):
    gen = _gen()
    dy, x = _rand(lead + (N,), dtype, device, gen), _rand(lead + (K,), dtype, device, gen)
    idx = sp.block_mask_to_indices(_block_mask(math.ceil(N / b), math.ceil(K / b), density, gen)).to(device)
    want = ref.sddmm_block(dy.double().cpu(), x.double().cpu(), idx.cpu(), b)
    poison_cuda_allocator(device)
    out = sp.sddmm_block(dy, x, idx, b)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (idx.shape[0], b, b) and out.dtype == acc and out.device.type == device
    tol_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # fp32 accumulation
    assert_close(out, want, tol_dtype, "sddmm_block", factor=10 if device == "cuda" else 1)
    if dtype != torch.float64:  # values in the inputs' dtype: one rounding of the fp32 result
        out_lp = sp.sddmm_block(dy, x, idx, b, out_dtype=dtype)
        assert out_lp.dtype == dtype
        assert_close(out_lp, want, dtype, "sddmm_block out_dtype")


@pytest.mark.parametrize("device", DEVICES)
def test_sddmm_block_any_order_and_int32(device):
    gen = _gen()
    dy, x = _rand((50, 90), torch.float32, device, gen), _rand((50, 70), torch.float32, device, gen)
    idx = sp.block_mask_to_indices(_block_mask(3, 3, 0.7, gen)).to(device)
    perm = torch.randperm(idx.shape[0], generator=gen).to(device)
    out_sorted = sp.sddmm_block(dy, x, idx, 32)
    out_perm = sp.sddmm_block(dy, x, idx[perm].to(torch.int32), 32)
    torch.testing.assert_close(out_perm, out_sorted[perm], rtol=0, atol=0)
    dup = torch.cat([idx, idx[:1]])  # a repeated block is computed twice
    torch.testing.assert_close(sp.sddmm_block(dy, x, dup, 32)[-1], out_sorted[0], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sddmm_block_empty_mask(device, dtype):
    dy, x = torch.randn(9, 20, device=device, dtype=dtype), torch.randn(9, 30, device=device, dtype=dtype)
    out = sp.sddmm_block(dy, x, torch.empty(0, 2, dtype=torch.int64, device=device), 16)
    assert out.shape == (0, 16, 16) and out.dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,N,K,density", [
    ((37,), 70, 50, 0.1), ((1,), 33, 130, 0.5), ((3, 40), 45, 300, 0.05),
    ((20,), 64, 160, 1.0),   # full mask: 10240 entries in one CUDA tile, three work items of <= 4096
    ((2000,), 31, 17, 0.3),  # long reduction: token splits on CUDA
    ((0,), 10, 12, 0.5)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_sddmm_csr_matches_reference(device, dtype, lead, N, K, density, index_dtype):
    gen = _gen()
    dy, x = _rand(lead + (N,), dtype, device, gen), _rand(lead + (K,), dtype, device, gen)
    mask = torch.rand(N, K, generator=gen) < density
    crow, col = sp.mask_to_csr(mask, index_dtype)
    want = ref.sddmm_csr(dy.double().cpu(), x.double().cpu(), crow, col)
    poison_cuda_allocator(device)
    out = sp.sddmm_csr(dy, x, crow.to(device), col.to(device))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (col.shape[0],) and out.dtype == acc
    tol_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    assert_close(out, want, tol_dtype, "sddmm_csr", factor=10 if device == "cuda" else 1)
    if dtype != torch.float64:
        assert_close(sp.sddmm_csr(dy, x, crow.to(device), col.to(device), out_dtype=dtype), want, dtype, "out_dtype")


@pytest.mark.parametrize("device", DEVICES)
def test_sddmm_csr_unsorted_columns_and_empty(device):
    gen = _gen()
    dy, x = _rand((30, 20), torch.float64, device, gen), _rand((30, 300), torch.float64, device, gen)
    mask = torch.rand(20, 300, generator=gen) < 0.3
    crow, col = sp.mask_to_csr(mask)
    # Reverse the columns inside every row: same pattern, another order.
    col_rev = torch.cat([col[crow[i]:crow[i + 1]].flip(0) for i in range(20)])
    out = sp.sddmm_csr(dy, x, crow.to(device), col_rev.to(device))
    want = ref.sddmm_csr(dy.cpu(), x.cpu(), crow, col_rev)
    assert_close(out, want, torch.float64, "unsorted columns")
    empty = sp.sddmm_csr(dy, x, torch.zeros(21, dtype=torch.int64, device=device),
                         torch.empty(0, dtype=torch.int64, device=device))
    assert empty.shape == (0,)


def _edge_mask(N, K, density, gen):
    """A random mask with empty rows, rows whose entries all lie in one 512 x 512 CUDA
    tile, and entries on both sides of every tile edge and at the last row/column."""
    mask = torch.rand(N, K, generator=gen) < density
    mask[:70] = False                    # leading empty rows
    mask[N // 2] = False                 # an empty row in the middle
    one_tile = torch.zeros(K, dtype=torch.bool)
    one_tile[512:min(K, 1024)] = torch.rand(min(K, 1024) - 512, generator=gen) < 0.2
    mask[min(N - 1, 520)] = one_tile     # all entries in column tile 1
    mask[75] = False
    mask[75, 3:9] = True                 # all entries in column tile 0, a few adjacent columns
    for e in range(511, N + 1, 512):     # tile edges: rows e, e + 1 x columns around every edge
        for c in range(511, K + 1, 512):
            for r in (e, e + 1):
                if r < N:
                    mask[r, c - 1:c + 2] = True
    mask[N - 1, K - 1] = True
    return mask


# (tokens, N, K): N, K above the 512-row / -column tile of the CUDA kernel; N % 8,
# K % 8 == 0 takes the 16-byte staging path for every dtype on CUDA, the others the
# element path for some; 2001 tokens: token splits whose last slice is shorter.
EDGE_SHAPES = [(37, 1100, 1200), (19, 1032, 520), (2001, 600, 530)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", EDGE_SHAPES)
def test_sddmm_csr_tile_edges_and_empty_rows(device, dtype, M, N, K):
    gen = torch.Generator().manual_seed(1000 + N)
    dy, x = _rand((M, N), dtype, device, gen), _rand((M, K), dtype, device, gen)
    mask = _edge_mask(N, K, 0.004, gen)
    crow, col = sp.mask_to_csr(mask)
    assert (crow.diff() == 0).any() and col.numel() > 0
    want = ref.sddmm_csr(dy.double().cpu(), x.double().cpu(), crow, col)
    poison_cuda_allocator(device)
    out = sp.sddmm_csr(dy, x, crow.to(device), col.to(device))
    tol_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    assert torch.isfinite(out).all(), "sddmm_csr left entries unwritten"
    assert_close(out, want, tol_dtype, "sddmm_csr tile edges", factor=10 if device == "cuda" else 1)
    # Every entry on its own, not only the norm: a misplaced entry is a large error.
    torch.testing.assert_close(out.double().cpu(), want, rtol=0, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1])
def test_sddmm_csr_random_densities(device, dtype, density):
    """Duplicate-free random patterns; at 10% the first CUDA tile holds ~26000 entries,
    seven slices of 4096; at 0.1% most tiles are empty."""
    gen = torch.Generator().manual_seed(int(density * 1e4))
    M, N, K = 53, 1300, 1100
    dy, x = _rand((M, N), dtype, device, gen), _rand((M, K), dtype, device, gen)
    crow, col = sp.mask_to_csr(torch.rand(N, K, generator=gen) < density)
    want = ref.sddmm_csr(dy.double().cpu(), x.double().cpu(), crow, col)
    poison_cuda_allocator(device)
    out = sp.sddmm_csr(dy, x, crow.to(device), col.to(device))
    tol_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    assert torch.isfinite(out).all()
    assert_close(out, want, tol_dtype, f"sddmm_csr density {density}", factor=10 if device == "cuda" else 1)
    # Same pattern, columns of every row in reverse: the same values, entry for entry.
    rev = torch.cat([col[crow[i]:crow[i + 1]].flip(0) for i in range(N)])
    out_rev = sp.sddmm_csr(dy, x, crow.to(device), rev.to(device))
    order = torch.cat([torch.arange(crow[i + 1] - 1, crow[i] - 1, -1) for i in range(N)])
    torch.testing.assert_close(out_rev.cpu(), out.cpu()[order], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    gen = _gen()
    dy, x = _rand((2, 9, 40), dtype, device, gen), _rand((2, 9, 36), dtype, device, gen)
    idx = torch.tensor([[0, 0], [1, 2], [2, 1]], device=device)
    torch.library.opcheck(torch.ops.lrk.sddmm_block.default, (dy, x, idx, 16))
    torch.library.opcheck(torch.ops.lrk.sddmm_block.default, (dy, x, idx, 16, dtype))
    crow, col = sp.mask_to_csr(torch.rand(40, 36, generator=gen) < 0.2)
    torch.library.opcheck(torch.ops.lrk.sddmm_csr.default, (dy, x, crow.to(device), col.to(device)))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    gen = _gen()
    dy, x = _rand((17, 40), torch.float32, device, gen), _rand((17, 36), torch.float32, device, gen)
    idx = torch.tensor([[0, 0], [2, 1]], device=device)
    crow, col = sp.mask_to_csr(torch.rand(40, 36, generator=gen) < 0.2)
    crow, col = crow.to(device), col.to(device)

    def fn(dy, x):
        return sp.sddmm_block(dy * 2, x, idx, 16).sum() + sp.sddmm_csr(dy, x, crow, col).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(dy, x), fn(dy, x))


# ----------------------------------------------------------------------------- bad input


def _args():
    return dict(grad_y=torch.randn(4, 40), x=torch.randn(4, 36), block_indices=torch.tensor([[0, 0], [2, 2]]),
                block_size=16)


@pytest.mark.parametrize("change,match", [
    (dict(block_size=48), "block_size: expected one of 16, 32, 64, 128, got 48"),
    (dict(block_size=8), "block_size: expected one of"),
    (dict(block_indices=torch.tensor([[0, 0, 0]])), r"block_indices: expected shape \[n_blocks, 2\]"),
    (dict(block_indices=torch.tensor([[0.0, 1.0]])), "block_indices: expected dtype int32 or int64"),
    (dict(block_indices=torch.tensor([[0, 0], [3, 0]])), r"block_indices: entry 1 = \(3, 0\) is outside the 3 x 3"),
    (dict(block_indices=torch.tensor([[0, -1]])), "block_indices: entry 0"),
    (dict(x=torch.randn(5, 36)), "x: expected the leading dims of grad_y"),
    (dict(x=torch.randn(4, 36, dtype=torch.float64)), "x: expected dtype Float"),
    (dict(grad_y=torch.ones(4, 40, dtype=torch.int32), x=torch.ones(4, 36, dtype=torch.int32)),
     "grad_y: expected dtype float32"),
])
def test_block_bad_input(change, match):
    args = _args()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        sp.sddmm_block(**args)


def test_out_dtype_bad():
    a = _args()
    with pytest.raises(RuntimeError, match="out_dtype: expected Float or Float"):
        sp.sddmm_block(**a, out_dtype=torch.float16)


@pytest.mark.parametrize("crow,col,match", [
    (torch.tensor([0, 1, 2]), torch.tensor([0, 1]), r"crow_indices: expected shape \[41\]"),
    (torch.tensor([0] + [1] * 40), torch.tensor([36]), "col_indices: entry 0 = 36 is outside"),
    (torch.tensor([0] + [2] * 40), torch.tensor([0]), "crow_indices: expected crow_indices\\[-1\\] == nnz"),
    (torch.tensor([0, 2] + [1] * 38 + [2]), torch.tensor([0, 1]), "crow_indices: expected a non-decreasing"),
    (torch.tensor([1] * 41), torch.tensor([0]), r"crow_indices: expected crow_indices\[0\] == 0"),
    (torch.tensor([0] * 41), torch.tensor([], dtype=torch.int32), "col_indices: expected dtype Long"),
])
def test_csr_bad_input(crow, col, match):
    with pytest.raises(RuntimeError, match=match):
        sp.sddmm_csr(torch.randn(4, 40), torch.randn(4, 36), crow, col)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_out_of_range_block_gives_nan_not_a_crash():
    if not lrk.has_cuda_kernels():
        pytest.skip("lrk built without CUDA")
    dy, x = torch.randn(8, 40, device="cuda"), torch.randn(8, 36, device="cuda")
    out = sp.sddmm_block(dy, x, torch.tensor([[0, 0], [5, 0]], device="cuda"), 16)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_out_of_range_csr_column_gives_nan_not_a_crash():
    if not lrk.has_cuda_kernels():
        pytest.skip("lrk built without CUDA")
    gen = torch.Generator().manual_seed(7)
    dy, x = _rand((9, 600), torch.float32, "cuda", gen), _rand((9, 700), torch.float32, "cuda", gen)
    crow, col = sp.mask_to_csr(torch.rand(600, 700, generator=gen) < 0.01)
    bad = col.clone()
    bad[3], bad[-1] = 700, -2
    out = sp.sddmm_csr(dy, x, crow.cuda(), bad.cuda()).cpu()
    want = ref.sddmm_csr(dy.double().cpu(), x.double().cpu(), crow, col)
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[3] = keep[-1] = False
    assert torch.isnan(out[~keep]).all()
    assert_close(out[keep], want[keep], torch.float32, "valid entries", factor=10)
