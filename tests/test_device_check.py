"""benchmarks/device_check.sh keeps working here, without a GPU: its dry runs
(--cpu, --cpu --quick, past the deadline), the `gpu` marker of tests/conftest.py,
and the pieces of tests/_device_plugin.py (failure log, counts, time limits).

The dry runs point the script's pytest steps at small selections
(RISKPO_CHECK_PYTEST_ARGS): they test the plumbing, not the whole suite again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
# The script's knobs and the plugin's switches: a run of this file inside the
# device check (or with any of them set) must not pass them on.
KNOBS = ("OUT", "DEADLINE_S", "TEST_TIMEOUT", "GPU_TESTS_TIMEOUT", "TESTS_TIMEOUT", "MIN_TESTS_TIME",
         "BENCH_TIMEOUT", "SMOKE_TIMEOUT", "PYTEST_WORKERS", "PYTEST_ADDOPTS", "PYTEST_TIMEOUT")


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("RISKPO_")}
    env["PYTHON"] = sys.executable
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_check(out: Path, *args: str, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=clean_env(OUT=out, **env),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def step_line(summary: str, step: str) -> str:
    line = next((l for l in summary.splitlines() if l.startswith(step + "  ")), None)
    assert line is not None, f"no '{step}' line in the summary:\n{summary}"
    return line


def test_dry_run_writes_its_eight_files(tmp_path):
    pytest.importorskip("transformers")
    run = run_check(tmp_path, "--cpu", RISKPO_SKIP_BUILD=1,
                    RISKPO_CHECK_PYTEST_ARGS="tests/test_risk_core_hand_cases.py",
                    # plumbing, not speed: generous limits for a busy 2-core machine
                    DEADLINE_S=1500, SMOKE_TIMEOUT=400, BENCH_TIMEOUT=300)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert "FAILED" not in run.stdout
    names = sorted(p.name for p in tmp_path.iterdir())
    # The device tool returns at most 8 files from $OUT.
    assert names == sorted(["build.log", "tests.log", "failures.log", "bench.log", "advantages_cpu.csv",
                            "policy_loss_cpu.csv", "train_smoke.log", "summary.txt"])
    smoke = (tmp_path / "train_smoke.log").read_text()
    assert "riskpo: ok" in smoke and "grpo: ok" in smoke and "fsdp-bf16: ok" in smoke
    assert smoke.count('"kind": "train"') == 9

    summary = (tmp_path / "summary.txt").read_text()
    assert run.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])  # printed last
    assert len(summary.splitlines()) <= 40, summary
    # The gpu step got the [cuda] cases only (they skip here), the other step the rest.
    gpu = step_line(summary, "gpu tests")
    other = step_line(summary, "other tests")
    assert " ok " in gpu and " ok " in other, summary
    n_gpu = int(re.search(r"(\d+) collected", gpu).group(1))
    n_other = int(re.search(r"(\d+) collected: (\d+) passed", other).group(1))
    assert 0 < n_gpu < n_other and "failed" not in gpu + other
    for step in ("advantage benchmark", "policy-loss benchmark", "smoke riskpo", "smoke grpo",
                 "smoke fsdp-bf16"):
        assert " ok " in step_line(summary, step), summary
    assert "advantages, median µs" in summary and "policy loss fwd+bwd, median ms" in summary
    tests_log = (tmp_path / "tests.log").read_text()
    assert "##### gpu tests: pytest -m 'gpu'" in tests_log and "##### other tests: pytest -m 'not gpu'" in tests_log
    bench = (tmp_path / "bench.log").read_text()
    assert "##### advantage benchmark" in bench and "##### policy-loss benchmark" in bench


THROWAWAY = """
    import time

    import pytest


    @pytest.mark.gpu
    def test_passes():
        pass


    @pytest.mark.gpu
    def test_fails():
        assert 1 + 1 == 3, "arithmetic is broken"


    @pytest.mark.gpu
    def test_sleeps_too_long():
        time.sleep(60)


    def test_not_a_gpu_test():
        pass
