"""``make demo``: the embedded comparison of RiskPO and GRPO.

1. Supervised warm-up of the tiny model (cached in ``runs/warmup-cache``), and
   its test-split evaluation (``OUT/warmup``).
2. For every seed, the same number of RL steps with ``--algo riskpo`` and
   ``--algo grpo`` from that checkpoint, ``--jobs`` runs at a time.
3. ``riskpo-train compare`` of all runs: plots and ``comparison.md`` in OUT,
   the table printed.

Arguments after ``--`` go to every training run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _command(out: Path, extra: list[str], **options) -> list[str]:
    cmd = [sys.executable, "-m", "riskpo_train", "--out", str(out), "--no-progress"]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd + extra


def _run_all(jobs: list[tuple[Path, list[str]]], parallel: int) -> None:
    """Run the commands, ``parallel`` at a time; each logs to OUT/train.log."""
    env = dict(os.environ)
    if parallel > 1:  # one thread each: two runs on two cores beat two fighting over both
        env["OMP_NUM_THREADS"] = "1"
    pending, running, failed = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            out, cmd = pending.pop(0)
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            log = open(out / "train.log", "w")  # noqa: SIM115 (closed when the run ends)
            print(f"  started {out.name}", flush=True)
            running.append((out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env), log, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            out, proc, log, began = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            print(f"  finished {out.name} in {time.perf_counter() - began:.0f} s "
                  f"(exit {proc.returncode})", flush=True)
            if proc.returncode:
                failed.append(out)
    if failed:
        for out in failed:
            tail = (out / "train.log").read_text().splitlines()[-20:]
            print(f"--- {out / 'train.log'} (last lines)\n" + "\n".join(tail), file=sys.stderr)
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(o.name for o in failed)}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m riskpo_train.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rl-steps", type=int, default=120)
    parser.add_argument("--warmup-cache", default="runs/warmup-cache")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="training runs at a time")
    args = parser.parse_args(argv)
    out = Path(args.out)
    began = time.perf_counter()

    print(f"[1/3] warm-up and its evaluation -> {out / 'warmup'}", flush=True)
    _run_all([(out / "warmup", _command(out / "warmup", extra, rl_steps=0,
                                        warmup_cache=args.warmup_cache))], 1)

    print(f"[2/3] RL: {args.rl_steps} steps, riskpo and grpo, seeds {args.seeds}", flush=True)
    jobs = [(out / f"{algo}-seed{seed}",
             _command(out / f"{algo}-seed{seed}", extra, algo=algo, seed=seed,
                      rl_steps=args.rl_steps, warmup_cache=args.warmup_cache))
            for seed in args.seeds for algo in ("riskpo", "grpo")]
    _run_all(jobs, args.jobs)

    print("[3/3] comparison", flush=True)
    from .compare import compare

    table = compare([path for path, _ in jobs], out_dir=out)
    print(table)
    print(f"plots and comparison.md in {out}; {time.perf_counter() - began:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
