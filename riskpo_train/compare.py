"""Compare RL training runs: curves as PNGs and a markdown table of final numbers.

`riskpo-train compare OUT_A OUT_B ...` reads each run directory's `metrics.jsonl`
(and `summary.json` / `config.json` when present) and writes `reward.png`,
`pass1.png`, `passk.png`, `entropy.png`, `clipfrac.png`, `overview.png`,
`seeds.png` (when the runs have evaluations) and `comparison.md` into `--out`
(default: the parent of the first run directory); it prints the table, and on
stderr the directory and the files it wrote.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .buckets import pass_at_k_by_bucket
from .files import read_records
from .rollout import pass_at_k, reported_ks

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"

# Fixed colours so that RiskPO and GRPO look the same in every comparison.
_ALGO_COLORS = {"riskpo": "tab:red", "grpo": "tab:blue"}
_SPARE_COLORS = ("tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink",
                 "tab:olive", "tab:cyan", "tab:gray")
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v")

# (file stem, train key, eval key or None, title, y label)
_PANELS = (
    ("reward", "reward_mean", "reward_mean", "Mean reward", "reward"),
    ("pass1", "pass@1", "pass@1", "Pass@1", "pass@1"),
    ("passk", "pass@k", "pass@k", "Pass@k", "pass@k"),
    ("entropy", "entropy", "entropy", "Policy entropy", "entropy (nats/token)"),
    ("clipfrac", "clipfrac", None, "Clip fraction", "clipfrac"),
)


@dataclass
class Run:
    """One run directory: its records by kind and its summary ({} if unfinished)."""

    path: Path
    name: str
    algo: str | None
    seed: int | None
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    # What seeds are pooled over: the directory name less a "-seed<N>" suffix
    # (riskpo-seed0, riskseeking-seed2), else the algo.
    group: str | None = None


def _group_of(path: Path, algo: str | None) -> str | None:
    match = re.fullmatch(r"(.+)-seed\d+", path.name)
    return match.group(1) if match else algo


def _number(value) -> float | None:
    """`value` as a finite float, or None for null, NaN, Inf and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(train, eval) records of a metrics.jsonl, in file order."""
    records = read_records(path)
    return ([r for r in records if r.get("kind") == "train"],
            [r for r in records if r.get("kind") == "eval"])


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: malformed JSON: {exc}") from None
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path}: expected a JSON object")


def load_run(path: str | Path) -> Run:
    """Read a run directory.

    algo/seed come from summary.json, else config.json; the name is
    "{algo} seed {seed}" when both are known, else the directory name.
    Raises FileNotFoundError when the directory or its metrics.jsonl is missing,
    ValueError for a malformed record (other than a partial last line).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run directory")
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(f"{path}: no {METRICS_FILE} (not a run directory?)")
    train, evals = _read_metrics(metrics)
    summary = _read_json(path / SUMMARY_FILE) if (path / SUMMARY_FILE).is_file() else {}
    config = _read_json(path / CONFIG_FILE) if (path / CONFIG_FILE).is_file() else {}
    algo = summary.get("algo", config.get("algo"))
    seed = summary.get("seed", config.get("seed"))
    algo = str(algo) if algo is not None else None
    if isinstance(seed, float) and not math.isfinite(seed):
        where = path / (SUMMARY_FILE if "seed" in summary else CONFIG_FILE)
        raise ValueError(f"{where}: seed must be a finite number, got {seed}")
    seed = int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None
    for record in evals:
        counts, samples = record.get("correct"), record.get("k")
        if not isinstance(counts, list):
            continue
        bad = next((c for c in counts if isinstance(c, bool) or not isinstance(c, int) or c < 0
                    or (isinstance(samples, int) and c > samples)), None)
        if bad is not None or (counts and not isinstance(samples, int)):
            raise ValueError(f"{metrics}: eval at step {record.get('step')}: 'correct' must hold "
                             f"integer counts in [0, k={samples}], got {bad!r}")
    name = f"{algo} seed {seed}" if algo is not None and seed is not None else path.name
    return Run(path=path, name=name, algo=algo, seed=seed, train=train, eval=evals,
               summary=summary, group=_group_of(path, algo))


def _last(records: Sequence[dict], key: str) -> float | None:
    for record in reversed(records):
        value = _number(record.get(key))
        if value is not None:
            return value
    return None


