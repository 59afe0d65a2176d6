"""GaLore family: projector refresh, optimizer step and optimizer-state memory.

Three tables from one run, on each case (m, n, rank):

refresh   time to compute the projector from a low-rank-plus-noise gradient
          (rank-r signal with random singular vectors, geometric spectrum, plus
          Gaussian noise), and its captured energy ||P^T G||^2 / ||G||^2 relative
          to the exact SVD's at the same rank ("energy" column; the random
          and int4 projectors' ranges are orthonormalised first, since P itself is not).
          Contenders: torch.linalg.svd (galore-torch's refresh), torch.svd_lowrank,
          lrk svd / rsvd (q = 1, 2) / dct / random, and int4 storage of an rsvd P.
step      one optimizer step on the [m, n] fp32 parameter: torch.optim.AdamW on
          the full matrix (fused=True on CUDA, foreach on CPU; the baseline),
          galore-torch's eager GaLore step (same projector), and
          torch.ops.lrk.galore_adamw_step with an fp32 projector, an int4 one, with
          TF32 GEMMs (CUDA), with Fira, and on a bf16 parameter. GB/s counts the
          minimum traffic of each (AdamW: 7 x 4 bytes per element; GaLore: G read,
          W read and written, plus the r-sized states).
memory    optimizer-state bytes per parameter, summed over the real state tensors
          after one step (AdamW: exp_avg + exp_avg_sq).

    python -m benchmarks.bench_galore [--device cuda] [--json out.json] [--quick]
"""
from __future__ import annotations

import math

import torch

import lrk
import lrk.galore_ops as go
import lrk.reference_galore as ref
from benchmarks.harness import Result, environment, parse_bench_args, print_table, time_ms, write_json
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


def refresh_table(m, n, rank, device, reps_ms):
    case = f"{m}x{n} r{rank}"
    g = low_rank_plus_noise(m, n, rank, device)
    left = go.projects_left(g.shape)
    exact = go.svd_projector(g, rank, left)
    e_exact = captured(g, exact, left)

    def orth(p):
        return torch.linalg.qr(p)[0]

    contenders = {
        "torch.linalg.svd": (lambda: torch.linalg.svd(g, full_matrices=False), None),
        "torch.svd_lowrank q2": (lambda: torch.svd_lowrank(g, q=rank + 8, niter=2),
                                 lambda out: out[0][:, :rank] if left else out[2][:, :rank]),
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
        energy = captured(g, to_proj(out), left) / e_exact if to_proj else 1.0
        results.append(Result(case=case, contender=name, ms=ms, note=f"energy {energy:.4f}",
                              extra={"energy_vs_svd": energy, "exact_energy": e_exact}))
    base = results[0].ms
    for res in results:
        res.ratio = res.ms / base if res.ms and base else None
    return results


def step_table(m, n, rank, device):
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
    for name, settings in methods.items():
        w = torch.nn.Parameter(torch.zeros(m, n, device=device))
        w.grad = g
        opt = GaLoreAdamW([{"params": [w], "rank": rank, **settings}], lr=1e-3)
        opt.step()
        nbytes = sum(t.numel() * t.element_size() for t in opt.state[w].values() if torch.is_tensor(t))
        results.append(Result(case=case, contender=f"GaLore {name}", ms=None,
                              note=f"{nbytes / 2**20:.2f} MiB", extra={"state_bytes": nbytes}))
    return results


def main(argv=None):
    args, device, _ = parse_bench_args(__doc__, argv, quick_help="first case only", with_dtype=False)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 GEMMs unless a row says TF32
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    if args.quick:
        cases = cases[:1]
    refresh, steps, memory = [], [], []
    methods = {"svd/rsvd": dict(proj_type="rsvd"), "svd/rsvd int4": dict(proj_type="rsvd", proj_bits=4),
               "dct": dict(proj_type="dct"), "random": dict(proj_type="random")}
    for m, n, rank in cases:
        refresh += refresh_table(m, n, rank, device, reps_ms=200 if device.type == "cuda" else 300)
        steps += step_table(m, n, rank, device)
        memory += memory_table(m, n, rank, device, methods)
    print_table(f"GaLore projector refresh, fp32, {device.type} (ratio vs torch.linalg.svd)", refresh)
    print_table(f"GaLore optimizer step, fp32 parameter, {device.type} (ratio vs torch AdamW)", steps)
    print_table(f"optimizer state per parameter, {device.type}", memory)
    if args.json:
        write_json(args.json, f"galore, {device.type}", environment(device), refresh + steps + memory)
    return refresh + steps + memory


if __name__ == "__main__":
    main()