"""


def test_quick_dry_run_reports_a_failing_and_a_timing_out_test(tmp_path):
    tests = tmp_path / "throwaway"
    tests.mkdir()
    (tests / "test_throwaway.py").write_text(textwrap.dedent(THROWAWAY))
    out = tmp_path / "out"
    run = run_check(out, "--cpu", "--quick", timeout=300, RISKPO_SKIP_BUILD=1, TEST_TIMEOUT=2,
                    RISKPO_CHECK_PYTEST_ARGS=tests / "test_throwaway.py")
    assert run.returncode == 1, run.stdout[-5000:] + run.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["build.log", "failures.log", "summary.txt", "tests.log"]

    failures = (out / "failures.log").read_text()
    # The failed test: its name, its traceback and the assertion's message.
    assert re.search(r"^=== FAILED \S*test_throwaway.py::test_fails ", failures, re.M), failures
    assert "assert 1 + 1 == 3" in failures and "AssertionError: arithmetic is broken" in failures
    # The timed-out one: where it was, and why it stopped (ours, or pytest-timeout's words).
    assert re.search(r"^=== TIMEOUT \S*test_throwaway.py::test_sleeps_too_long ", failures, re.M), failures
    assert "time.sleep(60)" in failures
    assert "timed out after 2 s" in failures or "Timeout (>2.0s)" in failures
    assert "test_passes" not in failures and "test_not_a_gpu_test" not in failures
    assert re.search(r"^##### gpu tests: pytest finished .*1 failed, 1 passed, 1 timeout", failures, re.M)

    summary = (out / "summary.txt").read_text()
    assert run.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    gpu = step_line(summary, "gpu tests")
    assert "FAILED" in gpu and "3 collected: 1 passed, 1 failed, 1 timeout" in gpu, summary
    assert re.search(r"FAILED \S*test_throwaway.py::test_fails: AssertionError: arithmetic is broken", summary)
    assert re.search(r"TIMEOUT \S*test_throwaway.py::test_sleeps_too_long", summary)
    # --quick: no benchmarks, smoke runs or other tests.
    assert "benchmark" not in summary and "smoke" not in summary and "other tests" not in summary


def test_a_run_out_of_time_skips_its_steps_and_says_so(tmp_path):
    run = run_check(tmp_path, "--cpu", timeout=300, RISKPO_SKIP_BUILD=1, DEADLINE_S=1)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("gpu tests", "advantage benchmark", "policy-loss benchmark", "smoke riskpo",
                 "smoke grpo", "smoke fsdp-bf16", "other tests"):
        line = step_line(summary, step)
        assert " skipped " in line and "too little time left" in line, summary
    assert "too little time left before the 1 s deadline" in run.stdout


def test_unknown_argument_is_refused(tmp_path):
    run = run_check(tmp_path, "--gpu-please", timeout=60)
    assert run.returncode == 2 and "unknown argument" in run.stdout


# ---- the `gpu` marker (tests/conftest.py) ------------------------------------------

def collect(marks: str, *files: str) -> set[str]:
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", marks, *files], env=clean_env(), capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    return {line for line in run.stdout.splitlines() if "::" in line}


def test_gpu_marker_takes_the_cuda_and_triton_tests():
    files = ["tests/test_risk_core_kernels.py", "tests/test_risk_core_hand_cases.py",
             "tests/test_riskpo_policy_loss.py", "tests/test_policy_loss_triton.py",
             "tests/test_risk_core_ops.py", "tests/test_policy_loss_fused_linear.py"]
    gpu, rest = collect("gpu", *files), collect("not gpu", *files)
    assert gpu and rest and not gpu & rest
    for nodeid in ("tests/test_riskpo_policy_loss.py::test_cuda_graph_capture_of_the_whole_step",
                   "tests/test_risk_core_kernels.py::test_cuda_no_host_sync_and_graph_capture",
                   "tests/test_risk_core_kernels.py::test_cuda_more_bundles_than_blocks",
                   "tests/test_risk_core_hand_cases.py::test_grpo[cuda]",
                   "tests/test_risk_core_ops.py::test_opcheck_every_op[cuda]"):
        assert nodeid in gpu, nodeid
    assert any(n.startswith("tests/test_risk_core_kernels.py::test_cuda_matches_reference[") for n in gpu)
    assert all("cuda" not in n.lower() and "triton" not in n.lower() for n in rest), sorted(rest)
    assert "tests/test_risk_core_hand_cases.py::test_grpo[cpp]" in rest
    triton = {n for n in gpu | rest if n.startswith("tests/test_policy_loss_triton.py")}
    assert triton and triton <= gpu


# ---- tests/_device_plugin.py, on generated test files ------------------------------------

PLUGIN_CASES = """
    import signal
    import time

    import pytest


    def test_passes():
        pass


    def test_fails():
        print("some output of the failing test")
        assert [1, 2] == [1, 3]


    @pytest.fixture
    def broken():
        raise RuntimeError("the fixture broke")


    def test_errors_in_setup(broken):
        pass


    def test_skips():
        pytest.skip("not here")


    def test_sleeps_too_long():
        time.sleep(30)


    def test_hangs_past_the_signal():
        signal.signal(signal.SIGALRM, signal.SIG_IGN)  # as a hang inside C code would
        time.sleep(30)


    def test_never_reached():
        pass