def _final(run: Run, kind: str, key: str) -> float | None:
    """The summary's final_{kind}[key], else the last finite value in the records."""
    section = run.summary.get(f"final_{kind}")
    value = _number(section.get(key)) if isinstance(section, dict) else None
    if value is None:
        value = _last(run.train if kind == "train" else run.eval, key)
    return value


def _final_k(run: Run) -> int | None:
    k = _final(run, "eval", "k")
    return int(k) if k is not None else None


def _final_steps(run: Run) -> int | None:
    steps = _number(run.summary.get("steps"))
    if steps is None:
        steps = _last(run.train, "step")
    return int(steps) if steps is not None else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A padded markdown table; the first column left-aligned, the rest right."""
    table = [list(map(_cell, header)), *[list(map(_cell, row)) for row in rows]]
    widths = [max(3, *(len(row[i]) for row in table)) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "| " + " | ".join(cells) + " |"

    rule = "| " + " | ".join(":" + "-" * (w - 1) if i == 0 else "-" * (w - 1) + ":"
                             for i, w in enumerate(widths)) + " |"
    return "\n".join([line(table[0]), rule, *(line(row) for row in table[1:])])


def _passk_header(runs: Sequence[Run]) -> tuple[str, bool]:
    """The Pass@k column header and whether each cell must name its own k."""
    ks = {k for k in map(_final_k, runs) if k is not None}
    if len(ks) == 1:
        return f"test Pass@{ks.pop()}", False
    return "test Pass@k", bool(ks)


def _mean_std(values: Sequence[float | None], n_runs: int) -> str:
    """"mean ± sample std" over the known values, "(n=m)" when some are missing."""
    known = [v for v in values if v is not None]
    if not known:
        return "n/a"
    text = f"{statistics.fmean(known):.3f}"
    if len(known) >= 2:
        text += f" ± {statistics.stdev(known):.3f}"
    if len(known) < n_runs:
        text += f" (n={len(known)})"
    return text


def _groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs pooled over seeds, by group (see :class:`Run`), in first-seen order;
    a group whose runs differ in algo is split by algo (never pooled)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if run.group is not None:
            groups.setdefault(run.group, []).append(run)
    split: dict[str, list[Run]] = {}
    for name, members in groups.items():
        if len({run.algo for run in members}) > 1:
            for run in members:
                split.setdefault(f"{name} ({run.algo})", []).append(run)
        else:
            split[name] = members
    return split


def _final_counts(run: Run) -> dict | None:
    """The last evaluation record that holds per-question counts."""
    return next((r for r in reversed(run.eval) if isinstance(r.get("correct"), list)), None)


def bucket_table(runs: Sequence[Run], reference: Run) -> str | None:
    """Markdown: test Pass@k per difficulty bucket, for the runs' first
    evaluation (step 0: one model for all, so pooled over every run) and, per
    run group, the final evaluation (mean ± sample std over seeds). A
    question's bucket is its pass rate in the reference run's first
    evaluation, which must be an independent draw (another seed): bucketed by
    the very samples it is scored on, a "hard" question would look solved at
    step 0 by selection alone. None when the evaluations lack per-question
    counts."""
    def with_counts(records):
        return [r for r in records if isinstance(r.get("correct"), list)]

    ref_records = with_counts(reference.eval)
    groups = _groups(runs)
    firsts = [with_counts(run.eval)[:1] for run in runs]
    finals = {name: [_final_counts(run) for run in group] for name, group in groups.items()}
    if not ref_records or not finals or not all(firsts) \
            or any(None in records for records in finals.values()):
        return None
    ref_record = ref_records[0]
    # Runs of one seed draw the same step-0 samples from the same model: one draw.
    draws = {tuple(f[0]["correct"]): f[0] for f in firsts}
    firsts = list(draws.values())
    samples = {r["k"] for r in firsts} | {r["k"] for rs in finals.values() for r in rs}
    ks = reported_ks(min(samples))
    start_rows = [pass_at_k_by_bucket(ref_record, r, ks) for r in firsts]
    group_rows = {name: [pass_at_k_by_bucket(ref_record, r, ks) for r in records]
                  for name, records in finals.items()}
    header = ["bucket (reference pass rate)", "questions", "k",
              f"step 0 ({len(firsts)} draw{'s' if len(firsts) > 1 else ''})", *finals]
    rows = []
    for b, first in enumerate(start_rows[0]):
        for k in ks:
            key = f"pass@{k}"
            rows.append([first["bucket"], str(first["questions"]), str(k),
                         _mean_std([per_run[b][key] for per_run in start_rows], len(start_rows)),
                         *(_mean_std([per_run[b][key] for per_run in group_rows[name]],
                                     len(group_rows[name])) for name in finals)])
    return _markdown(header, rows)


def summary_table(runs: Sequence[Run]) -> str:
    """Markdown: one row per run with its final numbers; then, when an algo has
    >= 2 runs, per-algo mean ± sample std over seeds (one row per algo)."""
    passk_header, k_per_cell = _passk_header(runs)
    header = ["run", "steps", "test Pass@1", passk_header, "test entropy",
              "train reward", "train clipfrac"]
    rows = []
    for run in runs:
        passk = _fmt(_final(run, "eval", "pass@k"))
        k = _final_k(run)
        if k_per_cell and k is not None and passk != "n/a":
            passk += f" (k={k})"
        steps = _final_steps(run)
        rows.append([run.name, "n/a" if steps is None else str(steps),
                     _fmt(_final(run, "eval", "pass@1")), passk,
                     _fmt(_final(run, "eval", "entropy")),
                     _fmt(_final(run, "train", "reward_mean")),
                     _fmt(_final(run, "train", "clipfrac"))])
    text = _markdown(header, rows)

    groups = _groups(runs)
    if not any(len(group) >= 2 for group in groups.values()):
        return text + "\n"
    algo_rows = []
    for algo, group in groups.items():
        n = len(group)
        ks = {_final_k(run) for run in group} - {None}
        # Pass@k at different k are different quantities: no mean across them.
        passk = ("n/a (mixed k)" if len(ks) > 1
                 else _mean_std([_final(r, "eval", "pass@k") for r in group], n))
        algo_rows.append([algo, str(n),
                          _mean_std([_final(r, "eval", "pass@1") for r in group], n),
                          passk,
                          _mean_std([_final(r, "eval", "entropy") for r in group], n),
                          _mean_std([_final(r, "train", "reward_mean") for r in group], n),
                          _mean_std([_final(r, "train", "clipfrac") for r in group], n)])
    algo_header = ["runs", "seeds", *header[2:]]
    return (text + "\n\nPer algo (or run group), mean ± sample std over seeds:\n\n"
            + _markdown(algo_header, algo_rows) + "\n")


@dataclass(frozen=True)
class _Style:
    color: str
    linestyle: str
    marker: str


def _styles(runs: Sequence[Run]) -> dict[int, _Style]:
    """Style per run index: colour by algo, line style and marker by seed rank."""
    colors = dict(_ALGO_COLORS)
    spare = iter(_SPARE_COLORS * (1 + len(runs) // len(_SPARE_COLORS)))
    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        # A run of unknown algo is its own group, keyed so it cannot meet a real algo.
        key = run.group if run.group is not None else f"\0{i}"
        groups.setdefault(key, []).append(i)
    styles = {}
    for key, members in groups.items():
        if key not in colors:
            colors[key] = next(spare)
        members.sort(key=lambda i: (runs[i].seed is None, runs[i].seed or 0, i))
        for rank, i in enumerate(members):
            styles[i] = _Style(colors[key], _LINESTYLES[rank % len(_LINESTYLES)],
                               _MARKERS[rank % len(_MARKERS)])
    return styles


def _points(records: Iterable[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for record in records:
        x, y = _number(record.get("step")), _number(record.get(key))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def _smooth(ys: Sequence[float]) -> list[float] | None:
    """Trailing moving average over ~5% of the points; None for short curves."""
    window = min(50, len(ys) // 20)
    if window < 2:
        return None
    out, total = [], 0.0
    for i, y in enumerate(ys):
        total += y
        if i >= window:
            total -= ys[i - window]
        out.append(total / min(i + 1, window))
    return out


def _curve(ax, xs, ys, style: _Style) -> None:
    smoothed = _smooth(ys)
    if smoothed is None:
        ax.plot(xs, ys, color=style.color, linestyle=style.linestyle, linewidth=1.4)
    else:
        # RL curves are noisy: the faint raw curve keeps the noise visible. It is
        # solid because dashes on a jagged line only add clutter.
        ax.plot(xs, ys, color=style.color, linewidth=0.6, alpha=0.2)
        ax.plot(xs, smoothed, color=style.color, linestyle=style.linestyle, linewidth=1.6)


def _draw_panel(ax, runs, styles, panel) -> bool:
    """One quantity for every run: train curve, test points. False if nothing drawn."""
    _stem, train_key, eval_key, title, ylabel = panel
    drawn = False
    for i, run in enumerate(runs):
        style = styles[i]
        xs, ys = _points(run.train, train_key)
        if xs:
            _curve(ax, xs, ys, style)
            drawn = True
        if eval_key is not None:
            xs, ys = _points(run.eval, eval_key)
            if xs:
                ax.plot(xs, ys, color=style.color, linestyle=style.linestyle,
                        linewidth=0.8, marker=style.marker, markersize=5,
                        markeredgecolor="black", markeredgewidth=0.5)
                drawn = True
    if train_key == "pass@k":
        ks = {k for k in map(_final_k, runs) if k is not None}
        if len(ks) == 1:
            title = f"Pass@k, test k={ks.pop()}"
    note = "lines: train, markers: test" if eval_key is not None else "train"
    ax.set_title(f"{title} ({note})" if drawn else f"{title}: no data", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return drawn


def _draw_quantiles(ax, runs, styles) -> bool:
    """q_lo/q_hi bands of the runs that log them. False if none does."""
    drawn = False
    for i, run in enumerate(runs):
        style = styles[i]
        pairs = [(x, lo, hi) for x, lo, hi in
                 ((_number(r.get("step")), _number(r.get("q_lo")), _number(r.get("q_hi")))
                  for r in run.train) if x is not None and lo is not None and hi is not None]
        if not pairs:
            continue
        xs, los, his = map(list, zip(*pairs))
        ax.fill_between(xs, los, his, color=style.color, alpha=0.12, linewidth=0)
        _curve(ax, xs, los, style)
        _curve(ax, xs, his, style)
        drawn = True
    if drawn:
        ax.set_title("RiskPO quantiles (band: q_lo to q_hi, train)", fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("bundle score quantile")
        ax.grid(True, alpha=0.3)
    return drawn


def _legend_handles(runs, styles, markers: bool):
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=styles[i].color, linestyle=styles[i].linestyle,
                   marker=styles[i].marker if markers else None, markersize=5,
                   markeredgecolor="black", markeredgewidth=0.5, label=run.name)
            for i, run in enumerate(runs)]


def plot_runs(runs: Sequence[Run], out_dir: str | Path) -> list[Path]:
    """Write reward.png, pass1.png, passk.png, entropy.png, clipfrac.png and
    overview.png (2x3: those five and q_lo/q_hi) into out_dir; return their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window or need a display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    styles = _styles(runs)
    written = []
    for panel in _PANELS:
        fig, ax = plt.subplots(figsize=(8, 5))
        try:
            if _draw_panel(ax, runs, styles, panel):
                ax.legend(handles=_legend_handles(runs, styles, panel[2] is not None),
                          fontsize=8, loc="best")
            fig.tight_layout()
            path = out_dir / f"{panel[0]}.png"
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    try:
        for ax, panel in zip(axes.flat, _PANELS):
            _draw_panel(ax, runs, styles, panel)
        if not _draw_quantiles(axes.flat[5], runs, styles):
            axes.flat[5].axis("off")
        handles = _legend_handles(runs, styles, markers=True)
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6),
                   fontsize=9, frameon=False)
        fig.suptitle("Training runs compared (lines: train, markers: test split)")
        # Room at the bottom for the shared legend, one row per 6 runs.
        fig.tight_layout(rect=(0, 0.03 + 0.03 * math.ceil(len(handles) / 6), 1, 1))
        path = out_dir / "overview.png"
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    written.append(path)
    return written


