"""Policy-loss benchmark: forward + backward of the PPO-clip loss from the
model's last hidden states, against the way trainers compute it today.

Methods (each ends with gradients w.r.t. hidden and the lm_head weight):
  plain GRPO loss      logits = hidden @ W.T materialised, float32 log_softmax,
                       gather, clip (the reference: how verl and TRL compute it)
  riskpo logits        materialised logits, then rk.policy_loss (one vocabulary
                       pass forward, one backward, nothing (N, V) saved)
  riskpo fused-linear  rk.fused_linear_policy_loss: chunked, gradient in forward
  riskpo fused-linear folded  the same with impl="triton-folded": the vocabulary
                       work in the lm_head GEMMs' epilogue/prologue, CUDA only
  riskpo logits in-place  the same with inplace_backward=True (the gradient
                       written over the logits, as Liger's Triton loss does)
  liger fused-linear   liger_kernel's LigerFusedLinearGRPOLoss, when installed
                       (its default: torch.compile'd chunks), and
  liger fused-linear eager  the same with compiled=False
  liger triton grpo    liger_kernel's triton_grpo_loss on materialised logits (its
                       default in-place backward), when installed, CUDA only
  cce + riskpo ppo     cut-cross-entropy's linear_cross_entropy (per-token NLL,
                       logits never materialised; its default gradient filtering)
                       and the PPO loss on top, when installed, CUDA only; no
                       entropy (the other methods' entropy coefficient is 0 too)
  three matmuls        hidden @ W.T, dlogits @ W, dlogits.T @ hidden: the floor
                       of any implementation that computes the logits of every row
  three matmuls (valid rows)  the same on the unmasked rows only

Batches (--batch): B = tokens / 512 sequences of T = 512 positions.
  dense      every position valid; old log-probs = logp + N(0, 0.02^2), so no
             token clips: every row does all the work (the worst case for us).
  realistic  response lengths L_b = round(T u_b), u_b the B evenly spaced
             quantiles of U(0.2, 1.0) in random order, padding after them (40%
             of the positions, as when responses are padded to the longest); old log-probs logp + N(0, 0.02^2) except for about 5% of
             the valid tokens (each with probability 0.05), whose old log-prob is
             logp - 0.5 sign(A_b): their ratio is clipped on the side where the
             clipped branch wins, so their gradient is exactly 0.
Each batch reports two denominators: the three matmuls on the dense shape
(vs_matmuls) and on the valid rows only (vs_matmuls_valid).

--loaded times every method a second time while another process spins on one
core (benchmarks/loaded.py); the CSV's `load` column says which.

Time: methods alternate inside each round; median and best over the rounds.
Peak extra memory of one call after a warm-up call: on CPU in a fresh subprocess
per method, the peak resident set (VmHWM, reset just before the call) over the
resident set before it; on CUDA in the timing process, max_memory_allocated over
memory_allocated (exact per call, and no CUDA start-up per method).

Prints a markdown table with ratios against the plain loss and the three
matmuls, and appends rows (device, versions, commit, time) to a CSV.

    python benchmarks/bench_policy_loss.py                      # CPU sizes
    python benchmarks/bench_policy_loss.py --device cuda        # GPU sizes, bf16
    python benchmarks/bench_policy_loss.py --sizes 2048x256x32768 --rounds 8
    python benchmarks/bench_policy_loss.py --batch both --loaded
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import riskpo_kernels as rk  # noqa: E402
from loaded import busy_core  # noqa: E402
from provenance import append_csv_rows, git_commit  # noqa: E402
from riskpo_kernels.policy import policy_loss_reference  # noqa: E402

CPU_SIZES = [(2048, 256, 32768), (1024, 256, 32000), (4096, 256, 32000), (1024, 256, 151936),
             (4096, 256, 151936)]
CUDA_SIZES = [(t, h, 151936) for t in (4096, 16384) for h in (1536, 4096)]
CSV_DEFAULT = REPO / "benchmarks" / "results" / "policy_loss.csv"
CSV_COLUMNS = ["timestamp", "commit", "device", "torch", "python", "method", "tokens", "H", "V",
               "dtype", "median_ms", "best_ms", "peak_extra_mib", "vs_plain", "vs_matmuls",
               "batch", "valid_fraction", "zero_grad_fraction", "vs_matmuls_valid", "load"]
PLAIN, LOGITS, LOGITS_INPLACE, FUSED, LIGER, LIGER_EAGER, LIGER_TRITON, CCE, MATMULS = (
    "plain GRPO loss", "riskpo logits", "riskpo logits in-place", "riskpo fused-linear",
    "liger fused-linear", "liger fused-linear eager", "liger triton grpo", "cce + riskpo ppo",
    "three matmuls")
MATMULS_VALID = "three matmuls (valid rows)"
FOLDED = "riskpo fused-linear folded"
BATCHES = ("dense", "realistic")
PADDING_MIN_LENGTH = 0.2   # L_b / T ~ U(0.2, 1.0): 40% padding on average
CLIP_PROBABILITY = 0.05
PEERS = (LIGER, LIGER_EAGER, LIGER_TRITON, CCE)


def make_inputs(tokens, H, V, dtype, device, seed=0, batch="dense"):
    """The batch described in the module docstring; also returns its valid and
    zero-gradient fractions."""
    g = torch.Generator().manual_seed(seed)
    B = max(1, tokens // 512)
    T = tokens // B
    hidden = (torch.randn(B, T, H, generator=g) * 0.5).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device)
    labels = torch.randint(0, V, (B, T), generator=g).to(device)
    advantages = torch.randn(B, generator=g).to(device)
    if batch == "dense":
        mask = torch.ones(B, T, dtype=torch.bool)
        clip = torch.zeros(B, T, dtype=torch.bool)
    else:
        # Evenly spaced quantiles of U(0.2, 1.0), shuffled: 40% padding even for few sequences.
        u = PADDING_MIN_LENGTH + (1 - PADDING_MIN_LENGTH) * (torch.arange(B) + 0.5) / B
        lengths = (u[torch.randperm(B, generator=g)] * T).round().clamp(min=1)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        clip = (torch.rand(B, T, generator=g) < CLIP_PROBABILITY) & mask
    mask = mask.to(device)
    with torch.no_grad():
        logp, _ = rk.fused_linear_logprobs(hidden, weight, labels)
        noise = 0.02 * torch.randn(B, T, generator=g).to(device)
        push = 0.5 * torch.sign(advantages)[:, None].expand(B, T)
        old = torch.where(clip.to(device), logp - push, logp + noise)
    return dict(hidden=hidden, weight=weight, tokens=labels, mask=mask, advantages=advantages,
                old_logprobs=old, valid_fraction=mask.float().mean().item(),
                zero_grad_fraction=clip.float().sum().item() / max(1, int(mask.sum())))


def method_fn(name, x):
    """A callable running forward + backward of `name` on inputs `x`."""
    def leaves():
        return (x["hidden"].detach().requires_grad_(), x["weight"].detach().requires_grad_())

    if name == PLAIN:
        def run():
            h, w = leaves()
            loss, *_ = policy_loss_reference(h @ w.t(), x["tokens"], x["mask"], x["advantages"],
                                             old_logprobs=x["old_logprobs"])
            loss.backward()
    elif name == LOGITS:
        def run():
            h, w = leaves()
            rk.policy_loss(h @ w.t(), x["tokens"], x["mask"], x["advantages"],
                           old_logprobs=x["old_logprobs"]).loss.backward()
    elif name == LOGITS_INPLACE:
        def run():
            h, w = leaves()
            rk.policy_loss(h @ w.t(), x["tokens"], x["mask"], x["advantages"],
                           old_logprobs=x["old_logprobs"], inplace_backward=True).loss.backward()
    elif name in (FUSED, FOLDED):
        impl = "triton-folded" if name == FOLDED else "auto"

        def run():
            h, w = leaves()
            rk.fused_linear_policy_loss(h, w, x["tokens"], x["mask"], x["advantages"],
                                        old_logprobs=x["old_logprobs"], impl=impl).loss.backward()
    elif name in (LIGER, LIGER_EAGER):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        # Token-mean loss (Liger's "bnpo"), no KL term: the same loss as the others.
        liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="bnpo",
                                         compiled=name == LIGER)

        def run():
            h, w = leaves()
            out = liger(h, w, x["tokens"], x["mask"].to(h.dtype), x["advantages"],
                        old_per_token_logps=x["old_logprobs"])
            (out[0] if isinstance(out, tuple) else out).backward()
    elif name == LIGER_TRITON:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        def run():
            h, w = leaves()
            # Liger takes logits for T + 1 positions and drops the last one.
            extended = torch.cat([h, h.new_zeros(h.shape[0], 1, h.shape[2])], dim=1)
            loss, _ = triton_grpo_loss(extended @ w.t(), x["old_logprobs"], None, x["tokens"],
                                       x["advantages"], x["mask"].to(torch.int32), temperature=1.0,
                                       beta=0.0, eps_low=0.2, eps_high=0.2, loss_type="bnpo",
                                       reduce=True)
            loss.backward()
    elif name == CCE:
        from cut_cross_entropy import linear_cross_entropy

        from riskpo_kernels.policy import token_policy_loss

        def run():
            h, w = leaves()
            logprobs = -linear_cross_entropy(h, w, x["tokens"], reduction="none")
            loss, _ = token_policy_loss(logprobs.float(), torch.zeros_like(logprobs, dtype=torch.float32),
                                        x["mask"], x["advantages"], x["old_logprobs"])
            loss.backward()
    elif name in (MATMULS, MATMULS_VALID):
        h2 = x["hidden"].reshape(-1, x["hidden"].shape[-1])
        if name == MATMULS_VALID:
            h2 = h2[x["mask"].reshape(-1)]
        dlogits = torch.randn(h2.shape[0], x["weight"].shape[0], dtype=h2.dtype, device=h2.device)

        def run():
            h2 @ x["weight"].t()
            dlogits @ x["weight"]
            dlogits.t() @ h2
    else:
        raise ValueError(name)
    return run


def available_methods(device="cpu"):
    methods = [PLAIN, LOGITS, LOGITS_INPLACE, FUSED]
    if device == "cuda" and importlib.util.find_spec("triton") is not None:
        methods.append(FOLDED)
    try:
        import liger_kernel.chunked_loss  # noqa: F401
        methods += [LIGER, LIGER_EAGER]
        if device == "cuda":  # a Triton kernel: no CPU path
            from liger_kernel.transformers.grpo_loss import triton_grpo_loss  # noqa: F401
            methods.append(LIGER_TRITON)
    except Exception:  # not installed, or incompatible with this torch
        pass
    if device == "cuda":  # Triton kernels; on CPU it would only torch.compile the logits
        try:
            import cut_cross_entropy  # noqa: F401
            methods.append(CCE)
        except Exception:
            pass
    return methods + [MATMULS, MATMULS_VALID]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(methods, x, device, rounds):
    fns = {}
    for m in methods:
        try:
            fns[m] = method_fn(m, x)
            fns[m]()  # warm-up: allocator, kernel compilation
        except Exception as error:  # a peer's API drifts between versions: report, go on
            # (and a candidate kernel's first run on a card must not cost the others)
            if m not in PEERS + (FOLDED,):
                raise
            print(f"note: {m} failed and is left out: {type(error).__name__}: {error}")
            fns.pop(m, None)
    sync(device)
    times = {m: [] for m in fns}
    for _ in range(rounds):
        for m, fn in fns.items():  # alternate, so drift hits every method alike
            start = time.perf_counter()
            fn()
            sync(device)
            times[m].append(time.perf_counter() - start)
    return {m: (statistics.median(t) * 1e3, min(t) * 1e3) for m, t in times.items() if t}


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    """VmHWM: this address space's peak resident set. Not ru_maxrss, which a
    child inherits from its parent across fork and exec on Linux."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")


