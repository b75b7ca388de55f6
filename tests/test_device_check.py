"""benchmarks/device_check.sh --cpu: the dry run of the GPU check keeps working
(every step but the CUDA ones; the build and the test suite left out, since the
suite is what runs this)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent


def test_device_check_dry_run_writes_its_eight_files(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "RISKPO_SKIP_BUILD": "1", "RISKPO_SKIP_TESTS": "1"}
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--cpu"], env=env,
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "FAILED" not in run.stdout
    names = sorted(p.name for p in tmp_path.iterdir())
    # The device tool returns at most 8 files from $OUT.
    assert names == sorted(["machine.txt", "build.log", "pytest.log", "advantages_cpu.csv",
                            "bench_cpu.log", "policy_loss_cpu.csv", "bench_policy_loss_cpu.log",
                            "train_smoke.log"])
    smoke = (tmp_path / "train_smoke.log").read_text()
    assert "riskpo: ok" in smoke and "grpo: ok" in smoke and "fsdp-bf16: ok" in smoke
    assert smoke.count('"kind": "train"') == 9
