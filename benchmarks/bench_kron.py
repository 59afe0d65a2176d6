"""Kronecker adapters (ops.md section 5): kron_linear forward and forward+backward, and
kpsvd, against what users run today. Timed in one run on the same inputs.

kron_linear contenders (frozen W, bias; trainable u, v, sigma; x requires grad):
  base          F.linear(x, W, b) alone: the floor
  materialize   F.linear(x, W, b) + F.linear(x, sum_t sigma_t kron(u_t, v_t))  (PEFT LoKr's way)
  einsum        F.linear(x, W, b) + einsum over X = x.view(M, n1, n2)
  lrk           torch.ops.lrk.kron_linear(x, u, v, sigma, W, b)
and the same without the base layer ("adapter only": the issue's forward target).

kpsvd contenders on W [N, K] (float32), `terms` terms:
  svd           torch.linalg.svd of the rearranged matrix (the exact optimum)
  svd_lowrank   torch.svd_lowrank of the rearranged matrix (q = terms + 20, niter = 8)
  lrk exact / lrk randomized   torch.ops.lrk.kpsvd
"rel err" for kpsvd is the Frobenius error's excess over the exact optimum,
(err - opt) / opt; for kron_linear it is lrk's output error against float64.
A last table sets the first case of each kind against the issue's targets (forward,
forward+backward relative to lrk's forward, kpsvd time and error), with a verdict only
for the issue's H200 bf16 case.

    python -m benchmarks.bench_kron [--device cuda] [--json out.json] [--quick]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import lrk
import lrk.kron_ops  # noqa: F401
from lrk.kron_ops import kron_dense, kron_linear
from lrk.kron_select import choose_factorization
from benchmarks.harness import (Progress, Result, device_name, environment, parse_bench_args, peak_mib, pick_cases, print_table,
                               set_ratios, time_ms, verdict, write_json, write_profile)

GPU_CASES = [  # (M, N, K, terms)
    (8192, 4096, 4096, 4),
    (8192, 4096, 4096, 16),
    (8192, 11008, 4096, 4),
    (2048, 4096, 4096, 4),
]
CPU_CASES = [
    (512, 1024, 1024, 4),
    (256, 768, 512, 8),
]
GPU_KPSVD = [(4096, 4096, 16), (4096, 11008, 16)]
CPU_KPSVD = [(1024, 1024, 16)]


def _inputs(M, N, K, terms, device, dtype, gen):
    m1, m2, n1, n2 = choose_factorization(N, K)
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(device=device, dtype=dtype)
    b = torch.randn(N, generator=gen).to(device=device, dtype=dtype)
    u = (torch.randn(terms, m1, n1, generator=gen) / math.sqrt(n1)).to(device=device, dtype=dtype).requires_grad_()
    v = (torch.randn(terms, m2, n2, generator=gen) / math.sqrt(n2)).to(device=device, dtype=dtype).requires_grad_()
    s = torch.rand(terms, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(device=device, dtype=dtype)
    return (m1, m2, n1, n2), x, w, b, u, v, s, dy


def _contenders(factors, w, b, u, v, s, with_base):
    m1, m2, n1, n2 = factors

    def base_out(x):
        return F.linear(x, w, b) if with_base else 0

    def materialize(x):
        delta = sum(s[t] * torch.kron(u[t], v[t]) for t in range(u.shape[0]))  # as PEFT LoKr's make_kron
        return base_out(x) + F.linear(x, delta)

    def einsum(x):
        y = torch.einsum("tab,mbc,tdc,t->mad", u, x.view(-1, n1, n2), v, s)
        return base_out(x) + y.reshape(x.shape[0], m1 * m2)

    def lrk_op(x):
        return kron_linear(x, u, v, s, w if with_base else None, b if with_base else None)

    out = {}
    if with_base:
        out["base"] = (lambda x: F.linear(x, w, b), False)
    out.update({"materialize": (materialize, True), "einsum": (einsum, True), "lrk": (lrk_op, True)})
    return out


def run_kron_case(M, N, K, terms, device, dtype, backward, with_base, profile_dir=None):
    gen = torch.Generator().manual_seed(0)
    factors, x, w, b, u, v, s, dy = _inputs(M, N, K, terms, device, dtype, gen)
    m1, m2, n1, n2 = factors
    adapter_flops = 2.0 * M * terms * (n1 * n2 * m2 + m1 * n1 * m2)
    base_flops = 2.0 * M * N * K if with_base else 0.0
    mult = 3.0 if backward else 1.0  # backward: about two more products of each kind
    io_bytes = dtype.itemsize * ((M * K + M * N) * (3 if backward else 1) + (N * K if with_base else 0))  # x, y, (dy, dx), W
    case = f"{M}x{N}x{K} ({m1}x{n1})⊗({m2}x{n2}) k{terms}" + ("" if with_base else " ad")
    results = []
    for name, (fn, adapter) in _contenders(factors, w, b, u, v, s, with_base).items():
        params = [x, u, v, s] if adapter else [x]

        def call(fn=fn):
            y = fn(x)
            if backward:
                y.backward(dy)
            return y

        try:
            call()  # warm up
            ms = time_ms(call, device, grad_to_none=params)
            mem = peak_mib(call, device)
            note = ""
            if profile_dir and name == "lrk":
                write_profile(profile_dir, f"kron {'fwd+bwd' if backward else 'fwd'} {case} {name}", call, device)
        except Exception as exc:  # report and keep going (e.g. out of memory)
            ms, mem, note = None, None, f"failed: {type(exc).__name__}: {str(exc)[:60]}"
        flops = mult * ((adapter_flops if adapter else 0.0) + base_flops)
        results.append(Result(case=case, contender=name, ms=ms, tflops=flops / ms / 1e9 if ms and flops else None,
                              gbps=io_bytes / ms / 1e6 if ms else None, peak_mib=mem, note=note))
    set_ratios(results)
    with torch.no_grad():  # lrk's output against float64
        y = kron_linear(x, u, v, s, w if with_base else None, b if with_base else None).double()
        y_ref = x.double() @ kron_dense(u.double(), v.double(), s.double()).t()
        if with_base:
            y_ref += x.double() @ w.double().t() + b.double()
        err = ((y - y_ref).norm() / y_ref.norm()).item()
    for r in results:
        if r.contender == "lrk":
            r.rel_err = err
    return results


def run_kpsvd_case(N, K, terms, device, profile_dir=None):
    gen = torch.Generator().manual_seed(0)
    m1, m2, n1, n2 = choose_factorization(N, K)
    w = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(device)
    R = w.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    s_all = torch.linalg.svdvals(R.double())
    optimum = s_all[terms:].square().sum().sqrt().item()
    case = f"{N}x{K} ({m1}x{n1})⊗({m2}x{n2}) k{terms}"

    def err_of(sigma, u, v):
        approx = kron_dense(u.double(), v.double(), sigma.double())
        return ((w.double() - approx).norm().item() - optimum) / optimum

    def svd():
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        return S[:terms], U[:, :terms].t().reshape(terms, m1, n1), Vh[:terms].reshape(terms, m2, n2)

    def svd_lowrank():
        U, S, V = torch.svd_lowrank(R, q=terms + 20, niter=8)
        return S[:terms], U[:, :terms].t().reshape(terms, m1, n1), V[:, :terms].t().reshape(terms, m2, n2)

    contenders = {
        "svd": svd,
        "svd_lowrank": svd_lowrank,
        "lrk exact": lambda: tuple(lrk.kron_ops.kpsvd(w, (m1, m2, n1, n2), terms, method="exact")),
        "lrk randomized": lambda: tuple(lrk.kron_ops.kpsvd(w, (m1, m2, n1, n2), terms, method="randomized")),
    }
    results = []
    for name, fn in contenders.items():
        try:
            out = fn()
            ms = time_ms(fn, device, warmup_ms=5, rep_ms=50)
            if profile_dir and name == "lrk randomized":
                write_profile(profile_dir, f"kpsvd {case} {name}", fn, device, steps=1)
            results.append(Result(case=case, contender=name, ms=ms, rel_err=err_of(*out)))
        except Exception as exc:
            results.append(Result(case=case, contender=name, ms=None, note=f"failed: {type(exc).__name__}"))
    set_ratios(results)
    return results


# The targets (H200, bf16, M = 8192, 4096 x 4096 as 64x64 ⊗ 64x64, 4 terms; kpsvd of
# a 4096 x 4096 float32 weight with 16 terms). Verdicts are printed only for that case.
TARGET_FWD_MS = 0.10          # adapter-only forward
TARGET_FWD_BWD_OVER_FWD = 3.0  # forward+backward / lrk's forward
TARGET_KPSVD_MS = 20.0
TARGET_KPSVD_REL_ERR = 1e-3


def _find(results, contender):
    return next((r for r in results if r.contender == contender), None)


def _ms(r):
    return f"{r.ms:.4f} ms" if r is not None and r.ms is not None else "failed"


def _verdict(ok, applies):
    return verdict(ok, applies, "n/a (targets are for the H200 bf16 case)")


def print_targets(fwd, fwd_bwd, kp, device, dtype, kron_case, kp_case):
    """The issue's targets table, filled with this run's figures for its first case of each
    kind (adapter only). On another device, dtype or shape the rows are printed as measured,
    without a verdict."""
    gpu = device_name(device)
    applies_kron = "H200" in gpu and dtype == torch.bfloat16 and kron_case == GPU_CASES[0]
    applies_kp = "H200" in gpu and kp_case == GPU_KPSVD[0]
    M, N, K, terms = kron_case
    print(f"\n## Targets ({gpu}; kron_linear {M}x{N}x{K}, {terms} terms, {dtype}, adapter only; "
          f"kpsvd {kp_case[0]}x{kp_case[1]}, {kp_case[2]} terms, float32)")
    mat, ein, lrk_f = _find(fwd, "materialize"), _find(fwd, "einsum"), _find(fwd, "lrk")
    lrk_fb = _find(fwd_bwd, "lrk")
    f_ok = lrk_f is not None and lrk_f.ms is not None and lrk_f.ms <= TARGET_FWD_MS
    print(f"forward          today: materialize {_ms(mat)}, einsum {_ms(ein)}   lrk: {_ms(lrk_f)}   "
          f"target <= {TARGET_FWD_MS} ms: {_verdict(f_ok, applies_kron)}")
    ratio = lrk_fb.ms / lrk_f.ms if lrk_fb is not None and lrk_fb.ms and lrk_f is not None and lrk_f.ms else None
    ratio_s = f" = {ratio:.2f}x lrk's forward" if ratio is not None else ""
    fb_ok = ratio is not None and ratio <= TARGET_FWD_BWD_OVER_FWD
    print(f"forward+backward today: materialize {_ms(_find(fwd_bwd, 'materialize'))}, einsum "
          f"{_ms(_find(fwd_bwd, 'einsum'))}   lrk: {_ms(lrk_fb)}{ratio_s}   "
          f"target <= {TARGET_FWD_BWD_OVER_FWD:g}x: {_verdict(fb_ok, applies_kron)}")
    svd, rnd = _find(kp, "svd"), _find(kp, "lrk randomized")
    err = rnd.rel_err if rnd is not None else None
    err_s = f", rel err {err:.2e}" if err is not None else ""
    kp_ok = rnd is not None and rnd.ms is not None and rnd.ms <= TARGET_KPSVD_MS and err is not None \
        and err <= TARGET_KPSVD_REL_ERR
    print(f"kpsvd            today: linalg.svd {_ms(svd)}   lrk randomized: {_ms(rnd)}{err_s}   "
          f"target <= {TARGET_KPSVD_MS:g} ms, rel err <= {TARGET_KPSVD_REL_ERR:g}: {_verdict(kp_ok, applies_kp)}")


def main(argv=None):
    args, device, dtype = parse_bench_args(__doc__, argv, quick_help="first case of each table only",
                                           with_profile=True)
    keep = 1 if args.quick else None
    cases = pick_cases(device, GPU_CASES, CPU_CASES, keep)
    kp_cases = pick_cases(device, GPU_KPSVD, CPU_KPSVD, keep)
    tables = []
    first_case = {}  # (backward, with_base) -> results of cases[0]
    progress = Progress("bench_kron", 4 * len(cases) + len(kp_cases))
    for backward in (False, True):
        for with_base in (False, True):
            res = []
            stage = ("fwd+bwd" if backward else "fwd") + (" with base" if with_base else "")
            for i, (M, N, K, terms) in enumerate(progress.over(cases, f"kron_linear {stage}")):
                case_res = run_kron_case(M, N, K, terms, device, dtype, backward, with_base,
                                         profile_dir=args.profile if i == 0 else None)
                if i == 0:
                    first_case[backward, with_base] = case_res
                res += case_res
            what = ("forward+backward" if backward else "forward") + (", with base" if with_base else ", adapter only")
            tables.append((f"kron_linear {what}, {dtype}, {device.type}", res))
    res = []
    first_kp = None
    for N, K, terms in progress.over(kp_cases, "kpsvd"):
        case_res = run_kpsvd_case(N, K, terms, device, profile_dir=args.profile if first_kp is None else None)
        first_kp = first_kp if first_kp is not None else case_res
        res += case_res
    tables.append((f"kpsvd, float32, {device.type} (rel err = excess over the exact optimum)", res))
    everything = []
    for title, res in tables:
        print_table(title, res)
        everything += res
    print_targets(first_case[False, False], first_case[True, False], first_kp, device, dtype, cases[0], kp_cases[0])
    if args.json:
        write_json(args.json, "kron_linear and kpsvd", environment(device), everything)
    return everything


if __name__ == "__main__":
    main()
