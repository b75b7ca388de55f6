"""riskpo_train.compare on synthetic run directories: loading, table, plots, CLI."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from riskpo_train import compare as cmp

STEPS = 12
EVAL_EVERY = 4
K = 4
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("reward.png", "pass1.png", "passk.png", "entropy.png", "clipfrac.png",
         "overview.png")

# The plots need matplotlib (make test installs it; a bare GPU image may lack it).
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed")


def _train(algo: str, seed: int, step: int) -> dict:
    off = 0.013 * seed + (0.05 if algo == "riskpo" else 0.0)
    rec = {"kind": "train", "step": step, "reward_mean": 0.2 + 0.03 * step + off,
           "pass@1": 0.1 + 0.02 * step + off, "pass@k": 0.3 + 0.025 * step + off,
           "entropy": 1.5 - 0.05 * step - off, "clipfrac": 0.01 + 0.002 * step + off / 10,
           "approx_kl": 0.001 * step, "loss": 0.5 - 0.01 * step, "grad_norm": 1.0,
           "tokens_per_s": 1000.0}
    if algo == "riskpo":
        rec |= {"q_lo": 0.1 + 0.01 * step + off, "q_hi": 0.6 + 0.015 * step + off}
    return rec


def _eval(algo: str, seed: int, step: int) -> dict:
    off = 0.017 * seed + (0.04 if algo == "riskpo" else 0.0)
    return {"kind": "eval", "step": step, "pass@1": 0.15 + 0.02 * step + off,
            "pass@k": 0.35 + 0.02 * step + off, "k": K,
            "reward_mean": 0.25 + 0.02 * step + off, "entropy": 1.4 - 0.04 * step - off}


def _write_run(root: Path, dirname: str, algo: str, seed: int, *, summary: bool,
               damaged: bool = False) -> dict:
    """A run directory; returns the final numbers the table must show.

    damaged: no summary.json but config.json, a NaN reward and a null entropy in
    the middle, a null clipfrac in the last train record, a truncated last line.
    """
    d = root / dirname
    d.mkdir()
    train = [_train(algo, seed, s) for s in range(STEPS)]
    evals = [_eval(algo, seed, s) for s in range(0, STEPS, EVAL_EVERY)]
    if damaged:
        train[5]["reward_mean"] = float("nan")
        train[6]["entropy"] = None
        train[-1]["clipfrac"] = None
    records = []
    for s in range(STEPS):
        records.append(train[s])
        if s % EVAL_EVERY == 0:
            records.append(evals[s // EVAL_EVERY])
    lines = [json.dumps(r) for r in records]
    if damaged:
        partial = json.dumps(_train(algo, seed, STEPS) | {"reward_mean": 9.0})
        lines.append(partial[: len(partial) // 2])
    (d / "metrics.jsonl").write_text("\n".join(lines) + ("" if damaged else "\n"))

    if summary:
        # The final test eval is a separate, larger one: its numbers differ from
        # the last eval record, so the table must take them from the summary.
        final_eval = {"pass@1": evals[-1]["pass@1"] + 0.011, "k": K,
                      "pass@k": evals[-1]["pass@k"] + 0.007,
                      "entropy": evals[-1]["entropy"] - 0.003,
                      "reward_mean": evals[-1]["reward_mean"]}
        (d / "summary.json").write_text(json.dumps(
            {"algo": algo, "seed": seed, "steps": STEPS, "final_eval": final_eval,
             "final_train": train[-1], "wall_s": 12.5}))
        return {"steps": STEPS, "pass@1": final_eval["pass@1"],
                "pass@k": final_eval["pass@k"], "entropy": final_eval["entropy"],
                "reward": train[-1]["reward_mean"], "clipfrac": train[-1]["clipfrac"]}
    if damaged:
        (d / "config.json").write_text(json.dumps({"algo": algo, "seed": seed, "lr": 1e-6}))
    return {"steps": STEPS - 1, "pass@1": evals[-1]["pass@1"],
            "pass@k": evals[-1]["pass@k"], "entropy": evals[-1]["entropy"],
            "reward": train[-1]["reward_mean"],
            "clipfrac": train[-2]["clipfrac"] if damaged else train[-1]["clipfrac"]}


@pytest.fixture
def runs(tmp_path):
    """{name: (path, expected final numbers)} for riskpo 0, riskpo 1 (damaged), grpo 0."""
    root = tmp_path / "out"
    root.mkdir()
    return {
        "riskpo seed 0": (root / "rp0", _write_run(root, "rp0", "riskpo", 0, summary=True)),
        "riskpo seed 1": (root / "rp1", _write_run(root, "rp1", "riskpo", 1, summary=False,
                                                   damaged=True)),
        "grpo seed 0": (root / "gr0", _write_run(root, "gr0", "grpo", 0, summary=True)),
    }


def _paths(runs):
    return [path for path, _ in runs.values()]


def _rows(table: str) -> dict[str, list[str]]:
    """First cell -> the other cells, for every row of every markdown table."""
    rows = {}
    for line in table.splitlines():
        if line.startswith("|") and not line.startswith("| :"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def test_load_run_fields(runs):
    path, _ = runs["riskpo seed 0"]
    run = cmp.load_run(path)
    assert (run.path, run.name, run.algo, run.seed) == (path, "riskpo seed 0", "riskpo", 0)
    assert len(run.train) == STEPS and len(run.eval) == STEPS // EVAL_EVERY
    assert [r["step"] for r in run.train] == list(range(STEPS))
    assert all(r["kind"] == "eval" and r["k"] == K for r in run.eval)
    assert run.summary["steps"] == STEPS and run.summary["final_eval"]["k"] == K


def test_load_run_without_summary_uses_config_and_drops_partial_line(runs):
    path, _ = runs["riskpo seed 1"]
    run = cmp.load_run(path)
    assert (run.name, run.algo, run.seed, run.summary) == ("riskpo seed 1", "riskpo", 1, {})
    # The truncated step-STEPS record is dropped; NaN and null survive as data.
    assert [r["step"] for r in run.train] == list(range(STEPS))
    assert math.isnan(run.train[5]["reward_mean"]) and run.train[6]["entropy"] is None


def test_load_run_without_summary_or_config_is_named_by_directory(tmp_path):
    d = tmp_path / "my_run"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps(_train("grpo", 0, 0)) + "\n")
    run = cmp.load_run(d)
    assert (run.name, run.algo, run.seed, len(run.train)) == ("my_run", None, None, 1)


def test_load_run_without_metrics_names_the_directory(tmp_path):
    d = tmp_path / "empty_run"
    d.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_run.*metrics.jsonl"):
        cmp.load_run(d)
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        cmp.load_run(tmp_path / "no_such_run")


def test_malformed_middle_line_names_file_and_line(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    lines = [json.dumps(_train("grpo", 0, s)) for s in range(4)]
    lines[2] = lines[2][:20]
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad[/\\]metrics\.jsonl:3\b"):
        cmp.load_run(d)


def test_summary_table_has_each_runs_final_numbers(runs):
    table = cmp.summary_table([cmp.load_run(p) for p in _paths(runs)])
    header = table.splitlines()[0]
    assert f"Pass@{K}" in header and "Pass@1" in header
    rows = _rows(table)
    for name, (_, want) in runs.items():
        expected = [str(want["steps"])] + [
            f"{want[key]:.3f}" for key in ("pass@1", "pass@k", "entropy", "reward",
                                           "clipfrac")]
        assert rows[name] == expected, name


def test_summary_table_per_algo_mean_and_sample_std(runs):
    table = cmp.summary_table([cmp.load_run(p) for p in _paths(runs)])
    rows = _rows(table)
    riskpo = [runs["riskpo seed 0"][1], runs["riskpo seed 1"][1]]
    expected = ["2"] + [
        f"{statistics.fmean(v):.3f} ± {statistics.stdev(v):.3f}"
        for v in ([w[key] for w in riskpo]
                  for key in ("pass@1", "pass@k", "entropy", "reward", "clipfrac"))]
    assert rows["riskpo"] == expected
    grpo = runs["grpo seed 0"][1]
    assert rows["grpo"] == ["1", f"{grpo['pass@1']:.3f}", f"{grpo['pass@k']:.3f}",
                            f"{grpo['entropy']:.3f}", f"{grpo['reward']:.3f}",
                            f"{grpo['clipfrac']:.3f}"]


def test_summary_table_without_repeated_algo_has_one_table(runs):
    table = cmp.summary_table([cmp.load_run(runs[n][0]) for n in ("riskpo seed 0",
                                                                  "grpo seed 0")])
    assert "±" not in table and "riskpo" not in _rows(table)


def test_summary_table_missing_values_are_na(tmp_path):
    d = tmp_path / "train_only"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps(_train("grpo", 0, 0)) + "\n")
    rows = _rows(cmp.summary_table([cmp.load_run(d)]))
    assert rows["train_only"][1:4] == ["n/a", "n/a", "n/a"]
    assert rows["train_only"][4] == f"{_train('grpo', 0, 0)['reward_mean']:.3f}"


@needs_matplotlib
def test_styles_colour_by_algo_and_vary_by_seed(runs):
    loaded = [cmp.load_run(p) for p in _paths(runs)]
    styles = cmp._styles(loaded)
    assert styles[0].color == styles[1].color != styles[2].color
    assert styles[0].linestyle != styles[1].linestyle


def _panel_lines(runs, stem):
    """(train lines, test lines) as (x, y) lists, drawn by the panel `stem`."""
    from matplotlib.figure import Figure

    panel = next(p for p in cmp._PANELS if p[0] == stem)
    ax = Figure().subplots()
    cmp._draw_panel(ax, runs, cmp._styles(runs), panel)
    lines = [(list(ln.get_xdata()), list(ln.get_ydata()), ln.get_marker())
             for ln in ax.get_lines()]
    return ([(x, y) for x, y, m in lines if m in ("None", "", None)],
            [(x, y) for x, y, m in lines if m not in ("None", "", None)])


@needs_matplotlib
def test_panels_draw_train_curves_and_test_points(runs):
    loaded = [cmp.load_run(p) for p in _paths(runs)]
    train, test = _panel_lines(loaded, "pass1")
    assert train == [([r["step"] for r in run.train], [r["pass@1"] for r in run.train])
                     for run in loaded]
    assert test == [([r["step"] for r in run.eval], [r["pass@1"] for r in run.eval])
                    for run in loaded]
    # rp1's NaN reward (step 5) and null entropy (step 6) are left out, not drawn as 0.
    train, _ = _panel_lines(loaded, "reward")
    assert train[1][0] == [s for s in range(STEPS) if s != 5]
    train, _ = _panel_lines(loaded, "entropy")
    assert train[1][0] == [s for s in range(STEPS) if s != 6]
    train, test = _panel_lines(loaded, "clipfrac")
    assert len(train) == 3 and test == []


def _check_png(path: Path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path
    assert image[..., :3].std() > 0, f"{path} is a blank image"


def _quantile_panel(overview: Path):
    """The pixels of overview.png's bottom-right (sixth) panel, frame included."""
    import matplotlib.image

    image = matplotlib.image.imread(overview)[..., :3]
    h, w, _ = image.shape
    return image[int(0.55 * h):int(0.85 * h), int(0.70 * w):int(0.97 * w)]


