"""torch.ops.lrk.multi_lora_{shrink,expand}[_segments]: values vs the per-token
reference (random adapter assignments with -1, mixed ranks, empty segments,
output slices, awkward K/N), pools whose unused parts hold NaN, opcheck,
torch.compile, CUDA-graph capture and replay, and bad input."""
import math

import pytest
import torch

import lrk
import lrk.multi_lora_ops as mlo
from lrk import reference_multi_lora as ref
from conftest import DEVICES, DEVICES_NO_EMU
from helpers import assert_close, poison_cuda_allocator

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _gen():
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))


def make_pool(n, r_max, K, n_out, dtype, device, ranks=None, gen=None, pad=float("nan"), index_dtype=torch.int64):
    """A pool with LoRA-like scales; every element past an adapter's rank holds
    `pad` (NaN by default), so a kernel that reads it shows up as NaN."""
    g = gen or _gen()
    if ranks is None:
        choices = torch.tensor([0, 1, r_max, max(1, r_max // 2), max(1, r_max - 3)])
        ranks = choices[torch.randint(0, len(choices), (n,), generator=g)]
        if n > 0:
            ranks[0] = r_max  # at least one full-rank adapter
    ranks = torch.as_tensor(ranks, dtype=torch.int64)
    lora_a, lora_b = [], []
    for n_s in n_out:
        a = torch.randn(n, r_max, K, generator=g, dtype=torch.float64) / math.sqrt(max(K, 1))
        b = torch.randn(n, n_s, r_max, generator=g, dtype=torch.float64) / math.sqrt(r_max)
        for j in range(n):
            a[j, int(ranks[j]):] = pad
            b[j, :, int(ranks[j]):] = pad
        lora_a.append(a.to(dtype).to(device))
        lora_b.append(b.to(dtype).to(device))
    scales = (0.5 + torch.rand(n, generator=g)).to(device)
    return lora_a, lora_b, ranks.to(index_dtype).to(device), scales


def clean(pools):
    """float64 CPU copies with the NaN padding zeroed (the reference reads only :r anyway)."""
    return [torch.nan_to_num(p.detach().double().cpu(), nan=0.0) for p in pools]


def random_ids(M, n, gen, p_none=0.25):
    ids = torch.randint(0, max(n, 1), (M,), generator=gen)
    none = torch.rand(M, generator=gen) < p_none
    ids[none] = -1
    if n == 0:
        ids[:] = -1
    return ids


def random_segments(M, n, num_segments, gen, lead=0, tail=0):
    """Sorted segments covering [lead, M - tail) with some empty ones and some -1."""
    cuts = torch.sort(torch.randint(lead, M - tail + 1, (num_segments - 1,), generator=gen)).values
    offsets = torch.cat([torch.tensor([lead]), cuts, torch.tensor([M - tail])])
    if num_segments > 2:
        offsets[2] = offsets[1]  # an empty segment
    adapters = torch.randint(0, max(n, 1), (num_segments,), generator=gen)
    adapters[torch.rand(num_segments, generator=gen) < 0.2] = -1
    if n == 0:
        adapters[:] = -1
    return offsets, adapters


def _check_untouched(y, y0, ids, offsets, n_out, n_total):
    """Tokens without an adapter and columns outside every slice stay bit-identical."""
    y2, y02 = y.reshape(-1, n_total), y0.reshape(-1, n_total)
    none = (ids == -1).to(y.device)
    assert torch.equal(y2[none], y02[none]), "rows of tokens without an adapter changed"
    cols = torch.ones(n_total, dtype=torch.bool)
    for off, n_s in zip(offsets, n_out):
        cols[off:off + n_s] = False
    cols = cols.to(y.device)
    assert torch.equal(y2[:, cols], y02[:, cols]), "columns outside the slices changed"


# (lead dims, K, output slices N_s, slice_offsets or None, n adapters, r_max)
CASES = [
    ((0,), 16, [8], None, 3, 4),
    ((1,), 33, [17], None, 4, 8),
    ((37,), 29, [45], None, 7, 16),
    ((2, 5), 21, [19], None, 3, 5),
    ((64,), 128, [96, 32, 32], None, 6, 16),        # fused QKV
    ((70,), 72, [40, 40], [50, 0], 5, 64),          # gate/up, reversed, with a gap of 10 columns
    ((9,), 24, [3] * 10, None, 4, 8),               # more slices than one launch takes
    ((33,), 256, [264], None, 9, 128),              # ranks past 64
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead,K,n_out,offsets,n,r_max", CASES)
def test_per_token_matches_reference(device, dtype, lead, K, n_out, offsets, n, r_max):
    g = _gen()
    M = math.prod(lead)
    lora_a, lora_b, ranks, scales = make_pool(n, r_max, K, n_out, dtype, device, gen=g)
    n_total = max(o + s for o, s in zip(offsets, n_out)) if offsets else sum(n_out)
    x = torch.randn(*lead, K, generator=g, dtype=torch.float64).to(dtype).to(device)
    y0 = (torch.randn(*lead, n_total, generator=g, dtype=torch.float64) * 0.3).to(dtype).to(device)
    ids = random_ids(M, n, g).to(device)
    poison_cuda_allocator(device)
    h = mlo.multi_lora_shrink(x, lora_a, ranks, ids)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert h.shape == (len(n_out), M, r_max) and h.dtype == acc and h.device.type == device
    h_ref = ref.multi_lora_shrink(x.double().cpu(), clean(lora_a), ranks.cpu(), ids.cpu())
    assert_close(h, h_ref, dtype, "h")
    y = y0.clone()
    out = mlo.multi_lora_expand_(y, h, lora_b, ranks, scales, ids, offsets)
    assert out is y
    y_ref = ref.multi_lora_expand(y0.double().cpu(), h_ref, clean(lora_b), ranks.cpu(), scales.cpu(), ids.cpu(),
                                  offsets)
    assert_close(y, y_ref, dtype, "y")
    _check_untouched(y, y0, ids.cpu(), offsets or [sum(n_out[:s]) for s in range(len(n_out))], n_out, n_total)


# (M, K, N, n adapters, r_max, segments, tokens before the first / after the last segment)
SEGMENT_CASES = [
    (300, 64, 72, 4, 16, 5, 0, 0),       # long segments: tile kernels on CUDA (half types)
    (517, 40, 33, 6, 24, 7, 3, 5),       # awkward sizes, uncovered tokens at both ends
    (200, 136, 128, 3, 128, 3, 0, 0),    # ranks past 64: several rank tiles
    (40, 48, 24, 5, 8, 10, 0, 2),        # short segments: one token per block on CUDA
    (0, 16, 8, 2, 4, 1, 0, 0),           # empty batch
    (12, 16, 8, 3, 8, 0, 0, 12),         # no segment at all
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N,n,r_max,num_segments,lead,tail", SEGMENT_CASES)
def test_segments_match_reference(device, dtype, M, K, N, n, r_max, num_segments, lead, tail):
    g = _gen()
    lora_a, lora_b, ranks, scales = make_pool(n, r_max, K, [N, N // 2 + 1], dtype, device, gen=g)
    if num_segments == 0:
        offsets, adapters = torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    else:
        offsets, adapters = random_segments(M, n, num_segments, g, lead, tail)
    ids = ref.segments_to_adapter_ids(offsets, adapters, M)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype).to(device)
    n_total = N + N // 2 + 1
    y0 = (torch.randn(M, n_total, generator=g, dtype=torch.float64) * 0.3).to(dtype).to(device)
    poison_cuda_allocator(device)
    h = mlo.multi_lora_shrink_segments(x, lora_a, ranks, offsets.to(device), adapters.to(device))
    h_ref = ref.multi_lora_shrink(x.double().cpu(), clean(lora_a), ranks.cpu(), ids)
    assert_close(h, h_ref, dtype, "h")
    y = y0.clone()
    mlo.multi_lora_expand_segments_(y, h, lora_b, ranks, scales, offsets.to(device), adapters.to(device))
    y_ref = ref.multi_lora_expand(y0.double().cpu(), h_ref, clean(lora_b), ranks.cpu(), scales.cpu(), ids)
    assert_close(y, y_ref, dtype, "y")
    _check_untouched(y, y0, ids, [0, N], [N, N // 2 + 1], n_total)
    # The same tokens through the per-token layout give the same result.
    h2 = mlo.multi_lora_shrink(x, lora_a, ranks, ids.to(device))
    y2 = mlo.multi_lora_expand_(y0.clone(), h2, lora_b, ranks, scales, ids.to(device))
    assert_close(y2, y_ref, dtype, "y per token")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale,h_size", [(8.0, 8200.0), (0.25, 1.0e5)], ids=["scale8", "scale_quarter"])
def test_fp16_near_overflow_h_on_every_expand_path(device, scale, h_size):
    """fp16 with 8200 <= |h| / h_size <= 2 and s_j = scale: s_j * h (scale 8) or h
    itself (scale 1/4) is past fp16's 65504 while y is not. The reference and the
    row kernels keep h in fp32; the tile kernels stage it in fp16, so they must
    stage whichever of h and s_j * h is smaller and apply the rest in fp32. The
    same y from the three CUDA paths: 2 segments of 64 tokens (tiles: M >= 16 per
    segment), the same with 7 empty segments appended (9 * 16 > M: one token per
    block), and per-token ids."""
    g = torch.Generator().manual_seed(8200)
    M, N, n, r = 128, 72, 2, 16
    ranks = torch.tensor([r, r])
    scales = torch.full((n,), scale)
    lora_b = [(torch.randn(n, N, r, generator=g, dtype=torch.float64) * 2e-3).to(torch.float16)]
    sign = torch.randint(0, 2, (1, M, r), generator=g) * 2 - 1
    h = (sign * h_size * (1 + torch.rand(1, M, r, generator=g, dtype=torch.float64))).float()
    y0 = torch.randn(M, N, generator=g, dtype=torch.float64).to(torch.float16)
    offsets, adapters = torch.tensor([0, 64, M]), torch.tensor([0, 1])
    ids = ref.segments_to_adapter_ids(offsets, adapters, M)
    y_ref = ref.multi_lora_expand(y0.double(), h.double(), clean(lora_b), ranks, scales, ids)
    padded_offsets = torch.cat([offsets, torch.full((7,), M)])
    padded_adapters = torch.cat([adapters, torch.zeros(7, dtype=torch.int64)])
    h, y0, ranks, scales, lora_b = h.to(device), y0.to(device), ranks.to(device), scales.to(device), [lora_b[0].to(device)]
    outputs = {
        "tiles": mlo.multi_lora_expand_segments_(y0.clone(), h, lora_b, ranks, scales, offsets.to(device),
                                                 adapters.to(device)),
        "segment rows": mlo.multi_lora_expand_segments_(y0.clone(), h, lora_b, ranks, scales,
                                                        padded_offsets.to(device), padded_adapters.to(device)),
        "per token": mlo.multi_lora_expand_(y0.clone(), h, lora_b, ranks, scales, ids.to(device)),
    }
    for path, y in outputs.items():
        assert torch.isfinite(y).all(), path
        assert_close(y, y_ref, torch.float16, f"y ({path})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_dtypes(device, index_dtype):
    g = _gen()
    lora_a, lora_b, ranks, scales = make_pool(5, 8, 24, [16], torch.float32, device, gen=g, index_dtype=index_dtype)
    x = torch.randn(20, 24, generator=g).to(device)
    ids = random_ids(20, 5, g)
    y = torch.zeros(20, 16, device=device)
    mlo.add_multi_lora_(y, x, lora_a, lora_b, ranks, scales, adapter_ids=ids.to(index_dtype).to(device))
    y_ref = ref.multi_lora(torch.zeros(20, 16, dtype=torch.float64), x.double().cpu(), clean(lora_a), clean(lora_b),
                           ranks.cpu(), scales.cpu(), ids)
    assert_close(y, y_ref, torch.float32, "y")
    offsets, adapters = random_segments(20, 5, 4, g)
    y = torch.zeros(20, 16, device=device)
    mlo.add_multi_lora_(y, x, lora_a, lora_b, ranks, scales, seg_offsets=offsets.to(index_dtype).to(device),
                        seg_adapters=adapters.to(index_dtype).to(device))
    y_ref = ref.multi_lora(torch.zeros(20, 16, dtype=torch.float64), x.double().cpu(), clean(lora_a), clean(lora_b),
                           ranks.cpu(), scales.cpu(), ref.segments_to_adapter_ids(offsets, adapters, 20))
    assert_close(y, y_ref, torch.float32, "y segments")


@pytest.mark.parametrize("device", DEVICES)
def test_expand_into_a_strided_view(device):
    """y may be a view with a row stride (e.g. one part of a wider output)."""
    g = _gen()
    lora_a, lora_b, ranks, scales = make_pool(3, 4, 12, [10], torch.float32, device, gen=g)
    full = torch.randn(2, 7, 30, generator=g).to(device)
    y = full[..., 5:15]
    x = torch.randn(2, 7, 12, generator=g).to(device)
    ids = random_ids(14, 3, g).to(device)
    expected = ref.multi_lora(y.double().cpu(), x.double().cpu(), clean(lora_a), clean(lora_b), ranks.cpu(),
                              scales.cpu(), ids.cpu())
    before = full.clone()
    mlo.add_multi_lora_(y, x, lora_a, lora_b, ranks, scales, adapter_ids=ids)
    assert_close(full[..., 5:15], expected, torch.float32, "y view")
    assert torch.equal(full[..., :5], before[..., :5]) and torch.equal(full[..., 15:], before[..., 15:])


@pytest.mark.parametrize("device", DEVICES)
def test_adapter_of_rank_r_reads_only_r(device):
    """An adapter's slot past its rank is never read (NaN there stays out of y),
    and a pool with r_max = 64 gives the same result as one with r_max = its rank."""
    g = _gen()
    K, N, r = 64, 48, 8
    lora_a, lora_b, ranks, scales = make_pool(2, 64, K, [N], torch.bfloat16, device, ranks=[r, r], gen=g)
    small_a = [a[:, :r].contiguous() for a in lora_a]
    small_b = [b[:, :, :r].contiguous() for b in lora_b]
    x = torch.randn(130, K, generator=g).to(torch.bfloat16).to(device)
    ids = random_ids(130, 2, g).to(device)
    y_big = torch.zeros(130, N, dtype=torch.bfloat16, device=device)
    mlo.add_multi_lora_(y_big, x, lora_a, lora_b, ranks, scales, adapter_ids=ids)
    y_small = torch.zeros_like(y_big)
    mlo.add_multi_lora_(y_small, x, small_a, small_b, ranks, scales, adapter_ids=ids)
    assert torch.isfinite(y_big.float()).all()
    assert_close(y_big, y_small.double(), torch.bfloat16, "y")


# Segments of 200 tokens: 64-token tiles hold several segments, and adapter 0's
# tokens share tiles with other adapters' tokens on both sides and with tokens
# without an adapter ([90, 100)).
POISON_SEGMENTS = [(0, 30, 1), (30, 90, 0), (90, 100, -1), (100, 150, 2), (150, 170, 0), (170, 200, 3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,r_max", [(32, 16), (264, 128)])  # CUDA tiles: one K step; K split and two rank tiles
@pytest.mark.parametrize("poison", ["lora_a", "lora_b", "x"])
@pytest.mark.parametrize("layout", ["segments", "per_token"])
def test_non_finite_values_stay_in_their_tokens(device, dtype, K, r_max, poison, layout):
    """An adapter holding Inf (or a token whose input is Inf) makes only its own
    tokens non-finite: every other token's h and y match the reference, and tokens
    without an adapter keep y bit for bit."""
    g = _gen()
    M, n_out = 200, [72, 40]
    lora_a, lora_b, ranks, scales = make_pool(4, r_max, K, n_out, dtype, device, ranks=[r_max, r_max // 2, 3, r_max],
                                              gen=g)
    offsets = torch.tensor([lo for lo, _, _ in POISON_SEGMENTS] + [M])
    adapters = torch.tensor([j for _, _, j in POISON_SEGMENTS])
    ids = ref.segments_to_adapter_ids(offsets, adapters, M)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(dtype).to(device)
    if poison == "lora_a":
        for a in lora_a:
            a[0, 1, 5] = float("inf")
        poisoned = ids == 0
    elif poison == "lora_b":
        for b in lora_b:
            b[0, 7, 2] = float("inf")
        poisoned = ids == 0
    else:
        x[95] = float("inf")      # a token without an adapter: x is not read
        x[110, 3] = float("inf")  # a token of adapter 2
        poisoned = torch.arange(M) == 110
    n_total = sum(n_out)
    y0 = (torch.randn(M, n_total, generator=g, dtype=torch.float64) * 0.3).to(dtype).to(device)
    y = y0.clone()
    if layout == "segments":
        h = mlo.multi_lora_shrink_segments(x, lora_a, ranks, offsets.to(device), adapters.to(device))
        mlo.multi_lora_expand_segments_(y, h, lora_b, ranks, scales, offsets.to(device), adapters.to(device))
    else:
        h = mlo.multi_lora_shrink(x, lora_a, ranks, ids.to(device))
        mlo.multi_lora_expand_(y, h, lora_b, ranks, scales, ids.to(device))
    h, y = h.cpu(), y.cpu()

    # The reference without the poisoned tokens' adapter terms (their ids are -1 there).
    ref_ids = torch.where(poisoned, -1, ids)
    h_ref = ref.multi_lora_shrink(x.double().cpu(), clean(lora_a), ranks.cpu(), ref_ids)
    y_ref = ref.multi_lora_expand(y0.double().cpu(), h_ref, clean(lora_b), ranks.cpu(), scales.cpu(), ref_ids)
    keep = ~poisoned
    assert_close(h[:, keep], h_ref[:, keep], dtype, "h of the other tokens")
    assert_close(y[keep], y_ref[keep], dtype, "y of the other tokens")
    assert torch.equal(y[ids == -1], y0.cpu()[ids == -1]), "rows of tokens without an adapter changed"
    # The poison was read: each poisoned token's own result is non-finite.
    own = y[poisoned] if poison == "lora_b" else h[0, poisoned]
    assert (~torch.isfinite(own.float())).any(dim=-1).all()


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    g = _gen()
    lora_a, lora_b, ranks, scales = make_pool(4, 8, 24, [16, 8], dtype, device, gen=g, pad=0.0)
    x = torch.randn(3, 7, 24, generator=g).to(dtype).to(device)
    ids = random_ids(21, 4, g).to(device)
    offsets, adapters = random_segments(21, 4, 4, g)
    offsets, adapters = offsets.to(device), adapters.to(device)
    h = torch.ops.lrk.multi_lora_shrink(x, lora_a, ranks, ids)
    y = torch.randn(3, 7, 30, generator=g).to(dtype).to(device)
    torch.library.opcheck(torch.ops.lrk.multi_lora_shrink.default, (x, lora_a, ranks, ids))
    torch.library.opcheck(torch.ops.lrk.multi_lora_shrink_segments.default, (x, lora_a, ranks, offsets, adapters))
    torch.library.opcheck(torch.ops.lrk.multi_lora_expand.default, (y.clone(), h, lora_b, ranks, scales, ids, None))
    torch.library.opcheck(torch.ops.lrk.multi_lora_expand.default,
                          (y.clone(), h, lora_b, ranks, scales, ids, [14, 2]))
    torch.library.opcheck(torch.ops.lrk.multi_lora_expand_segments.default,
                          (y.clone(), h, lora_b, ranks, scales, offsets, adapters, None))


@pytest.mark.parametrize("device", DEVICES_NO_EMU)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    g = _gen()
    lora_a, lora_b, ranks, scales = make_pool(4, 8, 32, [24, 8], torch.float32, device, gen=g, pad=0.0)
    w = (torch.randn(32, 32, generator=g) / 6).to(device)
    x = torch.randn(2, 9, 32, generator=g).to(device)
    ids = random_ids(18, 4, g).to(device)
    offsets, adapters = random_segments(18, 4, 3, g)
    offsets, adapters = offsets.to(device), adapters.to(device)

    def layer(x, ids, offsets, adapters):
        y = torch.nn.functional.linear(x, w)
        mlo.add_multi_lora_(y, x, lora_a, lora_b, ranks, scales, adapter_ids=ids)
        z = torch.nn.functional.linear(x, w)
        mlo.add_multi_lora_(z, x, lora_a, lora_b, ranks, scales, seg_offsets=offsets, seg_adapters=adapters)
        return torch.relu(y) + z

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out_c = compiled(x, ids, offsets, adapters)
    out_e = layer(x, ids, offsets, adapters)
    torch.testing.assert_close(out_c, out_e)
    ids2 = random_ids(18, 4, g).to(device)  # new ids, same graph
    torch.testing.assert_close(compiled(x, ids2, offsets, adapters), layer(x, ids2, offsets, adapters))


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["per_token", "segments"])
def test_cuda_graph_capture_and_replay(layout):
    if not (torch.cuda.is_available() and lrk.has_cuda_kernels()):
        pytest.skip("needs a CUDA GPU and lrk built with CUDA")
    g = _gen()
    dev, dtype, M, K, N, n = "cuda", torch.bfloat16, 256, 128, 96, 6
    lora_a, lora_b, ranks, scales = make_pool(n, 16, K, [N], dtype, dev, gen=g, pad=0.0)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype).to(dev)
    x = torch.zeros(M, K, dtype=dtype, device=dev)
    ids = torch.full((M,), -1, dtype=torch.int32, device=dev)
    offsets = torch.zeros(5, dtype=torch.int32, device=dev)
    adapters = torch.full((4,), -1, dtype=torch.int32, device=dev)

    def step():
        y = torch.nn.functional.linear(x, w)
        if layout == "per_token":
            return mlo.add_multi_lora_(y, x, lora_a, lora_b, ranks, scales, adapter_ids=ids)
        return mlo.add_multi_lora_(y, x, lora_a, lora_b, ranks, scales, seg_offsets=offsets, seg_adapters=adapters)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    for _ in range(3):  # new inputs and adapter choices, copied into the captured buffers
        x.copy_(torch.randn(M, K, generator=g).to(dtype))
        new_ids = random_ids(M, n, g)
        new_off, new_ad = random_segments(M, n, 4, g)
        ids.copy_(new_ids.to(torch.int32))
        offsets.copy_(new_off.to(torch.int32))
        adapters.copy_(new_ad.to(torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        token_ids = new_ids if layout == "per_token" else ref.segments_to_adapter_ids(new_off, new_ad, M)
        y_ref = ref.multi_lora(torch.nn.functional.linear(x.double().cpu(), w.double().cpu()), x.double().cpu(),
                               clean(lora_a), clean(lora_b), ranks.cpu(), scales.cpu(), token_ids)
        assert_close(y_static, y_ref, dtype, "replayed y")


@pytest.mark.cuda
def test_cuda_bad_index_values_are_safe():
    """On CUDA, values are not checked (that would synchronise); out-of-range ids
    act as -1, ranks are clamped to r_max, and nothing is read outside the pool."""
    if not (torch.cuda.is_available() and lrk.has_cuda_kernels()):
        pytest.skip("needs a CUDA GPU and lrk built with CUDA")
    g = _gen()
    lora_a, lora_b, ranks, scales = make_pool(3, 8, 32, [16], torch.float32, "cuda", ranks=[8, 4, 2], gen=g)
    x = torch.randn(6, 32, generator=g).cuda()
    ids = torch.tensor([0, 3, -5, 1, 1 << 40, 2], device="cuda")
    bad_ranks = torch.tensor([50, -3, 2], device="cuda")
    y = torch.zeros(6, 16, device="cuda")
    mlo.add_multi_lora_(y, x, lora_a, lora_b, bad_ranks, scales, adapter_ids=ids)
    torch.cuda.synchronize()
    y_ref = ref.multi_lora(torch.zeros(6, 16, dtype=torch.float64), x.double().cpu(), clean(lora_a), clean(lora_b),
                           torch.tensor([8, 0, 2]), scales.cpu(), torch.tensor([0, -1, -1, 1, -1, 2]))
    assert_close(y, y_ref, torch.float32, "y")
    bad_offsets = torch.tensor([-4, 3, 2, 100], device="cuda")  # decreasing and out of range: no crash
    mlo.add_multi_lora_(y, x, lora_a, lora_b, ranks, scales, seg_offsets=bad_offsets,
                        seg_adapters=torch.tensor([0, 1, 9], device="cuda"))
    torch.cuda.synchronize()
    assert torch.isfinite(y).all()


# ----------------------------------------------------------------------------- bad input


def _good(device="cpu", dtype=torch.float32):
    lora_a, lora_b, ranks, scales = make_pool(3, 4, 16, [8], dtype, device, ranks=[4, 2, 0], pad=0.0)
    return dict(x=torch.randn(5, 16, dtype=dtype, device=device), lora_a=lora_a, lora_b=lora_b, ranks=ranks,
                scales=scales, ids=torch.tensor([0, 1, -1, 2, 0], device=device),
                offsets=torch.tensor([0, 2, 2, 5], device=device), adapters=torch.tensor([1, 0, -1], device=device),
                y=torch.zeros(5, 8, dtype=dtype, device=device))


def _shrink(a):
    return torch.ops.lrk.multi_lora_shrink(a["x"], a["lora_a"], a["ranks"], a["ids"])


def _shrink_seg(a):
    return torch.ops.lrk.multi_lora_shrink_segments(a["x"], a["lora_a"], a["ranks"], a["offsets"], a["adapters"])


def _expand(a, h=None, slice_offsets=None):
    h = _shrink(_good()) if h is None else h
    torch.ops.lrk.multi_lora_expand(a["y"], h, a["lora_b"], a["ranks"], a["scales"], a["ids"], slice_offsets)


def _expand_seg(a):
    torch.ops.lrk.multi_lora_expand_segments(a["y"], _shrink(_good()), a["lora_b"], a["ranks"], a["scales"],
                                             a["offsets"], a["adapters"], None)


BAD = [
    (_shrink, dict(ids=torch.tensor([0, 1, 3, 2, 0])), r"adapter_ids: id 3 of token 2 is out of range for a pool of 3"),
    (_shrink, dict(ids=torch.tensor([0, -2, 1, 2, 0])), r"adapter_ids: id -2 of token 1 is out of range"),
    (_expand, dict(ids=torch.tensor([0, 1, 7, 2, 0])), r"adapter_ids: id 7 of token 2 is out of range"),
    (_shrink, dict(ids=torch.tensor([0, 1, 2])), r"adapter_ids: expected size 5 in dim 0"),
    (_shrink, dict(ids=torch.tensor([0., 1, 2, 2, 0])), r"adapter_ids: expected dtype int32 or int64"),
    (_shrink, dict(ranks=torch.tensor([4, 5, 0])), r"ranks: the rank of adapter 1 is 5, above r_max = 4"),
    (_expand, dict(ranks=torch.tensor([4, 9, 0])), r"ranks: the rank of adapter 1 is 9, above r_max = 4"),
    (_shrink, dict(ranks=torch.tensor([4, -1, 0])), r"ranks: the rank of adapter 1 is negative"),
    (_shrink, dict(ranks=torch.tensor([4, 1])), r"ranks: expected size 3 in dim 0"),
    (_shrink, dict(x=torch.randn(5, 16, dtype=torch.float64)), r"lora_a\[0\]: expected dtype Double"),
    (_shrink, dict(x=torch.ones(5, 16, dtype=torch.int64)), r"x: expected dtype float32"),
    (_shrink, dict(x=torch.randn(5, 15)), r"lora_a\[0\]: expected size 15 in dim 2"),
    (_shrink, dict(lora_a=[]), r"lora_a: expected a list of at least one pool"),
    (_shrink, dict(lora_a=[torch.randn(3, 4, 16), torch.randn(3, 5, 16)]), r"lora_a\[1\]: expected size 4 in dim 1"),
    (_shrink, dict(lora_a=[torch.randn(3, 16, 4).transpose(1, 2)]), r"lora_a\[0\]: expected a contiguous pool"),
    (_shrink, dict(lora_a=[torch.randn(3, 16)]), r"lora_a\[0\]: expected a 3-D tensor"),
    (_expand, dict(y=torch.zeros(5, 8, dtype=torch.bfloat16)), r"lora_b\[0\]: expected dtype BFloat16"),
    (_expand, dict(scales=torch.ones(3, dtype=torch.float64)), r"scales: expected dtype float32"),
    (_expand, dict(scales=torch.ones(2)), r"scales: expected size 3 in dim 0"),
    (_expand, dict(y=torch.zeros(4, 8)), r"h: expected shape \[1, 4, 4\]"),
    (_expand, dict(y=torch.zeros(5, 6)), r"slice_offsets: slice 0 .* does not fit in y's 6 columns"),
    (_expand, dict(y=torch.zeros(8, 5).t()), r"y: expected a unit stride in the last dim"),
    (_expand, dict(lora_b=[torch.zeros(3, 8, 4), torch.zeros(3, 8, 4)]), r"h: expected shape \[2, 5, 4\]"),
    (_expand, dict(lora_b=[torch.zeros(3, 8, 5)]), r"h: expected shape \[1, 5, 5\]"),
    (_shrink_seg, dict(offsets=torch.tensor([0, 3, 2, 5])), r"seg_offsets: expected non-decreasing offsets"),
    (_shrink_seg, dict(offsets=torch.tensor([0, 2, 2, 6])), r"seg_offsets: expected offsets within \[0, 5\]"),
    (_shrink_seg, dict(offsets=torch.tensor([0, 2, 5])), r"seg_offsets: expected size 4 in dim 0"),
    (_shrink_seg, dict(adapters=torch.tensor([1, 3, -1])), r"seg_adapters: id 3 of segment 1 is out of range"),
    (_expand_seg, dict(adapters=torch.tensor([1, 0, -4])), r"seg_adapters: id -4 of segment 2 is out of range"),
]


@pytest.mark.parametrize("fn,change,match", BAD)
def test_bad_input_names_the_argument(fn, change, match):
    args = _good()
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        fn(args)


def test_bad_h_and_slices():
    a = _good()
    h = _shrink(a)
    with pytest.raises(RuntimeError, match=r"h: expected dtype Float .*got Double"):
        _expand(a, h.double())
    a2 = _good()
    a2["y"] = torch.zeros(5, 16)
    a2["lora_b"] = [torch.zeros(3, 8, 4), torch.zeros(3, 8, 4)]
    h2 = torch.zeros(2, 5, 4)
    with pytest.raises(RuntimeError, match=r"slice_offsets: slices overlap"):
        _expand(a2, h2, [0, 4])
    with pytest.raises(RuntimeError, match=r"slice_offsets: expected 2 offsets"):
        _expand(a2, h2, [0])
    _expand(a2, h2, [8, 0])  # reversed order is fine


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_on_device(device):
    a = _good(device, torch.bfloat16)
    a["lora_a"] = [a["lora_a"][0].float()]
    with pytest.raises(RuntimeError, match=r"lora_a\[0\]: expected dtype BFloat16"):
        _shrink(a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_mix():
    a = _good("cuda")
    a["ids"] = a["ids"].cpu()
    with pytest.raises(RuntimeError, match=r"adapter_ids: expected a tensor on cuda"):
        _shrink(a)
    a = _good("cuda")
    a["ranks"] = a["ranks"].cpu()
    with pytest.raises(RuntimeError, match=r"ranks: expected a tensor on cuda"):
        _shrink(a)


def test_host_side_checks():
    mlo.check_adapter_ids(torch.tensor([-1, 0, 2]), 3)
    with pytest.raises(ValueError, match=r"adapter_ids: id 3 at position 1 is out of range for a pool of 3"):
        mlo.check_adapter_ids(torch.tensor([-1, 3, 2]), 3)
    with pytest.raises(ValueError, match=r"adapter_ids: id -4 at position 2"):
        mlo.check_adapter_ids(torch.tensor([-1, 0, -4]), 3)
    mlo.check_segments(torch.tensor([0, 2, 2, 5]), torch.tensor([0, -1, 1]), 5, 2)
    with pytest.raises(ValueError, match="non-decreasing"):
        mlo.check_segments(torch.tensor([0, 3, 2, 5]), torch.tensor([0, -1, 1]), 5, 2)
    with pytest.raises(ValueError, match=r"seg_adapters: id 2"):
        mlo.check_segments(torch.tensor([0, 2, 2, 5]), torch.tensor([0, 2, 1]), 5, 2)
    off, ad = mlo.segments_from_sorted_ids([3, 3, -1, 0, 0, 0])
    assert off.tolist() == [0, 2, 3, 6] and ad.tolist() == [3, -1, 0]
    off, ad = mlo.segments_from_sorted_ids([])
    assert off.tolist() == [0] and ad.tolist() == []


@pytest.mark.parametrize("device", DEVICES)
def test_expand_row_pitch_from_dims_of_size_above_one(device):
    """A y whose size-1 leading dims carry odd strides is still laid out by its real
    row pitch; an expanded y (rows sharing memory) is refused."""
    K, N, n, r = 16, 8, 3, 4
    x = torch.randn(4, K, device=device)
    a, b = [torch.randn(n, r, K, device=device)], [torch.randn(n, N, r, device=device)]
    ranks = torch.tensor([4, 2, 3], device=device)
    scales = torch.tensor([1.0, 0.5, 2.0], device=device)
    ids = torch.tensor([0, 1, -1, 2], device=device)
    h = torch.ops.lrk.multi_lora_shrink(x, a, ranks, ids)
    y = torch.zeros(4, 1, N, 1, device=device).permute(0, 1, 3, 2)  # strides (8, 8, 1, 1)
    y_dense = torch.zeros(4, 1, 1, N, device=device)
    torch.ops.lrk.multi_lora_expand(y, h, b, ranks, scales, ids)
    torch.ops.lrk.multi_lora_expand(y_dense, h, b, ranks, scales, ids)
    assert y.abs().sum() > 0
    torch.testing.assert_close(y, y_dense)
    with pytest.raises(RuntimeError, match="y: it is updated in place, but some of its elements share memory"):
        torch.ops.lrk.multi_lora_expand(torch.zeros(N, device=device).expand(4, N), h, b, ranks, scales, ids)
