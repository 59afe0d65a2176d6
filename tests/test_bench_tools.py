"""Benchmark tooling: benchmarks/plot.py draws its charts from a benchmark's JSON (as
harness.write_json writes it): every timed row with a ratio, grouped by case in
order, nothing else; harness.Progress reports each case with what is left."""
import io
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join(ROOT, "benchmarks", "plot.py")
pytestmark = pytest.mark.skipif(not os.path.isfile(PLOT), reason="no benchmarks/ beside the tests")


def _module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _row(case, contender, ms, ratio, **kw):
    return dict(case=case, contender=contender, ms=ms, ratio=ratio, tflops=None, gbps=None, peak_mib=None,
                rel_err=None, note="", extra={}, **kw)


DATA = {"benchmark": "demo", "env": {"torch": "2.14.1", "threads": 2, "commit": "abc"}, "results": [
    _row("a", "base", 2.0, 1.0), _row("a", "lrk", 1.0, 0.5), _row("a", "peft", None, None),
    _row("b", "base", 4.0, 1.0), _row("b", "lrk", 6.0, 1.5),
    _row("a", "base", 3.0, 1.0), _row("a", "lrk", 0.3, 0.1),          # same label, another table
    _row("target", "verdict", None, None),
]}


def test_chart_groups_keep_timed_rows_in_order_and_split_repeated_cases():
    groups = _module("plot").chart_groups(DATA)
    assert groups == [("a", [("base", 1.0, 2.0), ("lrk", 0.5, 1.0)]),
                      ("b", [("base", 1.0, 4.0), ("lrk", 1.5, 6.0)]),
                      ("a", [("base", 1.0, 3.0), ("lrk", 0.1, 0.3)])]


def test_pages_split_many_cases():
    groups = [(f"c{i}", [("base", 1.0, 1.0), ("x", 2.0, 2.0)]) for i in range(10)]
    pages = _module("plot")._pages(groups, rows_per_chart=9)
    assert [len(p) for p in pages] == [3, 3, 3, 1] and sum(pages, []) == groups


def test_plot_writes_png_next_to_the_json(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench_demo.json"
    path.write_text(json.dumps(DATA))
    run = subprocess.run([sys.executable, "-m", "benchmarks.plot", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    png = tmp_path / "bench_demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert f"wrote {png}" in run.stdout
    empty = tmp_path / "bench_empty.json"
    empty.write_text(json.dumps({"benchmark": "none", "results": [_row("t", "verdict", None, None)]}))
    run = subprocess.run([sys.executable, "-m", "benchmarks.plot", str(empty)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0 and "no chart" in run.stdout and not (tmp_path / "bench_empty.png").exists()


def test_progress_counts_cases_across_loops_and_estimates_time_left():
    harness = _module("harness")
    out = io.StringIO()
    progress = harness.Progress("bench_demo", 3, stream=out)
    clock = iter([10.0, 30.0, 40.0, 50.0])   # one reading per line
    progress._clock = lambda: next(clock)
    progress._start = 0.0
    assert list(progress.over([(1, 2), (3, 4)], "sddmm", label=lambda c: f"{c[0]}x{c[1]}")) == [(1, 2), (3, 4)]
    assert list(progress.over(["big"], "layers")) == ["big"]
    lines = out.getvalue().splitlines()
    assert lines[0] == "[bench_demo 1/3] sddmm 1x2 | 10 s elapsed, 2 cases after this one, time left unknown yet"
    assert lines[1] == "[bench_demo 2/3] sddmm 3x4 | 30 s elapsed, 1 case after this one, ~60 s left"
    assert lines[2] == "[bench_demo 3/3] layers big | 40 s elapsed, 0 cases after this one, ~20 s left"
    assert lines[3] == "[bench_demo] 3 cases in 50 s"
