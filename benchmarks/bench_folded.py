"""The folded fused-linear kernels' configurations against the chunked path
and the three matmuls (issue 18: the device check measures every candidate).

Times one forward of the op's implementation (which also finishes the
gradients): ``fused_linear.fused_linear_policy_loss_forward`` with the chunked
Triton vocabulary kernels, and ``folded_triton.folded_fused_linear_policy_loss_forward``
for each configuration in ``folded_triton.CUDA_16BIT_CANDIDATES``, at the four
GPU sizes in bf16 (dense batch: every row valid, old log-probs = logp, so no
token clips). Prints one line per size with milliseconds (triton.testing.do_bench,
median) and the ratio to the three matmuls; the fastest folded configuration
and whether it beats the chunked path are the table entry the default comes from
(``backends.FUSED_LINEAR_AUTO``).

    python benchmarks/bench_folded.py              # CUDA
    python benchmarks/bench_folded.py --cpu        # smoke test under TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="a tiny size under Triton's interpreter")
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    from riskpo_kernels.policy import folded_triton as ft
    from riskpo_kernels.policy import fused_linear as fl

    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        ap.error("no CUDA device (use --cpu for the interpreter smoke test)")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = ([(t, h, 151936) for t in (4096, 16384) for h in (1536, 4096)] if cuda
             else [(64, 32, 300)])
    configs = ft.CUDA_16BIT_CANDIDATES if cuda else {"interpreter": ft.INTERPRETER}
    vocab_impl = "triton" if cuda else "cpp"

    def bench(fn):
        if cuda:
            import triton.testing
            return triton.testing.do_bench(fn, warmup=3, rep=20)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    device_name = torch.cuda.get_device_name() if cuda else "CPU (interpreter)"
    print(f"folded kernels on {device_name}, torch {torch.__version__}, {dtype}")
    for N, H, V in sizes:
        g = torch.Generator().manual_seed(0)
        hidden = (torch.randn(N, H, generator=g) * 0.5).to(dtype).to(device)
        weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device)
        tokens = torch.randint(0, V, (N,), generator=g).to(device)
        weights = torch.full((N,), 1.0 / N, device=device)
        advantages = torch.randn(N, generator=g).to(device)
        with torch.no_grad():
            old = fl.fused_linear_logprob_entropy_forward(hidden, weight, None, tokens, 1.0, 4096,
                                                          vocab_impl)[0]
        op_args = (hidden, weight, None, tokens, weights, advantages, old, None, 0.2, 0.2, 3.0,
                   0.0, 0.0, 1.0)
        chunk = fl.default_chunk_size(N, V, device, hidden.element_size())
        dlogits = torch.randn(N, V, dtype=dtype, device=device)
        times = {"three matmuls": bench(lambda: (hidden @ weight.t(), dlogits @ weight,
                                                 dlogits.t() @ hidden))}
        del dlogits
        times["chunked"] = bench(lambda: fl.fused_linear_policy_loss_forward(*op_args, chunk,
                                                                             vocab_impl))
        for name, config in configs.items():
            try:
                times[f"folded {name}"] = bench(
                    lambda: ft.folded_fused_linear_policy_loss_forward(*op_args, chunk,
                                                                       config=config))
            except Exception as error:  # one configuration failing must not hide the others
                print(f"note: folded {name} failed at {N}x{H}x{V}: {type(error).__name__}: {error}")
        base = times["three matmuls"]
        print(f"{N}x{H}x{V} " + "  ".join(f"{k} {t:.2f} ms ({t / base:.2f}x)"
                                          for k, t in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
