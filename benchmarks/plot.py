"""PNG charts of benchmark results, drawn from the JSON that a benchmark writes
(`--json`, what scripts/bench.sh puts in bench_out/): for every case, each
contender's time as a ratio to the case's baseline (the first contender, timed in
the same run; below 1 is faster), on a log axis. Rows without a time (notes,
target rows) are left out.

    python -m benchmarks.plot bench_out/*.json        # bench_out/bench_lora.png, ...

A file with many cases is split into several charts (<name>.png, <name>_2.png, ...).
"""
from __future__ import annotations

import argparse
import json
import math
import os

ROWS_PER_CHART = 48


def chart_groups(data: dict) -> list[tuple[str, list[tuple[str, float, float]]]]:
    """[(case, [(contender, ratio, ms), ...]), ...] in the file's order. A new group
    starts whenever the case label changes, since a benchmark may run the same case
    in several tables (forward, then forward+backward), each with its own baseline."""
    groups: list[tuple[str, list]] = []
    for r in data.get("results", []):
        if r.get("ratio") is None or r.get("ms") is None or not math.isfinite(r["ratio"]) or r["ratio"] <= 0:
            continue
        if not groups or groups[-1][0] != r["case"]:
            groups.append((r["case"], []))
        groups[-1][1].append((r["contender"], float(r["ratio"]), float(r["ms"])))
    return groups


def _pages(groups: list, rows_per_chart: int) -> list[list]:
    pages, page, rows = [], [], 0
    for group in groups:
        if page and rows + len(group[1]) > rows_per_chart:
            pages.append(page)
            page, rows = [], 0
        page.append(group)
        rows += len(group[1]) + 1
    if page:
        pages.append(page)
    return pages


def plot_file(path: str, out_dir: str | None = None, rows_per_chart: int = ROWS_PER_CHART) -> list[str]:
    """Writes the charts of one JSON file next to it (or into out_dir); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        data = json.load(f)
    groups = chart_groups(data)
    if not groups:
        print(f"{path}: no timed results with ratios, no chart")
        return []
    env = data.get("env", {})
    where = env.get("gpu") or f"CPU ({env.get('threads', '?')} threads)"
    stem = os.path.splitext(os.path.basename(path))[0]
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    contenders = list(dict.fromkeys(c for _, rows in groups for c, _, _ in rows))
    colours = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(contenders)}
    written = []
    pages = _pages(groups, rows_per_chart)
    for page_no, page in enumerate(pages, 1):
        labels, ratios, colors, ys, case_marks = [], [], [], [], []
        y = 0
        for case, rows in page:
            case_marks.append((y, case))
            for contender, ratio, _ in rows:
                labels.append(contender)
                ratios.append(ratio)
                colors.append(colours[contender])
                ys.append(y)
                y += 1
            y += 1   # a gap between cases
        fig, ax = plt.subplots(figsize=(10, 1.2 + 0.28 * y))
        ax.barh(ys, ratios, color=colors, height=0.8)
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_yticks(ys, labels, fontsize=7)
        ax.invert_yaxis()
        lo, hi = min(ratios + [1.0]), max(ratios + [1.0])
        ax.set_xlim(lo / 1.6, hi * 2.2)
        for yy, ratio in zip(ys, ratios):
            ax.text(ratio * 1.04, yy, f"{ratio:.3g}", va="center", fontsize=6)
        for yy, case in case_marks:
            ax.text(hi * 2.1, yy - 0.45, case, ha="right", va="bottom", fontsize=7, fontweight="bold")
        ax.set_xlabel("time / baseline time (first contender of each case, same run); < 1 is faster")
        title = data.get("benchmark", stem)
        suffix = f" ({page_no}/{len(pages)})" if len(pages) > 1 else ""
        ax.set_title(f"{title}{suffix}\n{where}, torch {env.get('torch', '?')}, commit {env.get('commit') or '?'}",
                     fontsize=8)
        fig.tight_layout()
        out = os.path.join(out_dir, f"{stem}.png" if page_no == 1 else f"{stem}_{page_no}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main(argv=None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="benchmark JSON files (bench_out/*.json)")
    ap.add_argument("--out-dir", default=None, help="where the PNGs go (default: next to each JSON)")
    args = ap.parse_args(argv)
    written = []
    for path in args.json:
        for out in plot_file(path, args.out_dir):
            print(f"wrote {out}")
            written.append(out)
    return written


if __name__ == "__main__":
    main()
