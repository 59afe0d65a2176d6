"""Microbenchmark harness: median times with warm-up, a printed table with ms,
the ratio to the baseline of the same run, TFLOP/s and GB/s, and JSON output.

On CUDA, times come from CUDA events through triton.testing.do_bench (median)
when Triton is installed, else from torch.utils.benchmark; on the CPU from
torch.utils.benchmark. Peak memory is measured on CUDA only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class Result:
    case: str            # shape / configuration label
    contender: str
    ms: Optional[float]
    ratio: Optional[float] = None       # ms / baseline ms (same case, same run)
    tflops: Optional[float] = None
    gbps: Optional[float] = None
    peak_mib: Optional[float] = None    # extra device memory over the inputs during one call
    rel_err: Optional[float] = None     # vs the case's reference output, when checked
    note: str = ""
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None,
            warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of fn() after warm-up."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
            return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                  return_mode="median"))
        except ImportError:
            pass
    from torch.utils import benchmark

    def run():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()

    for _ in range(3):
        run()
    _sync(device)
    timer = benchmark.Timer(stmt="run()", globals={"run": run})
    m = timer.blocked_autorange(min_run_time=max(rep_ms / 1000.0, 0.2))
    return m.median * 1000.0


def peak_mib(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Device memory that one call of fn() needs beyond what is already allocated."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "machine": platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   cuda=torch.version.cuda)
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=os.path.dirname(__file__)).stdout.strip() or None
    except OSError:
        env["commit"] = None
    for mod in ("peft", "triton", "lrk"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def print_table(title: str, results: list[Result]) -> None:
    print(f"\n## {title}")
    head = f"{'case':<28} {'contender':<22} {'ms':>9} {'x base':>7} {'TFLOP/s':>8} {'GB/s':>8} {'peak MiB':>9} {'rel err':>9}  note"
    print(head)
    print("-" * len(head))

    def fmt(v, spec):
        width = spec.split(".")[0]
        return format(v, spec) if v is not None else format("-", ">" + width)

    for r in results:
        print(f"{r.case:<28} {r.contender:<22} {fmt(r.ms, '9.4f')} {fmt(r.ratio, '7.3f')} {fmt(r.tflops, '8.1f')} "
              f"{fmt(r.gbps, '8.0f')} {fmt(r.peak_mib, '9.1f')} {fmt(r.rel_err, '9.2e')}  {r.note}")


def write_json(path: str, title: str, env: dict, results: list[Result]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"benchmark": title, "env": env, "results": [asdict(r) for r in results]}, f, indent=1)
    print(f"\nwrote {path}")


def parse_bench_args(doc: str, argv=None, quick_help: str = "first case only", with_dtype: bool = True,
                     with_profile: bool = False):
    """The command line every benchmark shares: --device, --dtype, --json, --quick
    (and --profile DIR for the benchmarks that write profiles).
    Returns (args, device, dtype); dtype defaults to bfloat16 on CUDA, float32 on the CPU."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    if with_dtype:
        ap.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    if with_profile:
        ap.add_argument("--profile", default=None, metavar="DIR",
                        help="also write a per-kernel profile of lrk's contenders here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    name = getattr(args, "dtype", None)
    dtype = getattr(torch, name) if name else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    return args, device, dtype


def write_profile(directory: str, label: str, fn: Callable[[], object], device: torch.device,
                  steps: int = 3) -> str:
    """Profiles `steps` calls of fn and writes the per-kernel table (device time
    first on a GPU) to directory/<label>.txt: which kernel takes the time, and at
    what bandwidth, is what a missed target's note has to show."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=90)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "".join(c if c.isalnum() or c in "-_." else "_" for c in label) + ".txt")
    with open(path, "w") as f:
        f.write(f"{label}: {steps} steps\n{table}\n")
    return path


def pick_cases(device: torch.device, gpu_cases: list, cpu_cases: list, keep: Optional[int] = None) -> list:
    """The issue's shapes on CUDA, small ones elsewhere; the first `keep` of them when given (--quick)."""
    cases = gpu_cases if device.type == "cuda" else cpu_cases
    return cases[:keep] if keep is not None else cases


def device_name(device: torch.device) -> str:
    """The GPU's name (target tables give a verdict on the issue's GPU only), or 'cpu'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def set_ratios(results: list[Result]) -> None:
    """ratio = ms / the first result's ms (the baseline, timed in the same run)."""
    base_ms = results[0].ms if results else None
    for r in results:
        if r.ms and base_ms:
            r.ratio = r.ms / base_ms


def report(title: str, results: list[Result], device: torch.device, json_path: Optional[str]) -> None:
    """Prints the table and, when asked, writes the JSON with the run's environment."""
    print_table(title, results)
    if json_path:
        write_json(json_path, title, environment(device), results)


def verdict(ok: Optional[bool], applies: bool = True, not_applicable: str = "n/a (the target is for the H200 case)") -> str:
    """'met' / 'MISSED' for a target checked in this run, or why it does not apply here."""
    if not applies:
        return not_applicable
    return "met" if ok else "MISSED"


def print_targets(title: str, rows: list[tuple[str, str, str, str, str]]) -> None:
    """An issue's targets table filled from this run: (row, today, lrk in this run, target, verdict)."""
    print(f"\n## {title}")
    widths = [max(len(str(r[i])) for r in rows + [("row", "today", "lrk (this run)", "target", "verdict")])
              for i in range(4)]
    head = ("row", "today", "lrk (this run)", "target", "verdict")
    line = "  ".join(f"{h:<{w}}" for h, w in zip(head[:4], widths)) + "  " + head[4]
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(f"{str(v):<{w}}" for v, w in zip(r[:4], widths)) + "  " + r[4])


class Progress:
    """Progress of a long benchmark run, one line per case on stderr as it starts:
    its number out of the run's total, its label, the time so far and an estimate of
    the time left (mean time of the finished cases times the cases left)::

        progress = Progress("bench_sparse", len(sddmm_cases) + len(layer_cases))
        for case in progress.over(sddmm_cases, "sddmm"):
            ...
    """

    def __init__(self, name: str, total: int, stream=None):
        import sys
        import time

        self.name, self.total, self.done = name, total, 0
        self._clock = time.perf_counter
        self._start = self._clock()
        self._stream = stream if stream is not None else sys.stderr

    def line(self, label: str) -> str:
        elapsed = self._clock() - self._start
        left = self.total - self.done
        if self.done:
            eta = f"~{elapsed / self.done * left:.0f} s left"
        else:
            eta = "time left unknown yet"
        return (f"[{self.name} {self.done + 1}/{self.total}] {label} | {elapsed:.0f} s elapsed, "
                f"{left - 1} case{'s' if left - 1 != 1 else ''} after this one, {eta}")

    def over(self, cases, what: str = "case", label: Optional[Callable[[object], str]] = None):
        """Yields each case of `cases`, printing the progress line before it runs."""
        for case in cases:
            text = label(case) if label else str(case)
            print(self.line(f"{what} {text}"), file=self._stream, flush=True)
            yield case
            self.done += 1
        if self.done == self.total:
            print(f"[{self.name}] {self.total} case{'s' if self.total != 1 else ''} in "
                  f"{self._clock() - self._start:.0f} s",
                  file=self._stream, flush=True)
