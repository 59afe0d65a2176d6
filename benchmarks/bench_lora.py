"""Fused LoRA training step (forward + backward) against what users run today.

Contenders, timed in one run on the same inputs (x requires grad, W frozen,
A and B trainable):
  base      the frozen nn.Linear alone (the floor LoRA is measured against)
  eager     F.linear(x, W, b) + s * F.linear(F.linear(dropout(x), A), B)
  compile   torch.compile of eager
  peft      PEFT's LoRA Linear layer (when peft is installed)
  lrk       torch.ops.lrk.lora_fused (torch.ops.lrk.dora_fused for DoRA cases); on
            Hopper with the opt-in sm90 kernels (LRK_SM90=1) unless the
            environment sets LRK_SM90=0
  lrk portable  the same op on the portable kernels (LRK_SM90=0), CUDA only

DoRA cases (use_dora) time the same contenders with the weight-decomposed
adapter: g = m / ||W + s B A|| (detached) scales the adapted output.

    python -m benchmarks.bench_lora [--device cuda] [--json out.json] [--profile DIR]
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F

import lrk
from benchmarks.harness import (Progress, Result, device_name, parse_bench_args, peak_mib, pick_cases, print_table, print_targets,
                               report, set_ratios, time_ms, verdict, write_profile)

GPU_CASES = [  # (M, K, N, r, dropout, use_dora)
    (8192, 4096, 4096, 16, 0.0, False),
    (8192, 4096, 4096, 64, 0.0, False),
    (8192, 4096, 11008, 16, 0.0, False),
    (2048, 4096, 4096, 16, 0.0, False),
    (8192, 4096, 4096, 16, 0.1, False),
    (8192, 4096, 4096, 16, 0.0, True),
    (64, 256, 256, 16, 0.0, False),  # launch-bound: the per-step host overhead of each contender
]
# The targets (H200, bf16): forward+backward ratio to the frozen base layer.
# case -> (PEFT today, LoRAFusion, lrk target)
TARGETS = {
    (8192, 4096, 4096, 16, 0.0, False): ("1.36", "1.19", 1.08),
    (8192, 4096, 4096, 64, 0.0, False): ("1.33", "1.30", 1.10),
    (8192, 4096, 11008, 16, 0.0, False): ("1.23", "1.12", 1.06),
    (2048, 4096, 4096, 16, 0.0, False): ("2.62", "4.92", 1.20),
    (8192, 4096, 4096, 16, 0.1, False): ("1.45", "1.45", 1.10),
    (8192, 4096, 4096, 16, 0.0, True): ("2.30", "none", 1.15),
}
CPU_CASES = [
    (512, 512, 512, 16, 0.0, False),
    (256, 1024, 768, 8, 0.0, False),
    (512, 512, 512, 16, 0.1, False),
    (512, 512, 512, 16, 0.0, True),
    (8, 64, 64, 4, 0.0, False),  # tiny: the per-step host overhead of each contender
]


def _peft_layer(base: torch.nn.Linear, r: int, alpha: float, p: float, use_dora: bool = False):
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear, LoraConfig
    except Exception:
        return None
    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=p, use_dora=use_dora)
    try:  # peft >= 0.18 takes the config object
        return PeftLoraLinear(base, "default", config=LoraConfig(**kwargs), r=r, lora_alpha=alpha)
    except TypeError:
        return PeftLoraLinear(base, "default", **kwargs)


PROFILED = ("base", "lrk", "lrk portable")  # with --profile


def run_case(M, K, N, r, p, use_dora, device, dtype, check=True, profile_dir=None):
    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2.0 * r
    scale = alpha / r
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    base = torch.nn.Linear(K, N, bias=True, device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    a = (torch.randn(r, K, generator=gen) / math.sqrt(K)).to(device=device, dtype=dtype).requires_grad_()
    b = (torch.randn(N, r, generator=gen) / math.sqrt(r)).to(device=device, dtype=dtype).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(device=device, dtype=dtype)
    w, bias = base.weight, base.bias
    # DoRA magnitude: PEFT initialises it to the row norms of W (perturbed here so g != 1).
    m = (torch.linalg.vector_norm(w.float(), dim=1) * (1 + 0.1 * torch.rand(N, generator=gen).to(device))).to(
        dtype).requires_grad_()
    w_sq_norm = torch.linalg.vector_norm(w.float(), dim=1).square()  # cached once for a frozen W
    adapter_params = [a, b, m] if use_dora else [a, b]
    step = [0]

    def eager(x):
        xd = F.dropout(x, p) if p > 0 else x
        lora = scale * F.linear(F.linear(xd, a), b)
        if not use_dora:
            return F.linear(x, w, bias) + lora
        g = m / torch.linalg.vector_norm(w + scale * (b @ a), dim=1).detach()
        return g * (F.linear(x, w) + lora) + bias

    compiled = torch.compile(eager)

    def lrk_fwd(x):
        step[0] += 1  # a fresh dropout seed per step, as a training loop does
        if use_dora:
            return lrk.dora_fused(x, w, bias, a, b, m, scale, p, step[0], w_sq_norm)
        return lrk.lora_fused(x, w, bias, a, b, scale, p, step[0])

    contenders = {
        "base": (lambda x: F.linear(x, w, bias), [x]),
        "eager": (eager, [x] + adapter_params),
        "compile": (compiled, [x] + adapter_params),
    }
    peft_layer = _peft_layer(base, r, alpha, p, use_dora)
    if peft_layer is not None:
        peft_layer.lora_A["default"].weight.data.copy_(a.detach())
        peft_layer.lora_B["default"].weight.data.copy_(b.detach())
        peft_params = [x, peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight]
        if use_dora:
            peft_layer.lora_magnitude_vector["default"].weight.data.copy_(m.detach())
            peft_params.append(peft_layer.lora_magnitude_vector["default"].weight)
        contenders["peft"] = (peft_layer, peft_params)
    contenders["lrk"] = (lrk_fwd, [x] + adapter_params)
    path_env = {}  # contender -> environment it runs under
    if device == "cuda":
        # The targets are about the Hopper kernels, opt-in in the library
        # until validated: "lrk" opts in unless the caller has switched them off.
        path_env["lrk"] = {"LRK_SM90": os.environ.get("LRK_SM90", "1")}
        contenders["lrk portable"] = (lrk_fwd, [x] + adapter_params)  # same as "lrk" off Hopper
        path_env["lrk portable"] = {"LRK_SM90": "0"}

    case = f"{M}x{K}x{N} r{r}" + (f" p{p}" if p else "") + (" dora" if use_dora else "")
    flops_base = 4.0 * M * N * K
    flops_lora = flops_base + 6.0 * M * r * (K + N)
    nbytes = dtype.itemsize * (2 * M * K + N * K + 2 * M * N)  # x, dx, W, y, dy once each
    results = []
    for name, (fn, params) in contenders.items():
        def fwd_bwd(fn=fn):
            fn(x).backward(dy)
        try:
            with _environment(path_env.get(name, {})):
                fwd_bwd()  # compile / warm
                ms = time_ms(fwd_bwd, device, grad_to_none=params)
                mem = peak_mib(fwd_bwd, device)
                if profile_dir and name in PROFILED:
                    write_profile(profile_dir, f"{case} {name}", fwd_bwd, device)
            note = ""
        except Exception as exc:  # report, keep going
            ms, mem, note = None, None, f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        flops = flops_base if name == "base" else flops_lora
        results.append(Result(case=case, contender=name, ms=ms,
                              tflops=flops / ms / 1e9 if ms else None, gbps=nbytes / ms / 1e6 if ms else None,
                              peak_mib=mem, note=note))
    if peft_layer is None:
        results.append(Result(case=case, contender="peft", ms=None, note="peft not installed"))
    set_ratios(results)
    if check:  # the "lrk" row's error, on the path its time was measured on
        with _environment(path_env.get("lrk", {})):
            _check_against_reference(results, x, w, bias, a, b, m if use_dora else None, scale)
    return results


@contextlib.contextmanager
def _environment(variables: dict):
    """Sets the given environment variables for the block, then restores them."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_against_reference(results, x, w, bias, a, b, m, scale):
    """Relative error of lrk's output (dropout off) vs a float64 evaluation of the same math."""
    with torch.no_grad():
        args64 = [t.double() for t in (x, w, bias, a, b)]
        if m is None:
            y = lrk.lora_fused(x, w, bias, a, b, scale).double()
            y_ref = lrk.reference.lora_fused(*args64, scale)
        else:
            y = lrk.dora_fused(x, w, bias, a, b, m, scale).double()
            y_ref = lrk.reference.dora_fused(*args64, m.double(), scale)
        err = ((y - y_ref).norm() / y_ref.norm()).item()
    for res in results:
        if res.contender == "lrk":
            res.rel_err = err


