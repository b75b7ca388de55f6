"""``make demo``: RiskPO's published math recipe against GRPO on the embedded task.

1. Supervised warm-up of the tiny model (cached in ``runs/warmup-cache``), and
   its test-split evaluation (``OUT/warmup``): each test question's pass rate
   there is its difficulty bucket.
2. For every seed, the same RL steps with ``--algo riskpo`` and ``--algo
   grpo`` from that checkpoint, ``--jobs`` runs at a time. Both runs take every
   setting from ``DEMO_OPTIONS`` (the math recipe, scaled to the task); only
   the advantage differs.
3. ``riskpo-train compare`` of all runs: plots, ``seeds.png`` (mean ± std over
   seeds) and ``comparison.md`` (with Pass@k per difficulty bucket) in OUT,
   the table printed.

Arguments after ``--`` go to every training run (and override DEMO_OPTIONS).

Every run's CPU arithmetic is fixed here, not left to the machine
(docs/demo/determinism.md): ``--threads`` intra-op threads per run, and with
``--isa avx2`` (the default where the CPU has AVX2) the same vector kernels
on every x86-64 CPU, whatever it detects (AVX-512 or not). The settings and
the library versions go to ``OUT/environment.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


# The published math recipe (riskpo_kernels/recipes.py) with what a tiny model
# on a 2-core machine needs instead: 100 prompts per step (20 bundles of 5, not
# 1024 prompts) and the learning rate that the sweep in docs/experiments/lr-sweep
# picked for both algorithms alike (the recipe's 1e-6 suits a 1.5B model that
# starts at its answers, not a 0.2M-parameter one). The task mixes addition and
# multiplication so that the warm-up model leaves headroom at Pass@1 and at
# Pass@32 (docs/experiments/README.md, "task").
DEMO_OPTIONS = {
    "recipe": "math", "prompts_per_step": 100, "lr": 3e-4, "task_operators": "+*",
    "warmup_steps": 2500, "eval_samples": 32, "eval_every": 10,
}
DEMO_RL_STEPS = 60
# The warm-up's evaluation sets each test question's difficulty bucket. Its
# samples must not be the ones a run's step-0 evaluation scores (a run's
# evaluation samples depend on its seed), or the buckets would select on the
# very outcomes they report: a seed that no run uses.
BUCKET_SEED = 999_983


# What pins a CPU run's arithmetic to one code path. ATen picks its vector
# kernels (softmax, reductions, elementwise) by the CPU: AVX-512 ones round
# differently from AVX2 ones, and 60 steps of training turn the last bit into a
# different table. MKL_CBWR pins MKL's GEMM branch likewise (on AMD CPUs its
# default is already AVX2), ONEDNN_MAX_CPU_ISA oneDNN's. Measured in
# docs/demo/determinism.md; the thread count, by contrast, changed no bit.
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
                    "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def cpu_has_avx2() -> bool:
    """Whether this is an x86-64 CPU with AVX2 (read from /proc/cpuinfo, or
    from torch's own detection where there is none)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        import torch

        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def default_isa() -> str:
    return "avx2" if cpu_has_avx2() else "native"


def run_env(threads: int, isa: str) -> dict:
    """The environment variables a run gets: ``threads`` intra-op threads
    (OpenMP and MKL), the ``isa`` pins (``native``: none)."""
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    if isa not in ("native", *ISA_ENV):
        raise ValueError(f"isa must be native or {', '.join(ISA_ENV)}, got {isa!r}")
    if isa != "native" and not cpu_has_avx2():
        raise ValueError(f"isa {isa!r} needs an x86-64 CPU with AVX2; this one has none "
                         "(use --isa native)")
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            **ISA_ENV.get(isa, {})}


def describe_environment(env: dict) -> dict:
    """What a run's numbers depend on beyond its config: the variables set
    above, and what a process started with them reports (threads, ATen's CPU
    capability, library versions, the CPU)."""
    probe = ("import json, platform, sys, torch, transformers, tokenizers, numpy\n"
             "print(json.dumps({'torch': torch.__version__, 'transformers': "
             "transformers.__version__, 'tokenizers': tokenizers.__version__, "
             "'numpy': numpy.__version__, 'python': platform.python_version(), "
             "'intra_op_threads': torch.get_num_threads(), "
             "'aten_cpu_capability': torch.backends.cpu.get_cpu_capability()}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env={**os.environ, **env}, check=True)
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip()
                   for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"env": env, **json.loads(done.stdout), "cpu": cpu, "cpu_count": os.cpu_count(),
            "machine": platform.machine()}


def demo_options(**overrides) -> dict:
    """DEMO_OPTIONS with ``overrides`` (option: value) applied."""
    return {**DEMO_OPTIONS, **overrides}


def _command(out: Path, extra: list[str], **options) -> list[str]:
    cmd = [sys.executable, "-m", "riskpo_train", "--out", str(out), "--no-progress"]
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    return cmd + extra


