"""Sparse updates (ops.md section 4): the masked-gradient SDDMM and the SaRA / SNELL
layers against what users run today, timed in one run on the same inputs.

SDDMM, dDelta[mask] = (dy^T @ x)[mask], dy [M, N], x [M, K]:
  dense+gather     dy^T @ x (the dense [N, K] gradient), then gather the kept entries
  sampled_addmm    torch.sparse.sampled_addmm on the same pattern as CSR
  lrk_block        torch.ops.lrk.sddmm_block   (block masks)
  lrk_csr          torch.ops.lrk.sddmm_csr     (the same entries as CSR / unstructured masks)
GB/s counts the bytes a kernel must move at least: the dy and x panels that the kept
entries touch, read once, and the output written once; TFLOP/s counts 2*M flops per
kept entry. The block SDDMM is memory-bound (a 64x64 block over 8192 tokens does 32
flops per byte), so each row's note gives its GB/s as a share of the device's copy
bandwidth, measured in the same run (a large device-to-device copy, read + write).

CSR SDDMM against the dense product it replaces, at 0.1%, 1% and 10% of the
entries (random, duplicate-free), one table, ratios against "dense" of the same run:
  dense            dy^T @ x alone (TFLOP/s: 2*M*N*K)
  dense+gather     dy^T @ x, then the kept entries gathered
  lrk_csr          torch.ops.lrk.sddmm_csr
CUDA: M = 4096, N = K = 16384; CPU: M = 1024, N = K = 2048 (--quick: 256 x 512 x 512).

Layers, forward + backward (x requires grad, W frozen) of one N x K linear layer:
  full             nn.Linear with W trainable (dense gradient)
  lora             torch.ops.lrk.lora_fused, r = 16
  sara / sara_b64  lrk.nn.SaRALinear, 1% of the entries, unstructured / 64x64 blocks
  snell / snell_b64 lrk.nn.SNELLLinear, r = 16, piecewise-linear kernel, 90% sparsity
  snella           the same with learnable kernel scalars (learnable_kernel=True)
with the trainable state each leaves behind: gradient MiB and AdamW state MiB after
one optimizer step (measured from the tensors), and peak memory on CUDA.

Last, the issue's targets table: this run's block-SDDMM times next to the H200
targets (met / missed only when the run is the target's own configuration: CUDA,
bf16, M = 8192, N = K = 4096), and the trainable state of SaRA / SNELL against the
dense gradient of full fine-tuning.

    python -m benchmarks.bench_sparse [--device cuda] [--json out.json] [--quick]
"""
from __future__ import annotations

import math

import torch

import lrk
import lrk.sparse_ops as sp
from benchmarks.harness import (Progress, Result, environment, parse_bench_args, peak_mib, pick_cases, print_table, set_ratios, time_ms,
                               verdict, write_json)
from lrk.nn.sara import SaRALinear
from lrk.nn.snell import SNELLLinear

GPU_SDDMM = [  # (M, N, K, block size or 0 for unstructured, density)
    (8192, 4096, 4096, 64, 0.01), (8192, 4096, 4096, 64, 0.10), (8192, 4096, 4096, 64, 0.30),
    (8192, 4096, 4096, 32, 0.10), (8192, 4096, 4096, 128, 0.10), (32768, 4096, 4096, 64, 0.10),
    (8192, 4096, 4096, 0, 0.01), (8192, 4096, 4096, 0, 0.10),
]
CPU_SDDMM = [(1024, 512, 512, 64, 0.01), (1024, 512, 512, 64, 0.10), (1024, 512, 512, 64, 0.30),
             (1024, 512, 512, 16, 0.10), (1024, 512, 512, 0, 0.01), (1024, 512, 512, 0, 0.10)]
CSR_DENSITIES = (0.001, 0.01, 0.10)
GPU_CSR = [(4096, 16384, 16384, d) for d in CSR_DENSITIES]
CPU_CSR = [(1024, 2048, 2048, d) for d in CSR_DENSITIES]
CPU_CSR_QUICK = [(256, 512, 512, d) for d in CSR_DENSITIES]
GPU_LAYERS = [(8192, 4096, 4096)]
CPU_LAYERS = [(512, 512, 512)]