def cuda_peak_of(fn):
    """Peak bytes allocated by one call of ``fn`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure_peak_here(method, tokens, H, V, dtype, device, batch="dense"):
    """Runs in a fresh process: peak extra bytes of one forward + backward."""
    # A warm-up call at the same size first: lazy imports, compilation (Liger
    # compiles its chunk function) and one-time set-up stay out of the peak.
    x = make_inputs(tokens, H, V, getattr(torch, dtype), device, batch=batch)
    fn = method_fn(method, x)
    fn()
    if device == "cpu":  # hand freed heap pages back, so that RSS counts live memory only
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if device == "cuda":
        return cuda_peak_of(fn)
    before = rss_bytes()
    reset_peak_rss()
    fn()
    return peak_rss_bytes() - before


def measure_peak(method, tokens, H, V, dtype, device, batch):
    cmd = [sys.executable, __file__, "--peak-of",
           json.dumps([method, tokens, H, V, dtype, device, batch])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        print(f"note: peak memory of {method} failed: {out.stderr.strip()[-300:]}")
        return float("nan")
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def print_load_ratios(rows):
    """The fused loss's ratio to the three matmuls, quiet and with a core busy
    (issue 19's goal: loaded within 1.3x of quiet)."""
    at = {(r["tokens"], r["H"], r["V"], r["batch"], r["load"]): r
          for r in rows if r["method"] == FUSED}
    print("\n| tokens x H x V | batch | fused / matmuls quiet | one core busy | loaded / quiet |")
    print("|---|---|---:|---:|---:|")
    for (t, h, v, batch, load), quiet in at.items():
        busy = at.get((t, h, v, batch, "one core busy"))
        if load == "quiet" and busy is not None:
            print(f"| {t} x {h} x {v} | {batch} | {quiet['vs_matmuls']:.2f} | "
                  f"{busy['vs_matmuls']:.2f} | {busy['vs_matmuls'] / quiet['vs_matmuls']:.2f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--sizes", help="comma-separated TOKENSxHxV, e.g. 2048x256x32768")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--quick", action="store_true", help="one tiny size, 2 rounds (smoke test)")
    ap.add_argument("--methods", help="comma-separated subset (the plain loss and the three "
                                      "matmuls always run: the ratios need them)")
    ap.add_argument("--batch", choices=(*BATCHES, "both"), default="dense",
                    help="dense (every position valid, nothing clips), realistic (~40%% "
                         "padding, ~5%% of tokens clipped) or both; see the module docstring")
    ap.add_argument("--loaded", action="store_true",
                    help="also time every method with another process spinning on one core")
    ap.add_argument("--csv", type=Path, default=CSV_DEFAULT)
    ap.add_argument("--no-csv", action="store_true")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.peak_of:
        print(measure_peak_here(*json.loads(args.peak_of)))
        return 0
    device = args.device
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    if args.quick:
        sizes, args.rounds = [(256, 64, 1000)], 2
    elif args.sizes:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    else:
        sizes = CUDA_SIZES if device == "cuda" else CPU_SIZES
    methods = available_methods(device)
    if args.methods:
        wanted = {m.strip() for m in args.methods.split(",")} | {PLAIN, MATMULS, MATMULS_VALID}
        unknown = wanted - set(methods)
        if unknown:
            ap.error(f"--methods: not available here: {', '.join(sorted(unknown))}; "
                     f"available: {', '.join(methods)}")
        methods = [m for m in methods if m in wanted]
    print(f"Policy loss fwd+bwd on {device_name(device)}, torch {torch.__version__}, {dtype}, "
          f"{torch.get_num_threads()} threads; methods: {', '.join(methods)}\n")
    batches = BATCHES if args.batch == "both" else (args.batch,)
    loads = ("quiet", "one core busy") if args.loaded else ("quiet",)
    rows = []
    for tokens, H, V in sizes:
        for batch in batches:
            x = make_inputs(tokens, H, V, getattr(torch, dtype), device, batch=batch)
            for load in loads:
                if load == "quiet":
                    timings = time_methods(methods, x, device, args.rounds)
                else:
                    with busy_core():
                        timings = time_methods(methods, x, device, args.rounds)
                peaks = {}
                for m in timings:
                    if args.no_memory or load != "quiet":
                        peaks[m] = float("nan")
                    elif device == "cuda":  # the allocator's peak is exact per call: no subprocess
                        peaks[m] = cuda_peak_of(method_fn(m, x)) / 2**20
                    else:
                        peaks[m] = None  # measured below, in a fresh process, after x is freed
                plain, floor, floor_valid = (timings[k][1] for k in (PLAIN, MATMULS, MATMULS_VALID))
                for m in timings:
                    rows.append(dict(method=m, tokens=tokens, H=H, V=V, dtype=dtype,
                                     median_ms=timings[m][0], best_ms=timings[m][1],
                                     peak_extra_mib=peaks[m], vs_plain=plain / timings[m][1],
                                     vs_matmuls=timings[m][1] / floor, batch=batch,
                                     valid_fraction=x["valid_fraction"],
                                     zero_grad_fraction=x["zero_grad_fraction"],
                                     vs_matmuls_valid=timings[m][1] / floor_valid, load=load))
            del x
            for r in rows:
                if r["peak_extra_mib"] is None:
                    r["peak_extra_mib"] = measure_peak(r["method"], tokens, H, V, dtype, device,
                                                       batch)

    print("| tokens x H x V | batch (valid, zero-grad) | load | method | median ms | best ms | "
          "peak extra MiB | speed-up vs plain | x three matmuls | x three matmuls, valid rows |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} x {r['H']} x {r['V']} | {r['batch']} ({r['valid_fraction']:.0%}, "
              f"{r['zero_grad_fraction']:.0%}) | {r['load']} | {r['method']} | "
              f"{r['median_ms']:.1f} | {r['best_ms']:.1f} | {r['peak_extra_mib']:.0f} | "
              f"{r['vs_plain']:.2f}x | {r['vs_matmuls']:.2f} | {r['vs_matmuls_valid']:.2f} |")
    if args.loaded:
        print_load_ratios(rows)
    if not args.no_csv:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        common = dict(timestamp=stamp, commit=git_commit(), device=device_name(device),
                      torch=torch.__version__, python=platform.python_version())
        append_csv_rows(args.csv, CSV_COLUMNS, [
            {**common, **{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()}}
            for r in rows])
        print(f"\nappended {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