def main(argv=None):
    args, device, dtype = parse_bench_args(__doc__, argv, quick_help="first case only", with_profile=True)
    cases = pick_cases(device, GPU_CASES, CPU_CASES, 1 if args.quick else None)
    results = []
    title = f"LoRA / DoRA layer forward+backward, {dtype}, {device.type}"
    progress = Progress("bench_lora", len(cases))
    for i, (M, K, N, r, p, use_dora) in enumerate(progress.over(cases)):
        case_results = run_case(M, K, N, r, p, use_dora, device, dtype, profile_dir=args.profile)
        results += case_results
        if len(cases) > 1:  # each case as it completes: a run cut short by a time limit still reports
            print_table(f"{title}: case {i + 1} of {len(cases)}", case_results)
    report(title, results, device, args.json)
    print_targets_table(cases, results, device, dtype)
    return results


def print_targets_table(cases, results, device, dtype):
    """The issue's table from this run's ratios (a verdict on an H200 in bf16 only)."""
    gpu = device_name(device)
    applies = "H200" in gpu and dtype == torch.bfloat16
    rows = []
    for case in cases:
        if case not in TARGETS:
            continue
        M, K, N, r, p, use_dora = case
        name = f"{M}x{K}x{N} r{r}" + (f" p{p}" if p else "") + (" dora" if use_dora else "")
        ratio = {res.contender: res.ratio for res in results if res.case == name}
        peft_today, fusion_today, target = TARGETS[case]

        def fmt(v):
            return f"{v:.3f}" if v is not None else "-"
        lrk_text = f"{fmt(ratio.get('lrk'))} (portable {fmt(ratio.get('lrk portable'))}, PEFT {fmt(ratio.get('peft'))})"
        ok = ratio.get("lrk") is not None and ratio["lrk"] <= target
        rows.append((name, f"PEFT {peft_today}, LoRAFusion {fusion_today}", lrk_text, f"<= {target}",
                     verdict(ok, applies)))
    if rows:
        print_targets(f"targets: forward+backward / frozen base layer (H200, bf16); this run: {gpu}, {dtype}", rows)


if __name__ == "__main__":
    main()
