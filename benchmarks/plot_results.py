"""Plots of the policy-loss benchmark rows: time and peak memory per method and size.

    python benchmarks/plot_results.py                     # every results/policy_loss*.csv
    python benchmarks/plot_results.py --csv results/policy_loss_h100.csv --out docs/benchmarks

One PNG per device: two panels (forward + backward time, peak extra memory), one group of
bars per problem size (tokens x H x V), one bar per method (ours and the peers). For each
(device, method, size) the newest row is plotted, so a later run of some sizes replaces only
those. The CSVs are written by bench_policy_loss.py and may gain columns: only `timestamp,
device, method, tokens, H, V` and the time and memory columns are required; a `batch` or
`load` column, when present, splits the plots (one PNG per value) and others are ignored.
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
REQUIRED = ("timestamp", "device", "method", "tokens", "H", "V")
SPLIT_COLUMNS = ("batch", "load")

# Ours first, then the peers, then the floor; a method not listed goes after these.
METHOD_ORDER = ("riskpo logits", "riskpo logits in-place", "riskpo fused-linear", "plain grpo loss",
                "liger triton grpo", "liger fused-linear", "liger fused-linear eager",
                "cce + riskpo ppo", "three matmuls")


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        return [dict(row, _file=path) for row in reader]


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def latest_rows(rows: list[dict], time_column: str) -> dict:
    """{(device, split values): {(tokens, H, V): {method: row}}}, the newest row of each."""
    chosen: dict = {}
    for row in rows:
        if not math.isfinite(_number(row.get(time_column))):
            continue  # a failed or skipped method has no time to plot
        split = tuple((c, row[c]) for c in SPLIT_COLUMNS if row.get(c))
        size = (int(row["tokens"]), int(row["H"]), int(row["V"]))
        key = (row["device"], split)
        old = chosen.setdefault(key, {}).setdefault(size, {}).get(row["method"])
        if old is None or row["timestamp"] >= old["timestamp"]:
            chosen[key][size][row["method"]] = row
    return chosen


def _method_rank(method: str) -> tuple:
    low = method.lower()
    return (METHOD_ORDER.index(low) if low in METHOD_ORDER else len(METHOD_ORDER), low)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plot_device(device: str, split: tuple, sizes: dict, out_dir: str, time_column: str,
                memory_column: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size_keys = sorted(sizes, key=lambda s: (s[2], s[1], s[0]))
    methods = sorted({m for s in size_keys for m in sizes[s]}, key=_method_rank)
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(size_keys) + 4), 4.2))
    width = 0.8 / max(len(methods), 1)
    colors = plt.get_cmap("tab10")
    for panel, (ax, column, label) in enumerate(
            zip(axes, (time_column, memory_column), ("time, fwd + bwd (ms)", "peak extra memory (MiB)"))):
        for i, method in enumerate(methods):
            xs, ys = [], []
            for x, size in enumerate(size_keys):
                value = _number(sizes[size].get(method, {}).get(column))
                if math.isfinite(value):
                    xs.append(x - 0.4 + width * (i + 0.5))
                    ys.append(value)
            ax.bar(xs, ys, width, label=method if panel == 0 else None, color=colors(i % 10))
        ax.set_xticks(range(len(size_keys)))
        ax.set_xticklabels([f"{t}x{h}\nx{v}" for t, h, v in size_keys], fontsize=8)
        if not ax.patches or all(p.get_height() <= 0 for p in ax.patches):
            # e.g. the loaded rows, timed without the memory subprocesses
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    rows = [r for s in size_keys for r in sizes[s].values()]
    versions = sorted({f"torch {r.get('torch', '?')}" for r in rows})
    dtypes = sorted({r.get("dtype", "?") for r in rows})
    commits = sorted({r.get("commit", "?") for r in rows})
    title = f"{device}, {', '.join(versions)}, {', '.join(dtypes)}; commit {', '.join(commits)}"
    if split:
        title += " (" + ", ".join(f"{c}={v}" for c, v in split) + ")"
    fig.suptitle(title, fontsize=10)
    fig.legend(loc="lower center", ncol=min(len(methods), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1 + 0.05 * ((len(methods) - 1) // 4), 1, 0.95))
    name = "policy_loss_" + slug(device) + "".join(f"_{slug(v)}" for _, v in split) + ".png"
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", nargs="*", default=None,
                        help="CSV files (default: benchmarks/results/policy_loss*.csv)")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks"),
                        help="folder for the PNGs (default: docs/benchmarks)")
    parser.add_argument("--time", default="median_ms", help="time column (default: median_ms)")
    parser.add_argument("--memory", default="peak_extra_mib",
                        help="memory column (default: peak_extra_mib)")
    args = parser.parse_args(argv)
    files = args.csv or sorted(glob.glob(os.path.join(HERE, "results", "policy_loss*.csv")))
    if not files:
        parser.error("no CSV files found")
    rows = []
    for path in files:
        rows.extend(read_rows(path))
    chosen = latest_rows(rows, args.time)
    if not chosen:
        parser.error(f"no row with a number in column {args.time!r}")
    os.makedirs(args.out, exist_ok=True)
    for (device, split), sizes in sorted(chosen.items()):
        print(plot_device(device, split, sizes, args.out, args.time, args.memory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
