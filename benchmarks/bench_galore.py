"""GaLore family: projector refresh, optimizer step and optimizer-state memory.

Three tables from one run, on each case (m, n, rank):

refresh   time to compute the projector from a low-rank-plus-noise gradient
          (rank-r signal with random singular vectors, geometric spectrum, plus
          Gaussian noise), and its captured energy ||P^T G||^2 / ||G||^2 relative
          to the exact SVD's at the same rank ("energy" column; the random
          and int4 projectors' ranges are orthonormalised first, since P itself is not).
          Contenders: torch.linalg.svd (galore-torch's refresh), torch.svd_lowrank,
          an eager DCT selection (dense basis built once, one GEMM, topk),
          lrk svd / rsvd (q = 1, 2) / dct / random, and int4 storage of an rsvd P.
step      one optimizer step on the [m, n] fp32 parameter: torch.optim.AdamW on
          the full matrix (fused=True on CUDA, foreach on CPU; the baseline),
          galore-torch's eager GaLore step (same projector), and
          torch.ops.lrk.galore_adamw_step with an fp32 projector, an int4 one, with
          TF32 GEMMs (CUDA), with Fira, and on a bf16 parameter. GB/s counts the
          minimum traffic of each (AdamW: 7 x 4 bytes per element; GaLore: G read,
          W read and written, plus the r-sized states).
memory    optimizer-state bytes per parameter, summed over the real state tensors
          after one step (AdamW: exp_avg + exp_avg_sq), against the issue's bound
          (2 r n + m r) x 4 bytes (n: the unprojected dim, m: the projected one).
          The DCT basis is shared by every parameter of the same size (noted).
targets   the issue's target table (H200, fp32, r = 128) filled from this run:
          "today" (torch.linalg.svd, torch.svd_lowrank, eager DCT, fused AdamW,
          eager GaLore, AdamW state), lrk's figure, the target and met / MISSED.
          Time targets apply to CUDA runs of 4096x4096 and 4096x11008 only; the
          energy and memory targets are checked on every case and device.

    python -m benchmarks.bench_galore [--device cuda] [--json out.json] [--quick]
"""
from __future__ import annotations

import math

import torch

import lrk
import lrk.galore_ops as go
import lrk.reference_galore as ref
from benchmarks.harness import (Progress, Result, environment, parse_bench_args, pick_cases, print_table, print_targets, time_ms,
                               verdict, write_json, write_profile)
from lrk.optim import GaLoreAdamW

GPU_CASES = [(4096, 4096, 128), (4096, 11008, 128), (4096, 4096, 512), (4096, 11008, 512)]
CPU_CASES = [(512, 512, 32), (512, 1376, 32), (1024, 1024, 64)]