def _eval_series(run: Run, key: str) -> dict[float, float]:
    """{step: value} of an eval key; a ``pass@k`` the record lacks (its run drew
    more samples) comes from its per-question counts."""
    series = {}
    for record in run.eval:
        step, value = _number(record.get("step")), _number(record.get(key))
        if value is None and key.startswith("pass@") and isinstance(record.get("correct"), list):
            k, samples = int(key[5:]), record.get("k")
            if isinstance(samples, int) and 1 <= k <= samples:
                counts = torch.tensor(record["correct"], dtype=torch.int64)
                value = pass_at_k(samples, counts, k).mean().item()
        if step is not None and value is not None:
            series[step] = value
    return series


def plot_mean_std(runs: Sequence[Run], out_dir: str | Path) -> Path | None:
    """seeds.png: test Pass@1, Pass@k (the largest k every run reports) and
    entropy against the step, per run group: the mean over seeds, and a band of
    one sample std. Steps are those every run of the group evaluated. None (no
    file) when no group has evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(runs)
    ks = [k for k in map(_final_k, runs) if k is not None]
    if not groups or not ks:
        return None
    k = min(ks)
    panels = (("pass@1", "test Pass@1"), (f"pass@{k}", f"test Pass@{k}"),
              ("entropy", "test entropy (nats/token)"))
    styles = _styles(runs)
    color = {run.group: styles[i].color for i, run in enumerate(runs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    try:
        for ax, (key, title) in zip(axes, panels):
            for name, group in groups.items():
                series = [_eval_series(run, key) for run in group]
                steps = sorted(set.intersection(*(set(s) for s in series)))
                if not steps:
                    continue
                values = [[s[x] for s in series] for x in steps]
                mean = [statistics.fmean(v) for v in values]
                std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
                ax.plot(steps, mean, color=color[name], marker="o", markersize=3,
                        label=f"{name} (n={len(group)})")
                ax.fill_between(steps, [m - d for m, d in zip(mean, std)],
                                [m + d for m, d in zip(mean, std)], color=color[name], alpha=0.15,
                                linewidth=0)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8, loc="best")
        fig.suptitle("Test split: mean over seeds, band = ± one sample std")
        fig.tight_layout()
        path = Path(out_dir) / "seeds.png"
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def compare(paths: Sequence[str | Path], out_dir: str | Path | None = None,
            reference: str | Path | None = None) -> str:
    """Load the runs, write the plots and comparison.md into out_dir (default: the
    parent of the first run directory) and return the table. With a
    ``reference`` run directory (e.g. the warm-up's evaluation), the table also
    has Pass@k per difficulty bucket of that run's test pass rates."""
    return compare_files(paths, out_dir, reference)[0]


def compare_files(paths: Sequence[str | Path], out_dir: str | Path | None = None,
                  reference: str | Path | None = None) -> tuple[str, list[Path]]:
    """:func:`compare`, returning (the table, the files it wrote: the PNGs, then
    comparison.md)."""
    if not paths:
        raise ValueError("compare needs at least one run directory")
    # One run given twice (or through a symlink) would count as two seeds.
    seen: dict[Path, str | Path] = {}
    for p in paths:
        resolved = Path(p).resolve()
        if resolved in seen:
            raise ValueError(f"run directory {str(p)!r} is given twice (also as "
                             f"{str(seen[resolved])!r}): each run must be listed once")
        seen[resolved] = p
    runs = [load_run(p) for p in paths]
    # Two runs with one algo and seed (e.g. a rerun) would share a label.
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.name} ({run.path.name})"
    out = Path(out_dir) if out_dir is not None else Path(paths[0]).resolve().parent
    written = plot_runs(runs, out)
    seeds_plot = plot_mean_std(runs, out)
    if seeds_plot is not None:
        written.append(seeds_plot)
    table = summary_table(runs)
    if reference is not None:
        buckets = bucket_table(runs, load_run(reference))
        if buckets is None:
            raise ValueError(f"--reference {reference}: the runs' evaluations have no "
                             "per-question counts to bucket")
        table += (f"\nTest Pass@k per difficulty bucket (a question's bucket is its pass rate "
                  f"in {Path(reference).name}'s first evaluation); mean ± sample std over "
                  f"seeds:\n\n{buckets}\n")
    (out / "comparison.md").write_text(table, encoding="utf-8")
    return table, written + [out / "comparison.md"]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: riskpo-train compare RUN_DIR [RUN_DIR ...] [--out DIR]."""
    parser = argparse.ArgumentParser(
        prog="riskpo-train compare",
        description="Plot training curves of runs on shared axes and tabulate "
                    "their final numbers (comparison.md).")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run output directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write the PNGs and comparison.md (default: the parent "
                             "of the first RUN_DIR); the table is also printed, and the "
                             "files written are listed on stderr")
    parser.add_argument("--reference", metavar="RUN_DIR", default=None,
                        help="a run whose first evaluation sets each test question's "
                             "difficulty bucket (e.g. the warm-up's): adds Pass@k per bucket")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not Path(run).is_dir():
            parser.error(f"no such run directory: {run}")
        if not (Path(run) / METRICS_FILE).is_file():
            parser.error(f"{run}: no {METRICS_FILE} (not a run directory?)")
    try:
        table, written = compare_files(args.runs, args.out, args.reference)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 1
    print(table, end="")
    # On stderr: stdout stays the markdown table, fit for `> table.md`.
    print(f"{parser.prog}: wrote {len(written)} files to {written[-1].parent.resolve()}: "
          f"{', '.join(path.name for path in written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
