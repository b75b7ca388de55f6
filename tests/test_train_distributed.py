"""FSDP2 parity: one update on fixed rollouts gives the same loss and weights on
one process and on two FSDP processes (gloo, CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from riskpo_kernels.common import AGGREGATIONS

pytest.importorskip("transformers")

WORKER = Path(__file__).with_name("fsdp_parity_worker.py")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parent.parent), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_one_update_matches_on_one_and_two_fsdp_processes(tmp_path):
    single, sharded = tmp_path / "single.pt", tmp_path / "fsdp.pt"
    run = subprocess.run([sys.executable, str(WORKER), str(single)], env=_env(),
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(WORKER), str(sharded)], env=_env(),
                         capture_output=True, text=True, timeout=180)
    # Exit code 0 from both workers, not an abort in interpreter teardown.
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = torch.load(single), torch.load(sharded)
    # Every aggregation mode (with SGD), and token-mean with AdamW.
    assert one.keys() == two.keys() and len(one) == len(AGGREGATIONS) + 1
    for (agg, optimizer), a in one.items():
        b = two[agg, optimizer]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), agg
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5), agg
        assert a["clipfrac"] == pytest.approx(b["clipfrac"], rel=1e-5), agg
        assert a["grad_norm"] > 0 and a["clipfrac"] > 0  # the update did something
        assert a["weights"].keys() == b["weights"].keys()
        for name, w in a["weights"].items():
            if optimizer == "sgd":
                torch.testing.assert_close(b["weights"][name], w, rtol=1e-5, atol=1e-7,
                                           msg=lambda m, n=name, g=agg: f"{g} {n}: {m}")
            elif not name.endswith("k_proj.bias"):
                # AdamW's first step is lr * g / (|g| + eps): where |g| ~ eps it
                # turns rounding into O(lr) changes, so compare whole tensors. The
                # key bias is left out: its exact gradient is zero (softmax ignores
                # a shift shared by all keys), so AdamW moves it by +-lr of noise.
                error = (b["weights"][name] - w).norm() / w.norm()
                assert error <= 1e-5, (agg, name, error.item())


@pytest.mark.parametrize("procs,param_dtype", [(2, "float32"), (1, "bfloat16")])
def test_the_trainer_runs_and_exits_cleanly_under_torchrun(tmp_path, procs, param_dtype):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
           "--standalone",
           "-m", "riskpo_train", "--out", str(out), "--warmup-cache", str(tmp_path / "cache"),
           "--warmup-steps", "20", "--tiny-hidden-size", "32", "--task-test-size", "20",
           "--rl-steps", "2", "--prompts-per-step", "10", "--group-size", "4",
           "--eval-questions", "5", "--eval-samples", "2", "--eval-every", "1",
           "--kl-coef", "0.05", "--param-dtype", param_dtype, "--no-progress"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    evals = [r for r in records if r["kind"] == "eval"]
    # 5 questions (split 3 + 2 over two ranks) counted once each.
    assert [r["questions"] for r in evals] == [5, 5, 5]
    assert all("kl" in r and r["kl"] >= 0 for r in train)
    assert all(math.isfinite(r["loss"]) and r["skipped_updates"] == 0 for r in train)
    # Mixed precision keeps float32 master weights: the checkpoint holds them.
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert all(w.dtype == torch.float32 for w in state["model"].values())
    assert (out / "final_model" / "config.json").is_file()


def test_mixed_precision_without_torchrun_is_refused():
    from riskpo_train.distributed import DistContext, shard_policy

    with pytest.raises(ValueError, match="--param-dtype bfloat16 .* torchrun"):
        shard_policy(torch.nn.Module(), DistContext(), "bfloat16")
