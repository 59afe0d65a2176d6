"""QLoRA / QDoRA layers over a frozen NF4 base (double-quantized absmax, blocksize
64: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)) against what users run today.

Contenders, timed in one run on the same inputs (x requires grad, A and B trainable):
  base        the frozen unquantized nn.Linear in the compute dtype (the floor)
  peft+bnb    PEFT's LoRA layer over bitsandbytes' Linear4bit (when both are installed)
  deq+matmul  dequantize the whole W (bitsandbytes' dequantize_4bit, else lrk's
              reference), then F.linear + the LoRA branch in eager PyTorch
  lrk         lrk.qlora_fused / lrk.qdora_fused on the same 4-bit storage
  lrk peft    the peft+bnb layer after lrk.integrations.peft.accelerate

Forward+backward (training step) ratios to the base layer, peak memory (CUDA), and
the forward alone (no grad) at small M (8..128 tokens: decoding, where reading the
4-bit weight instead of a dequantized copy matters most). On the CPU everything
runs in float32 (bf16 matmuls there measure the CPU's bf16 emulation, not the
layer) and the targets are reported without a verdict.

    python -m benchmarks.bench_qlora [--device cuda] [--json out.json] [--quick]
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import lrk
from benchmarks.harness import (Result, device_name, parse_bench_args, peak_mib, pick_cases, print_table, print_targets,
                               report, set_ratios, time_ms, verdict)

GPU_TRAIN_CASES = [  # (M, K, N, r, use_dora)
    (8192, 4096, 4096, 16, False),
    (8192, 4096, 11008, 16, False),
    (2048, 4096, 4096, 16, False),
    (8192, 4096, 4096, 16, True),
]
CPU_TRAIN_CASES = [
    (512, 1024, 1024, 16, False),
    (512, 1024, 1024, 16, True),
]
GPU_FORWARD_CASES = [(m, 4096, 4096, 16) for m in (8, 16, 32, 128)]
CPU_FORWARD_CASES = [(m, 1024, 1024, 16) for m in (8, 16, 32, 128)]
# Targets on a GPU (bf16), ratios to the unquantized base layer of the same run:
# a QLoRA training step <= 1.15x and faster than PEFT + bitsandbytes; QDoRA <= 1.25x;
# the forward alone at M = 16 and 128 tokens <= 0.5x (a quarter of the weight's
# bytes); the step's peak memory below the base layer's plus a full bf16 copy of W.
QLORA_TRAIN_TARGET = 1.15
QDORA_TRAIN_TARGET = 1.25
SMALL_M_FORWARD_TARGET = 0.5
SMALL_M_TARGET_TOKENS = (16, 128)


def _bnb():
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnb_f
        return bnb, bnb_f
    except Exception:
        return None, None


def _quantized(w: torch.Tensor, device, dtype):
    """(bitsandbytes Linear4bit or None, lrk.Weight4bit on the same storage)."""
    bnb, _ = _bnb()
    if bnb is None:
        return None, lrk.quantize_4bit(w.float(), "nf4", 64, double_quant=True)
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=True, compute_dtype=dtype, compress_statistics=True,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(w.detach().to(dtype).cpu(), requires_grad=False, compress_statistics=True,
                                     quant_type="nf4", blocksize=64)
    layer = layer.to(device)  # bitsandbytes quantizes on the move
    return layer, lrk.Weight4bit.from_bnb(layer.weight.data, layer.weight.quant_state)


def _peft_layer(base4, r, alpha, use_dora):
    if base4 is None:
        return None
    try:
        from peft.tuners.lora import LoraConfig
        from peft.tuners.lora import Linear as PeftLoraLinear
    except Exception:
        return None
    kwargs = dict(r=r, lora_alpha=alpha, lora_dropout=0.0, use_dora=use_dora)
    try:
        return PeftLoraLinear(base4, "default", config=LoraConfig(**kwargs), r=r, lora_alpha=alpha)
    except TypeError:
        return PeftLoraLinear(base4, "default", **kwargs)


def _peft_with_adapter(s, r, use_dora):
    """(PEFT layer over the case's bitsandbytes base with the case's adapter, its parameters) or None."""
    peft = _peft_layer(s["base4"], r, s["alpha"], use_dora)
    if peft is None:
        return None
    peft.lora_A["default"].weight.data.copy_(s["a"].detach())
    peft.lora_B["default"].weight.data.copy_(s["b"].detach())
    params = [peft.lora_A["default"].weight, peft.lora_B["default"].weight]
    if use_dora:
        peft.lora_magnitude_vector["default"].weight.data.copy_(s["m"].detach())
        params.append(peft.lora_magnitude_vector["default"].weight)
    return peft, params


def _dequantize(weight: lrk.Weight4bit, base4, dtype):
    _, bnb_f = _bnb()
    if base4 is not None:
        return bnb_f.dequantize_4bit(base4.weight.data, base4.weight.quant_state).to(dtype)
    return weight.dequantize(dtype)


def _setup(M, K, N, r, use_dora, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    alpha = 2.0 * r
    scale = alpha / r
    w = (torch.randn(N, K, generator=gen) / math.sqrt(K)).to(device=device, dtype=dtype)
    bias = (torch.randn(N, generator=gen) * 0.1).to(device=device, dtype=dtype)
    base4, weight = _quantized(w, device, dtype)
    if base4 is not None:
        base4.bias.data.copy_(bias)
        base4.bias.requires_grad_(False)
    a = (torch.randn(r, K, generator=gen) / math.sqrt(K)).to(device=device, dtype=dtype).requires_grad_()
    b = (torch.randn(N, r, generator=gen) / math.sqrt(r)).to(device=device, dtype=dtype).requires_grad_()
    m = (torch.linalg.vector_norm(w.float(), dim=1) * 1.05).to(dtype).requires_grad_() if use_dora else None
    x = torch.randn(M, K, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return dict(scale=scale, alpha=alpha, w=w, bias=bias, base4=base4, weight=weight, a=a, b=b, m=m, x=x)


def _contenders(s, r, use_dora, dtype):
    """name -> (fn(x), trainable parameters) for one case."""
    w, bias, a, b, m, scale, weight, base4 = (s[k] for k in ("w", "bias", "a", "b", "m", "scale", "weight", "base4"))
    sq_norm = weight.sq_norm() if use_dora else None  # cached once: W is frozen
    adapter = [a, b] + ([m] if use_dora else [])

    def eager_adapter(x, w_full):
        lora = scale * F.linear(F.linear(x, a), b)
        if not use_dora:
            return F.linear(x, w_full, bias) + lora
        g = m / torch.linalg.vector_norm(w_full.float() + scale * (b.float() @ a.float()), dim=1).detach()
        return g.to(x.dtype) * (F.linear(x, w_full) + lora) + bias

    def lrk_layer(x):
        if use_dora:
            return lrk.qdora_fused(x, weight, bias, a, b, m, scale, 0.0, 0, sq_norm)
        return lrk.qlora_fused(x, weight, bias, a, b, scale)

    out = {"base": (lambda x: F.linear(x, w, bias), [])}
    peft = _peft_with_adapter(s, r, use_dora)
    if peft is not None:
        out["peft+bnb"] = peft
    out["deq+matmul"] = (lambda x: eager_adapter(x, _dequantize(weight, base4, dtype)), adapter)
    out["lrk"] = (lrk_layer, adapter)
    fast = _peft_with_adapter(s, r, use_dora)  # a second PEFT layer over the same 4-bit base
    if fast is not None:
        from lrk.integrations.peft import accelerate
        accelerate(fast[0])
        out["lrk peft"] = fast
    return out


def _case_name(M, K, N, r, use_dora):
    return f"{M}x{K}x{N} r{r}" + (" qdora" if use_dora else " qlora")


def run_train_case(M, K, N, r, use_dora, device, dtype):
    s = _setup(M, K, N, r, use_dora, device, dtype)
    x = s["x"]
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    case = _case_name(M, K, N, r, use_dora)
    results = []
    for name, (fn, params) in _contenders(s, r, use_dora, dtype).items():
        def step(fn=fn):
            fn(x).backward(dy)
        try:
            step()
            ms = time_ms(step, device, grad_to_none=[x] + params)
            mem = peak_mib(step, device)
            note = ""
        except Exception as exc:  # report, keep going
            ms, mem, note = None, None, f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        results.append(Result(case=case, contender=name, ms=ms, peak_mib=mem, note=note,
                              tflops=4.0 * M * N * K / ms / 1e9 if ms else None))
    set_ratios(results)
    _check(results, s, use_dora, dtype)
    return results


def run_forward_case(M, K, N, r, device, dtype):
    s = _setup(M, K, N, r, False, device, dtype)
    x = s["x"].detach()
    case = f"fwd {M}x{K}x{N} r{r}"
    results = []
    for name, (fn, _) in _contenders(s, r, False, dtype).items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(x)
        try:
            fwd()
            ms = time_ms(fwd, device)
            note = ""
        except Exception as exc:
            ms, note = None, f"failed: {type(exc).__name__}: {str(exc)[:80]}"
        # the weight's bytes dominate at small M: 2 bytes (bf16) or 0.5 (4-bit) per element
        wbytes = N * K * (0.53 if name != "base" else dtype.itemsize)
        results.append(Result(case=case, contender=name, ms=ms, note=note, gbps=wbytes / ms / 1e6 if ms else None))
    set_ratios(results)
    return results


def _check(results, s, use_dora, dtype):
    """lrk's relative error against float64 math on the dequantized W (the lrk row)."""
    with torch.no_grad():
        w64 = s["weight"].dequantize(torch.float64)
        x, bias, a, b = (s[k].detach().double() for k in ("x", "bias", "a", "b"))
        if use_dora:
            y_ref = lrk.reference.dora_fused(x, w64, bias, a, b, s["m"].detach().double(), s["scale"])
            y = lrk.qdora_fused(s["x"], s["weight"], s["bias"], s["a"], s["b"], s["m"], s["scale"])
        else:
            y_ref = lrk.reference.lora_fused(x, w64, bias, a, b, s["scale"])
            y = lrk.qlora_fused(s["x"], s["weight"], s["bias"], s["a"], s["b"], s["scale"])
        err = ((y.double() - y_ref).norm() / y_ref.norm()).item()
    for res in results:
        if res.contender == "lrk":
            res.rel_err = err


