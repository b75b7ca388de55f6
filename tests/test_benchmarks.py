"""The benchmark scripts keep running: a quick pass, no CSV written."""

from __future__ import annotations

import csv as csvlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _rows(path):
    with open(path, newline="") as f:
        return list(csvlib.DictReader(f))


def test_bench_advantages_quick(tmp_path):
    csv = tmp_path / "advantages.csv"
    # A file of the old header: rewritten once with the new columns, old rows kept.
    csv.write_text("timestamp,commit,device,torch,python,op,impl,P,n,bundle_size,responses,"
                   "median_us,speedup_vs_loop\nt0,c0,d,2.13,3.11,mvar_advantages,x,1,2,5,2,1.0,\n")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_advantages.py"), "--quick",
                          "--loaded", "--csv", str(csv)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "compiled op" in out.stdout and "loop estimator" in out.stdout
    assert "loaded / quiet" in out.stdout
    rows = _rows(csv)
    assert rows[0]["commit"] == "c0" and rows[0]["load"] == ""
    assert {r["load"] for r in rows[1:]} == {"quiet", "one core busy"}


def test_busy_core_spins_on_one_core_and_stops(monkeypatch):
    # On the path while it runs: the spawned child imports `loaded` to find its target.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from loaded import busy_core, busy_core_index

    with busy_core() as proc:
        assert proc.is_alive()
        if busy_core_index() is not None:
            assert os.sched_getaffinity(proc.pid) == {busy_core_index()}
        with open(f"/proc/{proc.pid}/stat") as f:
            before = int(f.read().split()[13])  # utime, clock ticks
        import time
        time.sleep(0.5)
        with open(f"/proc/{proc.pid}/stat") as f:
            after = int(f.read().split()[13])
        assert after > before  # it is spinning, not sleeping
    assert not proc.is_alive()


def test_bench_policy_loss_quick(tmp_path):
    csv = tmp_path / "policy_loss.csv"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_policy_loss.py"), "--quick",
                          "--batch", "both", "--csv", str(csv)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for method in ("plain GRPO loss", "riskpo logits", "riskpo fused-linear", "three matmuls",
                   "three matmuls (valid rows)"):
        assert method in out.stdout
    rows = _rows(csv)
    assert len(rows) >= 12 and {r["batch"] for r in rows} == {"dense", "realistic"}
    assert all(r["peak_extra_mib"] != "nan" for r in rows), rows  # every peak was measured
    realistic = next(r for r in rows if r["batch"] == "realistic")
    # One sequence of 256 positions: u = 0.6, so 40% padding; ~5% of valid tokens clipped.
    assert float(realistic["valid_fraction"]) == pytest.approx(0.6, abs=0.01)
    assert 0 < float(realistic["zero_grad_fraction"]) < 0.15
    assert all(float(r["vs_matmuls_valid"]) > 0 for r in rows)