@needs_matplotlib
def test_plot_runs_writes_valid_pngs(runs, tmp_path):
    out = tmp_path / "plots"
    written = cmp.plot_runs([cmp.load_run(p) for p in _paths(runs)], out)
    assert sorted(p.name for p in written) == sorted(PLOTS)
    for path in written:
        assert path.parent == out
        _check_png(path)
    assert (_quantile_panel(out / "overview.png") < 0.99).mean() > 0.05


@needs_matplotlib
def test_plot_runs_without_riskpo_blanks_the_quantile_panel(runs, tmp_path):
    written = cmp.plot_runs([cmp.load_run(runs["grpo seed 0"][0])], tmp_path / "g")
    for path in written:
        _check_png(path)
    assert _quantile_panel(tmp_path / "g" / "overview.png").min() > 0.99


@needs_matplotlib
def test_plot_runs_switches_to_agg(runs, tmp_path):
    import matplotlib

    matplotlib.use("svg")
    cmp.plot_runs([cmp.load_run(runs["grpo seed 0"][0])], tmp_path / "g")
    assert matplotlib.get_backend().lower() == "agg"


@needs_matplotlib
def test_compare_writes_plots_and_table_next_to_the_runs(runs):
    paths = _paths(runs)
    table = cmp.compare(paths)
    out = paths[0].parent
    assert (out / "comparison.md").read_text() == table
    for name in PLOTS:
        _check_png(out / name)
    assert all(name in table for name in runs)