def main(argv=None):
    args, device, dtype = parse_bench_args(__doc__, argv, quick_help="first case of each table only")
    keep = 1 if args.quick else None
    train_cases = pick_cases(device, GPU_TRAIN_CASES, CPU_TRAIN_CASES, keep)
    fwd_cases = pick_cases(device, GPU_FORWARD_CASES, CPU_FORWARD_CASES, keep)
    title = f"QLoRA / QDoRA (NF4, double quant, blocksize 64), {dtype}, {device.type}"
    results = []
    for i, case in enumerate(train_cases):
        res = run_train_case(*case, device, dtype)
        results += res
        print_table(f"forward+backward, case {i + 1} of {len(train_cases)}", res)
    for case in fwd_cases:
        res = run_forward_case(*case, device, dtype)
        results += res
        print_table("forward alone (no grad)", res)
    report(title, results, device, args.json)
    print_targets_table(train_cases, fwd_cases, results, device)
    return results


def print_targets_table(train_cases, fwd_cases, results, device):
    applies = device.type == "cuda"
    why = "n/a (CPU: reported only)"
    ratio = {(r.case, r.contender): r.ratio for r in results}

    def fmt(v):
        return f"{v:.3f}" if v is not None else "-"
    mem = {(r.case, r.contender): r.peak_mib for r in results}
    rows = []
    for case in train_cases:
        M, K, N, r, use_dora = case
        name = _case_name(*case)
        target = QDORA_TRAIN_TARGET if use_dora else QLORA_TRAIN_TARGET
        lrk_r, peft_r = ratio.get((name, "lrk")), ratio.get((name, "peft+bnb"))
        ok = lrk_r is not None and lrk_r <= target and (peft_r is None or lrk_r < peft_r)
        rows.append((f"{name} fwd+bwd / base", f"PEFT+bnb {fmt(peft_r)}", fmt(lrk_r),
                     f"<= {target} and < PEFT+bnb", verdict(ok, applies, why)))
        # No full-size bf16 copy of W: the step's peak stays below the base layer's
        # peak plus the bytes of such a copy (peak memory is measured on CUDA only).
        lrk_mem, base_mem = mem.get((name, "lrk")), mem.get((name, "base"))
        w_copy_mib = N * K * 2 / 2**20
        mem_ok = lrk_mem is not None and base_mem is not None and lrk_mem < base_mem + w_copy_mib
        rows.append((f"{name} peak memory", f"base {fmt(base_mem)} MiB, bf16 W {w_copy_mib:.1f} MiB",
                     f"{fmt(lrk_mem)} MiB", "< base + bf16 W", verdict(mem_ok, applies, why)))
    for M, K, N, r in fwd_cases:
        if M not in SMALL_M_TARGET_TOKENS:
            continue
        name = f"fwd {M}x{K}x{N} r{r}"
        lrk_r, deq_r = ratio.get((name, "lrk")), ratio.get((name, "deq+matmul"))
        ok = lrk_r is not None and lrk_r <= SMALL_M_FORWARD_TARGET
        rows.append((f"{name} / base", f"deq+matmul {fmt(deq_r)}, PEFT+bnb {fmt(ratio.get((name, 'peft+bnb')))}",
                     fmt(lrk_r), f"<= {SMALL_M_FORWARD_TARGET}", verdict(ok, applies, why)))
    print_targets(f"targets (GPU, bf16); this run: {device_name(device)}", rows)


if __name__ == "__main__":
    main()
