"""Batched multi-adapter LoRA (serving) against what users run today.

One linear layer y = x @ W^T with a different LoRA adapter per token (decode,
one token per sequence) or per sequence (prefill, sorted segments). Contenders,
timed in one run on the same inputs:
  base          F.linear alone (the floor)
  peft_mixed    PEFT's LoRA Linear with every adapter loaded, forward(adapter_names=...)
                (when peft is installed; eager: it indexes with host lists)
  gather_bmm    A_pool[ids], B_pool[ids] gathered, two torch.bmm (decode cases only)
  lrk           F.linear + torch.ops.lrk.multi_lora_shrink / _expand (in place)
On CUDA, base, gather_bmm and lrk are timed as CUDA-graph replays (what serving
engines run: launch and host overhead gone; vLLM's figures in
../shared/anchors/ are graph replays too); `lrk eager` is lrk launched from
Python. PEFT and CPU cases run eagerly. The lrk rows name the issue's target.

    python -m benchmarks.bench_multi_lora [--device cuda] [--json out.json] [--quick]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import lrk.multi_lora_ops as mlo
from benchmarks.harness import Progress, Result, parse_bench_args, pick_cases, report, set_ratios, time_ms


@dataclass
class Case:
    label: str
    K: int
    N: int
    tokens: int           # decode: batch; prefill: sequences * seq_len
    seq_len: int          # 1 for decode
    adapters: int         # in the pool
    ranks: tuple          # ranks of the pool's adapters (cycled)
    used: int = 0         # adapters the batch uses, spread evenly over the pool (0: all of it)
    r_max: int = 0        # rank capacity of the pool's slots (0: the largest rank)
    target: str = ""      # the goal for lrk in this case

    @property
    def decode(self) -> bool:
        return self.seq_len == 1


GPU_CASES = [
    Case("decode b64 32x r16", 4096, 4096, 64, 1, 32, (16,), target="<= 1.5x base"),
    Case("decode b512 32x r16", 4096, 4096, 512, 1, 32, (16,), target="<= 1.5x base"),
    Case("decode b256 r{8..128}", 4096, 4096, 256, 1, 32, (8, 16, 64, 128),
         target="time follows the sum of ranks used"),
    Case("decode b256 all r8", 4096, 4096, 256, 1, 32, (8,)),
    Case("decode b256 r8 in r_max128", 4096, 4096, 256, 1, 32, (8,), r_max=128, target="as 'all r8'"),
    Case("decode b256 all r128", 4096, 4096, 256, 1, 32, (128,)),
    # The same 32 adapters as "decode b64 32x r16", spread over a pool of 1024 slots.
    Case("decode b64 pool1024 r16", 4096, 4096, 64, 1, 1024, (16,), used=32, target="as 'b64 32x r16'"),
    Case("prefill 8x512 8x r16", 4096, 4096, 8 * 512, 512, 8, (16,), target="<= 1.15x base"),
]
CPU_CASES = [
    Case("decode b16 8x r8", 512, 512, 16, 1, 8, (8,)),
    Case("decode b64 r{4..32}", 512, 512, 64, 1, 8, (4, 8, 16, 32)),
    Case("prefill 4x64 4x r8", 512, 512, 4 * 64, 64, 4, (8,)),
]


def make_inputs(case: Case, device, dtype, gen):
    r_max = case.r_max or max(case.ranks)
    ranks = torch.tensor([case.ranks[j % len(case.ranks)] for j in range(case.adapters)], dtype=torch.int32)
    a_pool = torch.zeros(case.adapters, r_max, case.K, dtype=dtype, device=device)
    b_pool = torch.zeros(case.adapters, case.N, r_max, dtype=dtype, device=device)
    for j in range(case.adapters):
        r = int(ranks[j])
        a_pool[j, :r] = (torch.randn(r, case.K, generator=gen) / math.sqrt(case.K)).to(dtype)
        b_pool[j, :, :r] = (torch.randn(case.N, r, generator=gen) / math.sqrt(r)).to(dtype)
    scales = torch.full((case.adapters,), 2.0)
    w = (torch.randn(case.N, case.K, generator=gen) / math.sqrt(case.K)).to(dtype).to(device)
    x = torch.randn(case.tokens, case.K, generator=gen).to(dtype).to(device)
    used = case.used or case.adapters
    slots = torch.arange(used) * (case.adapters // used)  # spread over the pool
    seqs = case.tokens // case.seq_len
    seq_adapters = slots[torch.randint(0, used, (seqs,), generator=gen)]
    if not case.decode:  # prefill: sequences sorted by adapter, one segment each
        seq_adapters = torch.sort(seq_adapters).values
    ids = seq_adapters.repeat_interleave(case.seq_len)
    offsets = torch.arange(seqs + 1) * case.seq_len
    return dict(w=w, x=x, a_pool=a_pool, b_pool=b_pool, ranks=ranks.to(device), scales=scales.to(device),
                ids=ids.to(device), host_ids=ids, seq_adapters=seq_adapters.to(device), offsets=offsets.to(device),
                ranks_host=ranks)


def peft_layer(case: Case, inp, device, dtype):
    try:
        from peft.tuners.lora import Linear as PeftLoraLinear, LoraConfig
    except Exception:
        return None
    base = torch.nn.Linear(case.K, case.N, bias=False, device=device, dtype=dtype)
    base.weight.data.copy_(inp["w"])
    layer = None
    for j in range(case.adapters):
        r = int(inp["ranks_host"][j])
        cfg = LoraConfig(r=r, lora_alpha=2.0 * r)
        if layer is None:
            try:
                layer = PeftLoraLinear(base, f"a{j}", config=cfg, r=r, lora_alpha=2.0 * r)
            except TypeError:
                layer = PeftLoraLinear(base, f"a{j}", r=r, lora_alpha=2.0 * r)
        else:
            try:
                layer.update_layer(f"a{j}", r, lora_alpha=2.0 * r, config=cfg)
            except TypeError:
                layer.update_layer(f"a{j}", r, lora_alpha=2.0 * r, lora_dropout=0.0, init_lora_weights=True)
        layer.lora_A[f"a{j}"].weight.data.copy_(inp["a_pool"][j, :r])
        layer.lora_B[f"a{j}"].weight.data.copy_(inp["b_pool"][j, :, :r])
    return layer.to(device=device, dtype=dtype)


def graphed(fn, device):
    """fn captured in a CUDA graph: returns (replay, output of the captured run)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def run_case(case: Case, device, dtype):
    gen = torch.Generator().manual_seed(0)
    inp = make_inputs(case, device, dtype, gen)
    w, x, a_pool, b_pool, ranks, scales = (inp[k] for k in ("w", "x", "a_pool", "b_pool", "ranks", "scales"))
    ids, offsets, seq_adapters = inp["ids"], inp["offsets"], inp["seq_adapters"]

    def base():
        return F.linear(x, w)

    def lrk_step():
        y = F.linear(x, w)
        if case.decode:
            return mlo.add_multi_lora_(y, x, a_pool, b_pool, ranks, scales, adapter_ids=ids)
        return mlo.add_multi_lora_(y, x, a_pool, b_pool, ranks, scales, seg_offsets=offsets,
                                   seg_adapters=seq_adapters)

    def gather_bmm():
        h = torch.bmm(a_pool[ids], x.unsqueeze(-1))            # [M, r_max, 1]
        d = torch.bmm(b_pool[ids], h).squeeze(-1)               # [M, N]
        return torch.addcmul(F.linear(x, w), scales[ids].to(dtype).unsqueeze(-1), d)

    contenders = {"base": base}
    layer = peft_layer(case, inp, device, dtype) if case.adapters <= 64 else None
    names = [f"a{int(j)}" for j in inp["host_ids"][:: case.seq_len]]
    if layer is not None:
        x_peft = x if case.decode else x.view(-1, case.seq_len, case.K)
        contenders["peft_mixed"] = lambda: layer(x_peft, adapter_names=names)
    if case.decode:
        contenders["gather_bmm"] = gather_bmm
    contenders["lrk"] = lrk_step
    if device.type == "cuda":
        contenders["lrk eager"] = lrk_step

    used_ranks = [int(inp["ranks_host"][int(j)]) for j in torch.unique(inp["host_ids"])]
    r_avg = float(sum(int(inp["ranks_host"][int(j)]) for j in inp["host_ids"])) / case.tokens
    M, K, N = case.tokens, case.K, case.N
    flops_base = 2.0 * M * K * N
    flops_lora = flops_base + 2.0 * M * (K + N) * r_avg
    bytes_base = dtype.itemsize * (N * K + M * K + M * N)
    bytes_lora = bytes_base + dtype.itemsize * (K + N) * sum(used_ranks)
    results = []
    with torch.inference_mode():
        for name, fn in contenders.items():
            note = ""
            try:
                use_graph = device.type == "cuda" and name in ("base", "gather_bmm", "lrk")
                timed = fn
                if use_graph:
                    timed, _ = graphed(fn, device)
                    note = "cuda graph"
                elif device.type == "cuda":
                    note = "eager"
                fn()
                ms = time_ms(timed, device)
            except Exception as exc:  # report, keep going
                ms, note = None, f"failed: {type(exc).__name__}: {str(exc)[:80]}"
            flops = flops_base if name == "base" else flops_lora
            nbytes = bytes_base if name == "base" else bytes_lora
            results.append(Result(case=case.label, contender=name, ms=ms, tflops=flops / ms / 1e9 if ms else None,
                                  gbps=nbytes / ms / 1e6 if ms else None, note=note))
        if layer is None:
            results.append(Result(case=case.label, contender="peft_mixed", ms=None,
                                  note="peft not installed" if case.adapters <= 64 else "not run: pool too large"))
        # Accuracy of lrk against a float64 evaluation of the same math.
        y = lrk_step().double().cpu()
        y_ref = F.linear(x.double(), w.double()).cpu()
        h_ids = inp["host_ids"]
        a64, b64 = a_pool.double().cpu(), b_pool.double().cpu()
        delta = torch.einsum("mnr,mrk,mk->mn", b64[h_ids], a64[h_ids], x.double().cpu())
        y_ref += scales.double().cpu()[h_ids].unsqueeze(-1) * delta
        err = ((y - y_ref).norm() / y_ref.norm()).item()
    set_ratios(results)
    for res in results:
        if res.contender == "lrk":
            res.rel_err = err
            if case.target:
                res.note = f"{res.note}; target {case.target}" if res.note else f"target {case.target}"
        res.extra = dict(K=K, N=N, tokens=M, seq_len=case.seq_len, adapters=case.adapters,
                         ranks=list(case.ranks), r_max=a_pool.shape[1], used_adapters=len(used_ranks),
                         sum_used_ranks=sum(used_ranks))
    return results


def main(argv=None):
    args, device, dtype = parse_bench_args(__doc__, argv, quick_help="first case only")
    cases = pick_cases(device, GPU_CASES, CPU_CASES, 1 if args.quick else None)
    results = []
    progress = Progress("bench_multi_lora", len(cases))
    for case in progress.over(cases):
        results += run_case(case, device, dtype)
    title = f"multi-adapter LoRA layer (y = xW^T + per-token adapter), {dtype}, {device.type}"
    report(title, results, device, args.json)
    return results


if __name__ == "__main__":
    main()