"""


def run_plugin(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    (tmp_path / "test_cases.py").write_text(textwrap.dedent(PLUGIN_CASES))
    # No conftest there: the plugin comes with -p, as in the device check.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "_device_plugin",
                           "-p", "no:timeout", *args, "test_cases.py"],
                          env=clean_env(PYTHONPATH=ROOT / "tests", **env), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def test_plugin_logs_failures_as_they_happen_and_keeps_counts(tmp_path):
    log, counts = tmp_path / "failures.log", tmp_path / "counts.json"
    run = run_plugin(tmp_path, "-k", "not hangs", RISKPO_FAILURE_LOG=log, RISKPO_TEST_COUNTS=counts,
                     RISKPO_TEST_RUN="cases", RISKPO_TEST_TIMEOUT=1)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-2000:]
    text = log.read_text()
    assert re.search(r"^=== FAILED test_cases.py::test_fails \(call phase", text, re.M), text
    assert "assert [1, 2] == [1, 3]" in text and "some output of the failing test" in text
    assert re.search(r"^=== ERROR test_cases.py::test_errors_in_setup \(setup phase", text, re.M)
    assert "RuntimeError: the fixture broke" in text
    assert re.search(r"^=== TIMEOUT test_cases.py::test_sleeps_too_long ", text, re.M)
    assert "timed out after 1 s" in text and "time.sleep(30)" in text
    assert "test_passes" not in text and "test_skips" not in text
    c = json.loads(counts.read_text())
    assert c["label"] == "cases" and c["finished"] and c["exitstatus"] == 1 and c["collected"] == 6
    assert c["counts"] == {"passed": 2, "failed": 1, "error": 1, "skipped": 1, "timeout": 1}
    assert c["running"] == []
    assert {f["nodeid"].split("::")[1]: f["outcome"] for f in c["failures"]} == {
        "test_fails": "failed", "test_errors_in_setup": "error", "test_sleeps_too_long": "timeout"}
    assert c["slowest"][0][1] == "test_cases.py::test_sleeps_too_long"


def test_plugin_hard_timeout_dumps_the_stacks_and_ends_the_process(tmp_path):
    log, counts = tmp_path / "failures.log", tmp_path / "counts.json"
    run = run_plugin(tmp_path, "-k", "passes or hangs or never", RISKPO_FAILURE_LOG=log,
                     RISKPO_TEST_COUNTS=counts, RISKPO_TEST_TIMEOUT=1, RISKPO_TEST_TIMEOUT_GRACE=1)
    assert run.returncode == 70, run.stdout[-3000:] + run.stderr[-2000:]
    text = log.read_text()
    assert re.search(r"^=== HARD TIMEOUT test_cases.py::test_hangs_past_the_signal still running after 2 s",
                     text, re.M), text
    assert re.search(r'File ".*test_cases.py", line \d+ in test_hangs_past_the_signal', text)
    c = json.loads(counts.read_text())
    assert not c["finished"] and c["running"] == ["test_cases.py::test_hangs_past_the_signal"]
    assert c["counts"] == {"passed": 1}


def test_plugin_is_inert_without_its_variables(tmp_path):
    run = run_plugin(tmp_path, "-k", "passes or fails")
    assert run.returncode == 1 and "1 failed, 1 passed" in run.stdout, run.stdout[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("__")) == ["test_cases.py"]
