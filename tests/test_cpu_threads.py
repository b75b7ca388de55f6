"""The C++ kernels' threading (csrc/common/parallel.h, issue 19 section 1).

Results do not depend on the thread count: each bundle and each row is
computed by one thread whatever the split, so one and two threads agree
bitwise, below the grain (the calling thread alone) and above it (a parallel
region). And a call below the grain opens no parallel region: the OpenMP
worker threads get no CPU time from it, which is what keeps a busy machine
from turning microseconds into milliseconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import riskpo_kernels as rk

pytestmark = pytest.mark.skipif(not rk.extension_available,
                                reason="the C++ extension is not built")

# (P, n): below the risk-core grain (~36k rewards at ~5.5 ns each) and above it.
ADVANTAGE_SIZES = ((512, 10), (4096, 32))
# (N, V): below the vocabulary grain (~10 rows at V 32768) and above it.
VOCAB_SIZES = ((4, 1000), (64, 32768))


def _with_threads(count, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _advantages(P, n):
    g = torch.Generator().manual_seed(P * n)
    rewards = (torch.rand(P * n, generator=g) < torch.rand(P * n, generator=g)).float()

    def run():
        mvar = rk.mvar_advantages(rewards, group_size=n, bundle_size=5, impl="cpp")
        grpo = rk.grpo_advantages(rewards, group_size=n, impl="cpp")
        return mvar.advantages, mvar.bundle_scores, grpo

    return run


def _vocab(N, V, dtype):
    g = torch.Generator().manual_seed(N + V)
    logits = (3 * torch.randn(N, V, generator=g)).to(dtype)
    tokens = torch.randint(0, V, (N,), generator=g)
    up_lp, up_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)

    def run():
        lp, ent, lse = torch.ops.riskpo.token_logprob_entropy(logits, tokens, 1.0)
        grad = torch.ops.riskpo.token_logprob_entropy_backward(
            up_lp.to(lp.dtype), up_ent.to(lp.dtype), logits, tokens, lse, ent, 1.0)
        return lp, ent, lse, grad

    return run


def _assert_bitwise(one, two):
    for a, b in zip(one, two):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("P,n", ADVANTAGE_SIZES)
def test_advantages_are_bitwise_the_same_on_one_and_two_threads(P, n):
    run = _advantages(P, n)
    _assert_bitwise(_with_threads(1, run), _with_threads(2, run))


@pytest.mark.parametrize("N,V", VOCAB_SIZES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
def test_vocabulary_kernels_are_bitwise_the_same_on_one_and_two_threads(N, V, dtype):
    run = _vocab(N, V, dtype)
    _assert_bitwise(_with_threads(1, run), _with_threads(2, run))


_WORKER_TIME = textwrap.dedent("""
    import json, os, sys, time
    import torch
    import riskpo_kernels as rk

    torch.set_num_threads(2)

    def worker_ticks():
        # utime + stime of every thread but the main one (the OpenMP workers).
        total = 0
        for tid in os.listdir("/proc/self/task"):
            if int(tid) == os.getpid():
                continue
            try:
                fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total

    def mvar(P, n):
        r = torch.randint(0, 2, (P * n,)).float()
        return lambda: torch.ops.riskpo.mvar_advantages(r, n, 5, 0.2, 0.8, 1.5, 0.0, "batch",
                                                        None, None, "std", True, True, None,
                                                        None, 1e-6)

    big, small = mvar(8192, 32), mvar(512, 10)
    big()                      # the workers exist from here on
    time.sleep(0.5)            # passive wait policy: they sleep, their time stops
    result = {}
    for name, fn, calls in (("small", small, 3000), ("big", big, 30)):
        before = worker_ticks()
        for _ in range(calls):
            fn()
        time.sleep(0.2)
        result[name] = worker_ticks() - before
    print(json.dumps(result))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/task")
def test_a_call_below_the_grain_gives_the_worker_threads_no_work():
    env = dict(__import__("os").environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _WORKER_TIME], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    ticks = json.loads(out.stdout.strip().splitlines()[-1])
    if __import__("os").cpu_count() < 2:
        pytest.skip("one CPU: no worker thread to observe")
    # 3000 small calls (~0.1 s of work) add no worker time; 30 big ones do
    # (the positive control: the probe sees a region when there is one).
    assert ticks["big"] > 0, ticks
    assert ticks["small"] <= 1, ticks