def low_rank_plus_noise(m, n, r, device, noise=0.1, seed=0):
    """Rank-r signal (random orthonormal factors, spectrum 1 .. 0.01) plus noise
    whose energy is ~noise^2 of the signal's."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=gen))[0]
    s = torch.logspace(0, -2, r)
    signal = (u * s) @ v.t()
    g = signal + noise * signal.norm() / math.sqrt(m * n) * torch.randn(m, n, generator=gen)
    return g.to(device)


def captured(g, p, left):
    r = p.t() @ g if left else g @ p
    return (r.square().sum() / g.square().sum()).item()


PROFILED = ("lrk rsvd q1", "lrk dct", "lrk step fp32 P")  # with --profile


def refresh_table(m, n, rank, device, reps_ms, profile_dir=None):
    case = f"{m}x{n} r{rank}"
    g = low_rank_plus_noise(m, n, rank, device)
    left = go.projects_left(g.shape)
    exact = go.svd_projector(g, rank, left)
    e_exact = captured(g, exact, left)

    def orth(p):
        return torch.linalg.qr(p)[0]

    # galore-torch-style eager DCT: the dense orthonormal basis is built once
    # (outside the timing), then one GEMM, squared column norms and topk.
    basis = ref.dct_basis(m if left else n, torch.float32, device)

    def eager_dct():
        scores = (basis.t() @ g).square().sum(1) if left else (g @ basis).square().sum(0)
        return torch.topk(scores, rank).indices

    contenders = {
        "torch.linalg.svd": (lambda: torch.linalg.svd(g, full_matrices=False), None),
        "torch.svd_lowrank q2": (lambda: torch.svd_lowrank(g, q=rank + 8, niter=2),
                                 lambda out: out[0][:, :rank] if left else out[2][:, :rank]),
        "eager DCT": (eager_dct, lambda idx: basis[:, idx]),
        "lrk svd": (lambda: go.svd_projector(g, rank, left), lambda p: p),
        "lrk rsvd q1": (lambda: go.rsvd_projector(g, rank, left, 8, 1, 0), lambda p: p),
        "lrk rsvd q2": (lambda: go.rsvd_projector(g, rank, left, 8, 2, 0), lambda p: p),
        "lrk dct": (lambda: go.dct_select(g, rank, left),
                    lambda idx: go.dct_basis(idx, m if left else n)),
        "lrk random": (lambda: go.random_projector(g, rank, left, 0), orth),
        "lrk rsvd q1 + int4": (lambda: go.quantize_int4(go.rsvd_projector(g, rank, left, 8, 1, 0), 256),
                               lambda q: orth(go.dequantize_int4(*q, m if left else n, 256))),
    }
    results = []
    for name, (fn, to_proj) in contenders.items():
        out = fn()
        ms = time_ms(fn, device, warmup_ms=reps_ms / 4, rep_ms=reps_ms)
        if profile_dir and name in PROFILED:
            write_profile(profile_dir, f"galore refresh {case} {name}", fn, device)
        energy = captured(g, to_proj(out), left) / e_exact if to_proj else 1.0
        results.append(Result(case=case, contender=name, ms=ms, note=f"energy {energy:.4f}",
                              extra={"energy_vs_svd": energy, "exact_energy": e_exact}))
    base = results[0].ms
    for res in results:
        res.ratio = res.ms / base if res.ms and base else None
    return results


def step_table(m, n, rank, device, profile_dir=None):
    case = f"{m}x{n} r{rank}"
    gen = torch.Generator(device="cpu").manual_seed(1)
    left = go.projects_left((m, n))
    w0 = (torch.randn(m, n, generator=gen) / math.sqrt(n)).to(device)
    g = (torch.randn(m, n, generator=gen) * 1e-3).to(device)
    p = go.rsvd_projector(low_rank_plus_noise(m, n, rank, device), rank, left, 8, 1, 0)
    low = (rank, n) if left else (m, rank)
    lr, b1, b2, eps, wd, scale = 1e-3, 0.9, 0.999, 1e-6, 0.01, 0.25
    results = []

    # Baseline: PyTorch AdamW on the full matrix.
    w_full = torch.nn.Parameter(w0.clone())
    w_full.grad = g.clone()
    kind = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    adamw = torch.optim.AdamW([w_full], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, **kind)
    adamw.step()
    ms = time_ms(adamw.step, device)
    results.append(Result(case=case, contender=f"torch AdamW {'fused' if device.type == 'cuda' else 'foreach'}",
                          ms=ms, gbps=7 * 4 * m * n / ms / 1e6))

    # galore-torch's eager step, with the same projector.
    state = dict(w=w0.clone(), m=torch.zeros(low, device=device), v=torch.zeros(low, device=device), t=0)

    def eager():
        state["t"] += 1
        t = state["t"]
        r = p.t() @ g if left else g @ p
        state["m"].mul_(b1).add_(r, alpha=1 - b1)
        state["v"].mul_(b2).addcmul_(r, r, value=1 - b2)
        denom = state["v"].sqrt().add_(eps)
        n_mat = state["m"] / denom
        step_size = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        back = (p @ n_mat if left else n_mat @ p.t()) * scale
        state["w"].add_(back, alpha=-step_size)
        state["w"].add_(state["w"], alpha=-lr * wd)

    low_bytes = 4 * (4 * low[0] * low[1] + p.numel())
    galore_bytes = 3 * 4 * m * n + low_bytes
    ms = time_ms(eager, device)
    results.append(Result(case=case, contender="galore-torch eager", ms=ms, gbps=galore_bytes / ms / 1e6))

    g_bf16 = g.to(torch.bfloat16)

    def lrk_step(w, proj, **kw):
        mm, vv = torch.zeros(low, device=device), torch.zeros(low, device=device)
        t = [0]

        def fn():
            t[0] += 1
            go.galore_adamw_step(w, g if w.dtype == torch.float32 else g_bf16, mm, vv, proj, left=left, step=t[0],
                                 lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, scale=scale, **kw)
        return fn

    packed, scales, zeros = go.quantize_int4(p, 256)
    variants = {
        "lrk step fp32 P": (w0.clone(), p, {}, galore_bytes),
        "lrk step int4 P": (w0.clone(), packed, dict(proj_scales=scales, proj_zeros=zeros, quant_group_size=256),
                            3 * 4 * m * n + low_bytes - 4 * p.numel() + packed.numel() + 5 * scales.numel()),
        "lrk step Fira": (w0.clone(), p, dict(fira=True, fira_prev_norm=torch.full((1,), -1.0, device=device)),
                          galore_bytes),
        "lrk step bf16 W": (w0.to(torch.bfloat16), p, {}, 3 * 2 * m * n + low_bytes),
    }
    for name, (w, proj, kw, nbytes) in variants.items():
        fn = lrk_step(w, proj, **kw)
        fn()
        ms = time_ms(fn, device)
        if profile_dir and name in PROFILED:
            write_profile(profile_dir, f"galore step {case} {name}", fn, device)
        results.append(Result(case=case, contender=name, ms=ms, gbps=nbytes / ms / 1e6))
    if device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            fn = lrk_step(w0.clone(), p)
            fn()
            ms = time_ms(fn, device)
            results.append(Result(case=case, contender="lrk step fp32 P, TF32", ms=ms, gbps=galore_bytes / ms / 1e6))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = old

    # Accuracy of one step from the same start, against a float64 evaluation: the
    # relative error of the weight change W1 - W0 (fp32 GEMMs, TF32 off).
    w64 = w0.double()
    ref_m, ref_v = torch.zeros(low, dtype=torch.float64, device=device), torch.zeros(low, dtype=torch.float64,
                                                                                    device=device)
    ref.adamw_step(w64, g.double(), ref_m, ref_v, p.double(), left, 1, lr, b1, b2, eps, wd, scale)
    delta_ref = w64 - w0.double()

    def delta_err(w1):
        return ((w1.double() - w0.double()) - delta_ref).norm().item() / delta_ref.norm().item()

    w_a = w0.clone()
    go.galore_adamw_step(w_a, g, torch.zeros(low, device=device), torch.zeros(low, device=device), p, left=left,
                         step=1, lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, scale=scale)
    state.update(w=w0.clone(), m=torch.zeros(low, device=device), v=torch.zeros(low, device=device), t=0)
    eager()
    errors = {"lrk step fp32 P": delta_err(w_a), "galore-torch eager": delta_err(state["w"])}
    base = results[0].ms
    for res in results:
        res.ratio = res.ms / base if res.ms and base else None
        if res.contender in errors:
            res.rel_err = errors[res.contender]
            res.note = "rel err: W1 - W0 vs float64"
    return results


def memory_table(m, n, rank, device, methods):
    case = f"{m}x{n} r{rank}"
    gen = torch.Generator(device="cpu").manual_seed(2)
    g = (torch.randn(m, n, generator=gen) * 1e-3).to(device)
    results = []
    w = torch.nn.Parameter(torch.zeros(m, n, device=device))
    w.grad = g
    adamw = torch.optim.AdamW([w], lr=1e-3)
    adamw.step()
    nbytes = sum(t.numel() * t.element_size() for t in adamw.state[w].values()
                 if torch.is_tensor(t) and t.numel() > 1)
    results.append(Result(case=case, contender="torch AdamW", ms=None, note=f"{nbytes / 2**20:.2f} MiB",
                          extra={"state_bytes": nbytes}))
    left = go.projects_left((m, n))
    size, other = (m, n) if left else (n, m)
    bound = (2 * rank * other + size * rank) * 4
    for name, settings in methods.items():
        w = torch.nn.Parameter(torch.zeros(m, n, device=device))
        w.grad = g
        opt = GaLoreAdamW([{"params": [w], "rank": rank, **settings}], lr=1e-3)
        opt.step()
        state = opt.state[w]
        nbytes = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        extra = {"state_bytes": nbytes, "bound_bytes": bound}
        note = f"{nbytes / 2**20:.2f} MiB (bound {bound / 2**20:.2f})"
        if "proj_packed" in state:
            codes = state["proj_packed"].numel()
            side = sum(state[k].numel() * state[k].element_size() for k in ("proj_scales", "proj_zeros"))
            extra.update(proj_code_bytes=codes, proj_side_bytes=side, proj_bound_bytes=size * rank // 2)
            note += f", int4 P {codes / 2**10:.1f} KiB codes + {side / 2**10:.1f} KiB scales/zeros"
        if settings.get("proj_type") == "dct":
            note += f", + shared {size}x{size} basis {size * size * 4 / 2**20:.0f} MiB per size"
        results.append(Result(case=case, contender=f"GaLore {name}", ms=None, note=note, extra=extra))
    return results


# The targets (H200, fp32 gradients, r = 128): refresh and step times in ms.
TIME_TARGETS = {(4096, 4096): dict(rsvd=3.0, dct=1.5, step=0.08), (4096, 11008): dict(rsvd=5.0, dct=3.0, step=0.22)}
ENERGY_TARGET = 0.97


def targets_table(cases, refresh, steps, memory, device):
    """One row per target of the issue's table, filled from this run's results."""
    by = {(r.case, r.contender): r for r in refresh + steps + memory}
    rows = []
    na = "n/a (H200, r=128 only)"

    def row(case, what, today, lrk_text, target, status, value=None):
        rows.append(Result(case=case, contender=what, ms=value, note=status,
                           extra={"today": today, "lrk": lrk_text, "target": target, "status": status}))

    for m, n, rank in cases:
        case = f"{m}x{n} r{rank}"
        timed = TIME_TARGETS.get((m, n)) if device.type == "cuda" and rank == 128 else None

        def ms(name):
            return by[(case, name)].ms

        today = (f"svd {ms('torch.linalg.svd'):.2f} ms, svd_lowrank {ms('torch.svd_lowrank q2'):.2f} ms, "
                 f"eager DCT {ms('eager DCT'):.2f} ms")
        for method, name in (("rsvd", "lrk rsvd q1"), ("dct", "lrk dct")):
            t = ms(name)
            row(case, f"refresh {method}", today, f"{t:.3f} ms", f"<= {timed[method]} ms" if timed else na,
                verdict(t <= timed[method]) if timed else na, t)
        energy = by[(case, "lrk rsvd q1")].extra["energy_vs_svd"]
        row(case, "energy rsvd/svd", "svd 1.0", f"{energy:.4f}", f">= {ENERGY_TARGET}", verdict(energy >= ENERGY_TARGET))

        case_steps = [r for r in steps if r.case == case]
        adamw_ms = case_steps[0].ms  # the baseline row
        best = min((r for r in case_steps if r.contender.startswith("lrk step fp32 P")), key=lambda r: r.ms)
        row(case, "step", f"{case_steps[0].contender} {adamw_ms:.4f} ms, eager GaLore "
            f"{ms('galore-torch eager'):.4f} ms", f"{best.ms:.4f} ms ({best.contender[9:]})",
            f"<= {timed['step']} ms" if timed else na, verdict(best.ms <= timed["step"]) if timed else na, best.ms)

        adamw = by[(case, "torch AdamW")].extra["state_bytes"]
        st = by[(case, "GaLore svd/rsvd")].extra
        row(case, "state", f"AdamW {adamw / 2**20:.2f} MiB", f"{st['state_bytes'] / 2**20:.2f} MiB",
            f"<= {st['bound_bytes'] / 2**20:.2f} MiB", verdict(st["state_bytes"] <= st["bound_bytes"]))
        q = by[(case, "GaLore svd/rsvd int4")].extra
        row(case, "int4 P", f"fp32 P {8 * q['proj_bound_bytes'] / 2**10:.1f} KiB",
            f"{q['proj_code_bytes'] / 2**10:.1f} KiB + {q['proj_side_bytes'] / 2**10:.1f} KiB scales/zeros",
            f"m r / 2 = {q['proj_bound_bytes'] / 2**10:.1f} KiB", verdict(q["proj_code_bytes"] <= q["proj_bound_bytes"]))
    return rows


def main(argv=None):
    args, device, _ = parse_bench_args(__doc__, argv, quick_help="first case only", with_dtype=False,
                                     with_profile=True)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs unless a row says TF32
    cases = pick_cases(device, GPU_CASES, CPU_CASES, 1 if args.quick else None)
    refresh, steps, memory = [], [], []
    methods = {"svd/rsvd": dict(proj_type="rsvd"), "svd/rsvd int4": dict(proj_type="rsvd", proj_bits=4),
               "dct": dict(proj_type="dct"), "random": dict(proj_type="random")}
    progress = Progress("bench_galore", len(cases))
    for m, n, rank in progress.over(cases, label=lambda c: f"{c[0]}x{c[1]} r{c[2]}"):
        refresh += refresh_table(m, n, rank, device, reps_ms=200 if device.type == "cuda" else 300,
                                 profile_dir=args.profile)
        steps += step_table(m, n, rank, device, profile_dir=args.profile)
        memory += memory_table(m, n, rank, device, methods)
    print_table(f"GaLore projector refresh, fp32, {device.type} (ratio vs torch.linalg.svd)", refresh)
    print_table(f"GaLore optimizer step, fp32 parameter, {device.type} (ratio vs torch AdamW)", steps)
    print_table(f"optimizer state per parameter, {device.type}", memory)
    targets = targets_table(cases, refresh, steps, memory, device)
    print_targets(f"issue targets (H200, fp32, r=128) from this run, {device.type}",
                  [(f"{r.case} {r.contender}", r.extra["today"], r.extra["lrk"], r.extra["target"], r.extra["status"])
                   for r in targets])
    if args.json:
        write_json(args.json, f"galore, {device.type}", environment(device), refresh + steps + memory + targets)
    return refresh + steps + memory + targets


if __name__ == "__main__":
    main()
