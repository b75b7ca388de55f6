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