def default_threads(parallel: int) -> int:
    """Intra-op threads per run: the cores shared among the runs at a time
    (one thread each: two runs on two cores beat two fighting over both).
    It depends on the machine, never on its load, and no result depends on it."""
    return max(1, (os.cpu_count() or 1) // max(1, parallel))


def _forward_progress(name: str, text: str) -> None:
    """Echo a run's warm-up progress lines (the rest stays in its train.log)."""
    for line in text.splitlines():
        if line.startswith(("warm-up step", "supervised warm-up")):
            print(f"  {name}: {line}", flush=True)


def _run_all(jobs: list[tuple[Path, list[str]]], parallel: int, *, threads: int | None = None,
             isa: str | None = None) -> None:
    """Run the commands, ``parallel`` at a time, each with ``threads``
    intra-op threads (default :func:`default_threads`) and the ``isa`` pins
    (default :func:`default_isa`); each logs to OUT/train.log."""
    env = {**os.environ, **run_env(default_threads(parallel) if threads is None else threads,
                                   default_isa() if isa is None else isa)}
    pending, running, failed = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            out, cmd = pending.pop(0)
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            log = open(out / "train.log", "w")  # noqa: SIM115 (closed when the run ends)
            tail = open(out / "train.log")  # noqa: SIM115 (likewise)
            print(f"  started {out.name}", flush=True)
            running.append((out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                  env=env), log, tail, time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            out, proc, log, tail, began = item
            finished = proc.poll() is not None
            _forward_progress(out.name, tail.read() if finished else _whole_lines(tail))
            if not finished:
                continue
            running.remove(item)
            log.close()
            tail.close()
            print(f"  finished {out.name} in {time.perf_counter() - began:.0f} s "
                  f"(exit {proc.returncode})", flush=True)
            if proc.returncode:
                failed.append(out)
    if failed:
        for out in failed:
            tail = (out / "train.log").read_text().splitlines()[-20:]
            print(f"--- {out / 'train.log'} (last lines)\n" + "\n".join(tail), file=sys.stderr)
        raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(o.name for o in failed)}")


def _whole_lines(file) -> str:
    """What ``file`` has gained up to its last newline (the rest is reread later)."""
    at = file.tell()
    text = file.read()
    cut = text.rfind("\n") + 1
    file.seek(at + len(text[:cut].encode()))
    return text[:cut]


def split_at_dashes(argv) -> tuple[list[str], list[str]]:
    """(our arguments, the training runs' arguments): those after ``--``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    return argv[:argv.index("--")], argv[argv.index("--") + 1:]


def main(argv=None) -> int:
    argv, extra = split_at_dashes(argv)
    parser = argparse.ArgumentParser(prog="python -m riskpo_train.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--bucket-seed", type=int, default=BUCKET_SEED,
                        help="seed of the warm-up evaluation that sets the difficulty buckets")
    parser.add_argument("--rl-steps", type=int, default=DEMO_RL_STEPS)
    parser.add_argument("--warmup-cache", default="runs/warmup-cache")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="training runs at a time")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads of each RL run (default: the cores over --jobs)")
    parser.add_argument("--warmup-threads", type=int, default=None,
                        help="intra-op threads of the warm-up, which runs alone (default: "
                             "--jobs times --threads); on a busy CPU 1 is faster")
    parser.add_argument("--isa", choices=("avx2", "native"), default=default_isa(),
                        help="avx2: the same CPU kernels on every x86-64 CPU with AVX2 (the "
                             "default there); native: whatever torch and MKL pick for this CPU")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    for flag in ("threads", "warmup_threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    threads = default_threads(args.jobs) if args.threads is None else args.threads
    warmup_threads = threads * args.jobs if args.warmup_threads is None else args.warmup_threads
    try:
        run_env(threads, args.isa)
    except ValueError as err:
        parser.error(f"--isa: {err}")
    out = Path(args.out)
    began = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    # One probe, of the RL runs' environment: the warm-up's differs in its thread count only.
    rl_env = describe_environment(run_env(threads, args.isa))
    environment = {"isa": args.isa, "warmup": {"env": run_env(warmup_threads, args.isa)},
                   "rl": rl_env}
    (out / "environment.json").write_text(json.dumps(environment, indent=2) + "\n")
    print(f"CPU arithmetic: isa {args.isa} (ATen {rl_env['aten_cpu_capability']}), "
          f"{warmup_threads} thread(s) for the warm-up, {threads} per RL run; "
          f"torch {rl_env['torch']}, transformers {rl_env['transformers']} "
          f"-> {out / 'environment.json'}", flush=True)

    print(f"[1/3] warm-up and its evaluation -> {out / 'warmup'}", flush=True)
    _run_all([(out / "warmup", _command(out / "warmup", extra, rl_steps=0, seed=args.bucket_seed,
                                        warmup_cache=args.warmup_cache,
                                        **demo_options()))], 1,
             threads=warmup_threads, isa=args.isa)

    print(f"[2/3] RL: {args.rl_steps} steps, riskpo and grpo, seeds {args.seeds}", flush=True)
    jobs = [(out / f"{algo}-seed{seed}",
             _command(out / f"{algo}-seed{seed}", extra, algo=algo, seed=seed,
                      rl_steps=args.rl_steps, warmup_cache=args.warmup_cache,
                      **demo_options()))
            for seed in args.seeds for algo in ("riskpo", "grpo")]
    _run_all(jobs, args.jobs, threads=threads, isa=args.isa)

    print("[3/3] comparison", flush=True)
    from .compare import compare

    table = compare([path for path, _ in jobs], out_dir=out, reference=out / "warmup")
    print(table)
    print(f"plots and comparison.md in {out}; {time.perf_counter() - began:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
