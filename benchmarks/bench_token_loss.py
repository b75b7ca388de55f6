"""Per-row PPO math of one fused-linear chunk: token_loss.token_loss_and_grads
(53-66 aten ops, most a launch each on CUDA) against token_loss_triton's
single kernel (issue 18, section 2). Both compute the loss partial and
d loss / d (logp, H) of the chunk's rows from its log-probs and entropies.

Cases: rows 563 (a thin tail chunk), 3534 (a bf16 chunk at V = 151936 under
the 1 GiB logits budget), 4096 and 16384; float32 (the chunks' accumulation
dtype); "old" (PPO with old log-probs) and "old+ref+ent" (with the KL term
and an entropy bonus). Inputs: logp = -6 u, old = logp + N(0, 0.3^2),
ref = logp + N(0, 0.5^2), A ~ N(0, 4), 25% of the weights 0.

Time: R calls back to back, then one synchronize, per call (the host's launch
cost and the card's work pipelined, as in the chunk loop); median and best of
the repeats. Each case first checks the kernel against the definition.

    python benchmarks/bench_token_loss.py --device cuda
    python benchmarks/bench_token_loss.py --cpu      # a smoke run under the interpreter, tiny rows
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CUDA_ROWS = (563, 3534, 4096, 16384)
CPU_ROWS = (64, 1500)
CONFIGS = {"old": dict(kl_coef=0.0, entropy_coef=0.0, ref=False),
           "old+ref+ent": dict(kl_coef=0.05, entropy_coef=0.01, ref=True)}
CSV_COLUMNS = ["timestamp", "commit", "device", "torch", "triton", "rows", "config", "dtype",
               "impl", "median_us", "best_us", "speedup", "max_grad_diff"]


def make_rows(n, device, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 6
    rows = dict(logprobs=logp, entropy=torch.rand(n, generator=g, dtype=torch.float64) * 3,
                weights=torch.where(torch.rand(n, generator=g) < 0.25, 0.0,
                                    torch.rand(n, generator=g, dtype=torch.float64)),
                advantages=torch.randn(n, generator=g, dtype=torch.float64) * 2,
                old_logprobs=logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.3,
                ref_logprobs=logp + torch.randn(n, generator=g, dtype=torch.float64) * 0.5)
    return {k: t.to(device=device, dtype=dtype) for k, t in rows.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--cpu", action="store_true",
                        help="smoke run: CPU tensors under TRITON_INTERPRET=1, tiny rows")
    parser.add_argument("--rows", type=int, nargs="+")
    parser.add_argument("--calls", type=int, default=None, help="calls per repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--csv", type=Path, help="append the rows to this CSV")
    args = parser.parse_args(argv)
    if args.cpu:
        args.device = "cpu"
    if args.device == "cpu":
        # Before triton's first import (riskpo_kernels imports it lazily).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import triton

    from riskpo_kernels.policy import token_loss_triton as tlt
    from riskpo_kernels.policy.token_loss import token_loss_and_grads

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA device (use --cpu for a smoke run)")
    rows_list = args.rows or (CUDA_ROWS if args.device == "cuda" else CPU_ROWS)
    calls = args.calls or (50 if args.device == "cuda" else 2)
    repeats = args.repeats or (7 if args.device == "cuda" else 2)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"token-loss per-row math on {name}, torch {torch.__version__}, triton {triton.__version__}"
          + (" (interpreter: timings mean nothing, this only proves the script runs)"
             if args.device == "cpu" else ""))
    dtype = torch.float32
    results = []
    print("| rows | config | torch ops us | triton us | speedup | max grad diff |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in rows_list:
        for config, c in CONFIGS.items():
            x = make_rows(n, args.device, dtype, seed=n)
            call_args = (x["logprobs"], x["entropy"], x["weights"], x["advantages"],
                         x["old_logprobs"], x["ref_logprobs"] if c["ref"] else None)
            kwargs = dict(kl_coef=c["kl_coef"], entropy_coef=c["entropy_coef"])
            fns = {"torch ops": lambda: token_loss_and_grads(*call_args, **kwargs),
                   "triton": lambda: tlt.token_loss_and_grads_triton(*call_args, **kwargs)}
            want, got = fns["torch ops"](), fns["triton"]()  # warm-up (and the compile)
            diff = max((a - b).abs().max().item() for a, b in zip(want[1:], got[1:]))
            rel = (want[0] - got[0]).abs().item() / max(1.0, want[0].abs().item())
            if diff > 1e-4 or rel > 1e-4:
                raise SystemExit(f"rows={n} {config}: the kernel disagrees with the definition "
                                 f"(grad {diff:.3g}, loss {rel:.3g})")
            times = {k: [] for k in fns}
            for _ in range(repeats):
                for k, fn in fns.items():  # alternate, so drift hits both alike
                    sync()
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    sync()
                    times[k].append((time.perf_counter() - start) / calls * 1e6)
            med = {k: statistics.median(t) for k, t in times.items()}
            speedup = med["torch ops"] / med["triton"]
            print(f"| {n} | {config} | {med['torch ops']:.1f} | {med['triton']:.1f} | "
                  f"{speedup:.2f}x | {diff:.2g} |")
            for k, t in times.items():
                results.append(dict(rows=n, config=config, dtype=str(dtype)[6:], impl=k,
                                    median_us=round(med[k], 2), best_us=round(min(t), 2),
                                    speedup=round(speedup, 3) if k == "triton" else "",
                                    max_grad_diff=f"{diff:.3g}"))
    if args.csv:
        from provenance import append_csv_rows, git_commit

        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        common = dict(timestamp=stamp, commit=git_commit(), device=name, torch=torch.__version__,
                      triton=triton.__version__)
        append_csv_rows(args.csv, CSV_COLUMNS, [dict(common, **r) for r in results])
        print(f"appended {len(results)} rows to {args.csv}")


if __name__ == "__main__":
    main()
