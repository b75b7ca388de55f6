"""`make demo` end to end at toy size: warm-up, both algorithms, comparison."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from riskpo_train import demo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_runs_both_algorithms_and_compares_them(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "riskpo_train.demo", "--out", str(out), "--seeds", "0",
           "--rl-steps", "2", "--warmup-cache", str(tmp_path / "cache"), "--",
           "--warmup-steps", "20", "--tiny-hidden-size", "32", "--task-test-size", "20",
           "--prompts-per-step", "10", "--group-size", "4", "--eval-questions", "6",
           "--eval-samples", "2", "--eval-every", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("warmup", "riskpo-seed0", "grpo-seed0"):
        assert (out / name / "summary.json").is_file(), name
    table = (out / "comparison.md").read_text()
    assert "riskpo seed 0" in table and "grpo seed 0" in table
    assert "riskpo seed 0" in run.stdout  # the table is printed
    # The warm-up's progress reaches the console, not only its train.log.
    assert "  warmup: warm-up step 20/20 loss " in run.stdout
    # Every run's threads and CPU kernels are set by the demo and recorded.
    environment = json.loads((out / "environment.json").read_text())
    assert environment["isa"] == demo.default_isa()
    assert environment["rl"]["env"]["OMP_NUM_THREADS"] == str(environment["rl"]["intra_op_threads"])
    assert environment["warmup"]["env"]["OMP_NUM_THREADS"] == str(
        int(environment["rl"]["env"]["OMP_NUM_THREADS"]) * min(2, os.cpu_count() or 1))
    if environment["isa"] == "avx2":
        assert environment["rl"]["aten_cpu_capability"] == "AVX2"
    assert environment["rl"]["torch"] and environment["rl"]["transformers"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "overview.png").stat().st_size > 0


def test_an_experiment_runs_shares_the_base_runs_and_writes_its_docs(tmp_path):
    out, docs = tmp_path / "exp", tmp_path / "docs"
    toy = ["--warmup-steps", "20", "--tiny-hidden-size", "32", "--task-test-size", "20",
           "--prompts-per-step", "10", "--group-size", "4", "--eval-questions", "6",
           "--eval-samples", "2", "--eval-every", "1", "--rl-steps", "1"]
    cmd = [sys.executable, "-m", "riskpo_train.experiments", "credit", "--seeds", "0",
           "--out", str(out), "--docs", str(docs), "--warmup-cache", str(tmp_path / "cache"),
           "--", *toy]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # The demo's RiskPO settings live in base/, shared with other experiments.
    assert (out / "base" / "riskpo-seed0" / "summary.json").is_file()
    assert (out / "credit" / "riskpo-score-seed0" / "summary.json").is_file()
    config = (out / "credit" / "riskpo-score-seed0" / "config.json").read_text()
    assert '"credit": "score"' in config and '"recipe": "math"' in config
    table = (docs / "credit" / "comparison.md").read_text()
    assert "difficulty bucket" in table and "riskpo-score" in table
    # A second call finds every run done and trains nothing.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert again.returncode == 0 and "2 runs, 0 to train" in again.stdout