def _pattern(n, k, b, density, gen, device):
    """Kept entries as (block indices or None, element mask [N, K])."""
    if b:
        nbr, nbc = math.ceil(n / b), math.ceil(k / b)
        scores = torch.rand(nbr, nbc, generator=gen)
        idx = sp.topk_block_indices(scores, sp.keep_count(nbr * nbc, density)).to(device)
        bm = torch.zeros(nbr, nbc, dtype=torch.bool)
        bm[idx[:, 0].cpu(), idx[:, 1].cpu()] = True
        mask = bm.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :k]
        return idx, mask.to(device)
    return None, (torch.rand(n, k, generator=gen) < density).to(device)


def copy_gbps(device) -> float:
    """Bandwidth of a plain copy much larger than the caches (bytes read + written)."""
    nbytes = (512 if device.type == "cuda" else 64) << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def run_sddmm(M, N, K, b, density, device, dtype, copy_bw=None):
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(M, N, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
    idx, mask = _pattern(N, K, b, density, gen, device)
    crow, col = sp.mask_to_csr(mask)
    rows = torch.repeat_interleave(torch.arange(N, device=device), crow.diff())
    nnz = col.numel()
    case = f"{M}x{N}x{K} {'b' + str(b) if b else 'unstr'} {density:.0%}"
    rows_touched = int(mask.any(1).sum())
    cols_touched = int(mask.any(0).sum())
    nbytes = dtype.itemsize * M * (rows_touched + cols_touched) + 4 * (idx.shape[0] * b * b if b else nnz)
    flops = 2.0 * M * nnz

    def dense_gather():
        d = dy.t() @ x
        return d[rows, col]

    csr_pattern = torch.sparse_csr_tensor(crow, col, torch.ones(nnz, device=device, dtype=dtype), (N, K))

    def sampled():
        return torch.sparse.sampled_addmm(csr_pattern, dy.t(), x, beta=0.0).values()

    contenders = {"dense+gather": dense_gather, "sampled_addmm": sampled}
    if b:
        contenders["lrk_block"] = lambda: sp.sddmm_block(dy, x, idx, b)
    contenders["lrk_csr"] = lambda: sp.sddmm_csr(dy, x, crow, col)

    with torch.no_grad():
        want = (dy.float().t() @ x.float())[rows, col]
    results = []
    for name, fn in contenders.items():
        note, err = "", None
        gbps = None
        try:
            out = fn()
            if name == "lrk_block":  # block values -> the kept entries in row-major order
                vals = out
                br, bc = rows // b, col // b
                pos = torch.searchsorted(idx[:, 0] * (10**9) + idx[:, 1], br * (10**9) + bc)
                out = vals[pos, rows - br * b, col - bc * b]
            err = ((out.float() - want).norm() / want.norm()).item()
            ms = time_ms(fn, device)
            gbps = nbytes / ms / 1e6
            if copy_bw:
                note = f"{gbps / copy_bw:.0%} of copy bandwidth"
        except Exception as exc:  # report, keep going
            ms, note = None, f"failed: {type(exc).__name__}: {str(exc)[:70]}"
        results.append(Result(case=case, contender=name, ms=ms, tflops=flops / ms / 1e9 if ms else None,
                              gbps=gbps, rel_err=err, note=note,
                              extra=dict(shape=(M, N, K), block_size=b, density=density)))
    set_ratios(results)
    return results


def run_csr_vs_dense(M, N, K, density, device, dtype):
    """lrk_csr next to the dense product (and dense+gather) on one random pattern."""
    gen = torch.Generator().manual_seed(1)
    dy = torch.randn(M, N, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype)
    crow, col = sp.mask_to_csr(torch.rand(N, K, generator=gen) < density)
    crow, col = crow.to(device), col.to(device)
    rows = torch.repeat_interleave(torch.arange(N, device=device), crow.diff())
    nnz = col.numel()
    case = f"{M}x{N}x{K} csr {density:.1%}"
    with torch.no_grad():
        want = (dy.float().t() @ x.float())[rows, col]
    contenders = {
        "dense": (lambda: dy.t() @ x, 2.0 * M * N * K),
        "dense+gather": (lambda: (dy.t() @ x)[rows, col], 2.0 * M * nnz),
        "lrk_csr": (lambda: sp.sddmm_csr(dy, x, crow, col), 2.0 * M * nnz),
    }
    results = []
    for name, (fn, flops) in contenders.items():
        note, err = "", None
        try:
            out = fn()
            if name != "dense":
                err = ((out.float() - want).norm() / want.norm()).item()
            ms = time_ms(fn, device)
        except Exception as exc:  # report, keep going
            ms, note = None, f"failed: {type(exc).__name__}: {str(exc)[:70]}"
        results.append(Result(case=case, contender=name, ms=ms, tflops=flops / ms / 1e9 if ms else None,
                              rel_err=err, note=note or f"nnz {nnz}",
                              extra=dict(shape=(M, N, K), density=density, nnz=nnz)))
    set_ratios(results)
    return results


def _state_mib(params, opt):
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    return grads / 2**20, state / 2**20


def run_layers(M, N, K, device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(device=device, dtype=dtype)
    case = f"{M}x{K}x{N}"
    results = []

    def fresh_linear():
        lin = torch.nn.Linear(K, N, device=device, dtype=dtype)
        return lin

    r = 16
    full = fresh_linear()
    lora_a = (torch.randn(r, K, generator=gen) / math.sqrt(K)).to(device=device, dtype=dtype).requires_grad_()
    lora_b = torch.zeros(N, r, device=device, dtype=dtype, requires_grad=True)
    lora_base = fresh_linear().requires_grad_(False)
    layers = {
        "full": (full, list(full.parameters())),
        "lora": (lambda t: lrk.lora_fused(t, lora_base.weight, lora_base.bias, lora_a, lora_b, 2.0),
                 [lora_a, lora_b]),
    }
    for name, kw in (("sara", dict(fraction=0.01)), ("sara_b64", dict(fraction=0.01, block_size=64))):
        layer = SaRALinear(fresh_linear().requires_grad_(False), **kw)
        layers[name] = (layer, [layer.delta])
    for name, kw in (("snell", dict()), ("snell_b64", dict(block_size=64)), ("snella", dict(learnable_kernel=True))):
        layer = SNELLLinear(fresh_linear().requires_grad_(False), rank=r, sparsity=0.9, **kw)
        layers[name] = (layer, [p for p in layer.parameters() if p.requires_grad])

    for name, (fn, params) in layers.items():
        def fwd_bwd(fn=fn):
            fn(x).backward(dy)
        note = ""
        try:
            fwd_bwd()
            ms = time_ms(fwd_bwd, device, grad_to_none=[x] + params)
            mem = peak_mib(fwd_bwd, device)
            opt = torch.optim.AdamW(params, lr=1e-4)
            for p in params:
                p.grad = None
            fwd_bwd()
            opt.step()
            grad_mib, state_mib = _state_mib(params, opt)
            trained = sum(p.numel() for p in params)
        except Exception as exc:
            ms = mem = grad_mib = state_mib = trained = None
            note = f"failed: {type(exc).__name__}: {str(exc)[:70]}"
        results.append(Result(case=case, contender=name, ms=ms, peak_mib=mem, note=note,
                              extra=dict(grad_MiB=grad_mib, adamw_state_MiB=state_mib, trained_params=trained)))
    set_ratios(results)
    return results


def print_state_table(results):
    print(f"\n{'case':<22} {'layer':<12} {'trained':>12} {'grad MiB':>10} {'AdamW MiB':>10}")
    for r in results:
        e = r.extra
        if e.get("trained_params") is None:
            continue
        print(f"{r.case:<22} {r.contender:<12} {e['trained_params']:>12} {e['grad_MiB']:>10.2f} "
              f"{e['adamw_state_MiB']:>10.2f}")


# The targets: (row, block size, density of blocks, lrk target ms), H200,
# M = 8192, N = K = 4096, bf16.
SDDMM_TARGETS = [("block SDDMM (64x64 blocks), 10% of blocks", 64, 0.10, 0.12),
                 ("block SDDMM, 1% of blocks", 64, 0.01, 0.03)]
TARGET_SHAPE = (8192, 4096, 4096)


def print_targets(sddmm, layer_results, device, dtype):
    """The issue's table, filled with this run's measurements."""
    def ms(v):
        return f"{v:.4f} ms" if v is not None else "-"

    print(f"\n## targets (H200, M=8192, N=K=4096, bf16); this run: {device.type}, {dtype}")
    print(f"{'':<44} {'case':<22} {'dense+gather':>13} {'sampled_addmm':>14} {'lrk':>11} {'target':>10}  verdict")
    for label, b, density, target in SDDMM_TARGETS:
        rows = {r.contender: r for r in sddmm
                if r.extra.get("block_size") == b and r.extra.get("density") == density}
        if not rows:
            print(f"{label:<44} (not run)")
            continue
        any_row = next(iter(rows.values()))
        lrk_ms = rows["lrk_block"].ms if "lrk_block" in rows else None
        comparable = device.type == "cuda" and dtype == torch.bfloat16 and any_row.extra["shape"] == TARGET_SHAPE
        status = verdict(lrk_ms is not None and lrk_ms <= target, comparable,
                         "not comparable (other device, dtype or shape)")
        print(f"{label:<44} {any_row.case:<22} {ms(rows.get('dense+gather') and rows['dense+gather'].ms):>13} "
              f"{ms(rows.get('sampled_addmm') and rows['sampled_addmm'].ms):>14} {ms(lrk_ms):>11} "
              f"{'<= ' + str(target):>10}  {status}")
    full = next((r for r in layer_results if r.contender == "full" and r.extra.get("grad_MiB") is not None), None)
    for r in layer_results:
        e = r.extra
        if r.contender == "full" or e.get("grad_MiB") is None:
            continue
        dense = f"dense gradient {full.extra['grad_MiB']:.2f} MiB + AdamW {full.extra['adamw_state_MiB']:.2f} MiB" \
            if full else "dense gradient: not measured"
        print(f"{r.contender + ' layer training memory':<44} {r.case:<22} {dense}; lrk: gradient "
              f"{e['grad_MiB']:.2f} MiB + AdamW {e['adamw_state_MiB']:.2f} MiB for {e['trained_params']} trained values")


def main(argv=None):
    args, device, dtype = parse_bench_args(__doc__, argv, quick_help="first two SDDMM cases, the CSR table at smaller CPU shapes, and the layers")
    sddmm_cases = pick_cases(device, GPU_SDDMM, CPU_SDDMM, 2 if args.quick else None)
    layer_cases = pick_cases(device, GPU_LAYERS, CPU_LAYERS)
    copy_bw = copy_gbps(device)
    csr_cases = GPU_CSR if device.type == "cuda" else (CPU_CSR_QUICK if args.quick else CPU_CSR)
    progress = Progress("bench_sparse", len(sddmm_cases) + len(csr_cases) + len(layer_cases))
    sddmm = []
    for case in progress.over(sddmm_cases, "sddmm"):
        sddmm += run_sddmm(*case, device, dtype, copy_bw)
    title = f"masked-gradient SDDMM, {dtype}, {device.type}; copy bandwidth in this run {copy_bw:.0f} GB/s"
    print_table(title, sddmm)
    csr = []
    for case in progress.over(csr_cases, "csr vs dense"):
        csr += run_csr_vs_dense(*case, device, dtype)
    title_csr = f"CSR SDDMM vs the dense product, {dtype}, {device.type} (x base: against dense, same run)"
    print_table(title_csr, csr)
    layer_results = []
    for case in progress.over(layer_cases, "layers"):
        layer_results += run_layers(*case, device, dtype)
    title2 = f"sparse-update layers, forward+backward, {dtype}, {device.type}"
    print_table(title2, layer_results)
    print_state_table(layer_results)
    print_targets(sddmm, layer_results, device, dtype)
    if args.json:
        env = dict(environment(device), copy_GBps=copy_bw)
        write_json(args.json, title + " / " + title_csr + " / " + title2, env, sddmm + csr + layer_results)
    return sddmm + csr + layer_results


if __name__ == "__main__":
    main()
