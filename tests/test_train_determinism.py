"""A seeded run's numbers depend on its seed and settings, not on how many
threads it has or what else the CPU is doing (docs/demo/determinism.md);
they do depend on the CPU kernels, which the demo pins and the warm-up cache
keys on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from riskpo_train import demo, warmup  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The clock's fields: everything else a record holds must be bitwise equal.
TIMING = {"tokens_per_s", "step_s"}


def _train(out: Path, cache: Path, env: dict) -> subprocess.CompletedProcess:
    # The embedded model at its real width (128): its GEMMs and elementwise ops
    # are large enough for MKL and ATen to split them over two threads, which
    # a narrower toy's would not be.
    cmd = [sys.executable, "-m", "riskpo_train", "--out", str(out), "--no-progress",
           "--warmup-cache", str(cache), "--recipe", "math", "--task-operators", "+*",
           "--warmup-steps", "40", "--task-test-size", "20", "--prompts-per-step", "10",
           "--group-size", "4", "--lr", "3e-4", "--eval-questions", "10", "--eval-samples", "4",
           "--eval-every", "1", "--rl-steps", "2"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_seeded_run_is_bitwise_the_same_on_one_thread_and_on_two_beside_a_busy_core(tmp_path):
    isa = demo.default_isa()  # the demo's pins where this CPU has them
    quiet = _train(tmp_path / "quiet", tmp_path / "cache-quiet", demo.run_env(1, isa))
    assert quiet.returncode == 0, quiet.stdout[-2000:] + quiet.stderr[-2000:]
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        loaded = _train(tmp_path / "loaded", tmp_path / "cache-loaded", demo.run_env(2, isa))
    finally:
        spin.kill()
        spin.wait()
    assert loaded.returncode == 0, loaded.stdout[-2000:] + loaded.stderr[-2000:]
    # Each run built its own warm-up (separate caches): the weights, then every
    # metric of both evaluations and both RL steps, then the final weights.
    warm = [next((tmp_path / c).glob("warmup-*")) / "model.safetensors"
            for c in ("cache-quiet", "cache-loaded")]
    assert warm[0].read_bytes() == warm[1].read_bytes()
    quiet_records, loaded_records = _records(tmp_path / "quiet"), _records(tmp_path / "loaded")
    assert [r["kind"] for r in quiet_records] == ["eval", "train", "eval", "train", "eval"]
    assert quiet_records == loaded_records
    final = [tmp_path / run / "final_model" / "model.safetensors" for run in ("quiet", "loaded")]
    assert final[0].read_bytes() == final[1].read_bytes()
    assert "warm-up step 40/40" in quiet.stderr  # the warm-up's progress line


def test_the_warmup_cache_is_keyed_on_the_cpu_kernels(monkeypatch, tmp_path):
    settings = {"task_digits": 2, "warmup_steps": 10}
    monkeypatch.setattr(warmup.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    avx512 = warmup.cached_model_dir(tmp_path, settings)
    assert avx512 == warmup.cached_model_dir(tmp_path, dict(settings))
    monkeypatch.setattr(warmup.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    avx2 = warmup.cached_model_dir(tmp_path, settings)
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    pinned = warmup.cached_model_dir(tmp_path, settings)
    assert len({avx512, avx2, pinned}) == 3
    assert warmup.cached_model_dir(tmp_path, {**settings, "warmup_steps": 11}) != pinned


@pytest.mark.skipif(not demo.cpu_has_avx2(), reason="the avx2 pin needs an x86-64 CPU with AVX2")
def test_the_avx2_pin_reaches_a_run_and_the_thread_count_too():
    probe = ("import torch; print(torch.backends.cpu.get_cpu_capability(), "
             "torch.get_num_threads())")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, **demo.run_env(1, "avx2")}, check=True)
    assert run.stdout.split() == ["AVX2", "1"]
    assert demo.run_env(1, "native") == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.mark.parametrize("threads, isa, message", [
    (0, "native", "threads must be an integer >= 1, got 0"),
    (1.5, "native", "threads must be an integer >= 1, got 1.5"),
    (True, "native", "threads must be an integer >= 1, got True"),
    (1, "avx512", "isa must be native or avx2, got 'avx512'"),
])
def test_run_env_refuses_bad_settings_by_name(threads, isa, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        demo.run_env(threads, isa)


def test_the_warmup_reports_its_progress_and_the_reports_change_no_weight():
    import torch

    from riskpo_train.model import build_char_tokenizer, build_tiny_model
    from riskpo_train.task import ArithmeticTask

    train, _ = ArithmeticTask(1, "+", 10, 0).split()
    tokenizer = build_char_tokenizer()
    lines, weights, losses = [], [], []
    for every in (None, 0.0):  # never, and at every step
        model = build_tiny_model(tokenizer, hidden_size=16, num_layers=1, seed=0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            losses.append(warmup.supervised_warmup(model, tokenizer, train, steps=5, lr=1e-2,
                                                   batch_size=8, seed=0, report_every_s=every,
                                                   report=lines.append))
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert [line.split(" loss ")[0] for line in lines] == [f"warm-up step {s}/5"
                                                           for s in range(1, 6)]
    assert all(" elapsed " in line and line.endswith(" s") and " ETA " in line for line in lines)
    assert losses[0] == losses[1]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
