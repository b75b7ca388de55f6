"""The benchmark scripts keep running: a quick pass, no CSV written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_advantages_quick(tmp_path):
    csv = tmp_path / "advantages.csv"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_advantages.py"), "--quick",
                          "--csv", str(csv)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compiled op" in out.stdout and "loop estimator" in out.stdout
    header, *rows = csv.read_text().splitlines()
    assert header.startswith("timestamp,commit,device,torch") and rows


def test_bench_policy_loss_quick(tmp_path):
    csv = tmp_path / "policy_loss.csv"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_policy_loss.py"), "--quick",
                          "--csv", str(csv)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for method in ("plain GRPO loss", "riskpo logits", "riskpo fused-linear", "three matmuls"):
        assert method in out.stdout
    header, *rows = csv.read_text().splitlines()
    assert header.startswith("timestamp,commit,device,torch") and len(rows) >= 4
    assert all("nan" not in row.split(",")[12] for row in rows), rows  # every peak was measured