@needs_matplotlib
def test_compare_disambiguates_repeated_names(tmp_path):
    for d in ("a", "b"):
        _write_run(tmp_path, d, "grpo", 0, summary=True)
    rows = _rows(cmp.compare([tmp_path / "a", tmp_path / "b"], tmp_path / "out"))
    assert "grpo seed 0 (a)" in rows and "grpo seed 0 (b)" in rows


@needs_matplotlib
def test_main_prints_the_table(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert cmp.main([*map(str, _paths(runs)), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert printed == (out / "comparison.md").read_text()
    assert all(name in printed for name in runs)
    assert all((out / name).is_file() for name in PLOTS)
    # Where the files went, on stderr (stdout stays the table): every file, once.
    err = captured.err.strip()
    assert err.startswith(f"riskpo-train compare: wrote {len(PLOTS) + 2} files to "
                          f"{out.resolve()}: ")
    listed = err.split(": ")[-1].split(", ")
    assert sorted(listed) == sorted([*PLOTS, "seeds.png", "comparison.md"])
    assert all((out / name).is_file() for name in listed)


@needs_matplotlib
def test_compare_files_lists_what_it_wrote(runs, tmp_path):
    table, written = cmp.compare_files(_paths(runs), tmp_path / "o")
    assert written[-1] == tmp_path / "o" / "comparison.md"
    assert written[-1].read_text() == table
    assert {p.name for p in written} == {*PLOTS, "seeds.png", "comparison.md"}
    assert all(p.parent == tmp_path / "o" and p.is_file() for p in written)


def test_main_missing_directory_exits_2(runs, tmp_path, capsys):
    missing = tmp_path / "not_a_run"
    with pytest.raises(SystemExit) as exc:
        cmp.main([str(runs["grpo seed 0"][0]), str(missing)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "not_a_run" in err and "riskpo-train compare" in err


def test_main_directory_without_metrics_exits_2(tmp_path, capsys):
    (tmp_path / "no_metrics").mkdir()
    with pytest.raises(SystemExit) as exc:
        cmp.main([str(tmp_path / "no_metrics")])
    assert exc.value.code == 2
    assert "no_metrics" in capsys.readouterr().err


def test_import_does_not_load_matplotlib():
    code = "import sys, riskpo_train.compare; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "False"


# --- the CLI without the [train] extra --------------------------------------------------

def test_compare_without_matplotlib_names_the_extra(runs, tmp_path, monkeypatch, capsys):
    from riskpo_train.__main__ import main

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ModuleNotFoundError
    assert main(["compare", *map(str, _paths(runs)), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("riskpo-train: error: the trainer needs matplotlib (no module named "
                   "'matplotlib'), one of its optional dependencies: "
                   'pip install "riskpo-kernels[train]"')


@pytest.mark.parametrize("module, distribution", [("tokenizers", "tokenizers"),
                                                  ("transformers", "transformers")])
def test_training_without_the_extra_names_it(tmp_path, monkeypatch, capsys, module, distribution):
    """The first import of the trainer's model code fails as on a plain install,
    before any step runs."""
    from riskpo_train.__main__ import main

    monkeypatch.setitem(sys.modules, module, None)
    assert main(["--out", str(tmp_path / "run"), "--warmup-steps", "0", "--rl-steps", "1",
                 "--device", "cpu", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert (f"riskpo-train: error: the trainer needs {distribution} "
            f"(no module named {module!r})") in err
    assert err.strip().endswith('pip install "riskpo-kernels[train]"')
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_other_missing_modules_keep_their_traceback():
    from riskpo_train.__main__ import missing_train_extra

    assert missing_train_extra(ModuleNotFoundError("x", name="safetensors")) is None
    assert missing_train_extra(ImportError("cannot import name 'Qwen2Config'",
                                           name="transformers")) is None
    assert "pyyaml" in missing_train_extra(ModuleNotFoundError("x", name="yaml"))
    assert "matplotlib" in missing_train_extra(ModuleNotFoundError("x", name="matplotlib.pyplot"))
