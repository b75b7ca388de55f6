"""Triton policy-loss kernels (riskpo::token_logprob_entropy_triton and its
backward) against the plain-torch reference: log-probs, entropies, log-sum-exp
and gradients for every logits dtype, odd vocabularies and small vocabulary
blocks (multi-block rows with a tail), extreme and non-finite logits, opcheck,
torch.compile and argument errors.

Runs on a CUDA device, or on the CPU under Triton's interpreter.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from riskpo_kernels.policy import logprobs_and_entropy_reference

from conftest import (assert_close_for, assert_compiled_matches_eager, check_fused_logprob_gradients,
                      check_inplace_backward, triton_device, triton_mode)

# CI runs plain `pytest` on CPU-only machines, where the kernels can only run
# under Triton's interpreter. triton.jit reads TRITON_INTERPRET when it
# decorates a function: triton's own library functions (tl.sum, tl.max) when
# triton is first imported, our kernels when their module is (riskpo_kernels
# imports it lazily, on the first call of a triton op). Neither `import torch`
# nor importing riskpo_kernels imports triton, and pytest imports every test
# module before it runs any test, so setting the variable here, at
# collection, is honoured in a plain `pytest` run. It is not where triton was
# imported before (torch.compile imports it, so would a module or plugin
# collected earlier that imports it): triton's library is then compiled-mode
# and cannot be interpreted. That case is detected (`_mode`), and
# test_in_a_fresh_process reruns this file in a new process with the variable
# set instead, while the other tests skip. Only for a torch built without
# CUDA/ROCm (build info, not a device query): on a GPU build the kernels are
# compiled for the GPU. An explicit TRITON_INTERPRET=0 is kept.
if torch.version.cuda is None and torch.version.hip is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

ACC = {torch.float64: torch.float64, torch.float32: torch.float32, torch.float16: torch.float32,
       torch.bfloat16: torch.float32}
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# (V, block_v): one block, one exact block, multi-block rows with a tail, and the
# default block choice (4099 -> two 4096-wide steps, the second with 3 words).
VOCABS = ((1, None), (7, None), (7, 4), (33, 16), (1000, 128), (4099, 512), (4099, None))


@pytest.fixture(scope="module")
def _mode():
    """'cuda', 'cpu' (interpreter) or 'fresh-process' (conftest.triton_mode)."""
    return triton_mode("riskpo_kernels.policy.triton_kernels", "the triton kernels")


@pytest.fixture(scope="module")
def device(_mode):
    """CUDA where present, else the CPU under TRITON_INTERPRET=1."""
    return triton_device(_mode)


def test_in_a_fresh_process(_mode):
    if _mode != "fresh-process":
        pytest.skip("not needed: the tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not fresh_process"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-2000:]


@pytest.fixture(scope="module")
def tk(device):
    return importlib.import_module("riskpo_kernels.policy.triton_kernels")


def _seed(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def reference(logits, tokens, temperature, grad_logprobs=None, grad_entropy=None):
    """Reference log-probs, entropies, lse, and the gradient of
    sum(grad_logprobs * logprobs + grad_entropy * entropy) w.r.t. logits."""
    x = logits.detach().clone().requires_grad_()
    logprobs, entropy = logprobs_and_entropy_reference(x, tokens, temperature)
    lse = torch.logsumexp(x.detach().to(ACC[logits.dtype]) / temperature, dim=-1)
    grad = None
    if grad_logprobs is not None:
        (logprobs * grad_logprobs + entropy * grad_entropy).sum().backward()
        grad = x.grad
    return logprobs.detach(), entropy.detach(), lse, grad


def random_case(N, V, dtype, device, g, strided=False):
    logits = (torch.randn(N, V + 3 * strided, generator=g, dtype=torch.float64) * 2).to(dtype)
    logits = logits[:, :V]  # strided: row stride V + 3, unit stride along V
    tokens = torch.randint(0, V, (N,), generator=g)
    acc = ACC[dtype]
    grad_logprobs = torch.randn(N, generator=g, dtype=torch.float64).to(acc)
    grad_entropy = torch.randn(N, generator=g, dtype=torch.float64).to(acc)
    grad_logprobs[1 % N] = grad_entropy[1 % N] = 0  # a masked token
    return logits.to(device), tokens.to(device), grad_logprobs.to(device), grad_entropy.to(device)


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_launchers_match_reference(tk, device, dtype):
    acc = ACC[dtype]
    for (V, block_v), temperature in itertools.product(VOCABS, (1.0, 0.7)):
        g = _seed(dtype, V, block_v, temperature)
        logits, tokens, g_lp, g_h = random_case(5, V, dtype, device, g, strided=V > 1)
        want_lp, want_h, want_lse, want_grad = reference(logits.cpu(), tokens.cpu(), temperature,
                                                         g_lp.cpu(), g_h.cpu())
        logprobs, entropy, lse = tk.logprob_entropy_triton(logits, tokens, temperature, block_v=block_v)
        what = f"V={V} block_v={block_v} T={temperature}"
        for name, got, want in (("logprobs", logprobs, want_lp), ("entropy", entropy, want_h),
                                ("lse", lse, want_lse)):
            assert got.dtype == acc and got.shape == (5,), (name, what)
            assert_close_for(got.cpu(), want, acc, msg=lambda m: f"{name} {what}: {m}")
        before = logits.clone()
        grad = tk.logprob_entropy_backward_triton(g_lp, g_h, logits, tokens, lse, entropy, temperature,
                                                  block_v=block_v)
        assert torch.equal(logits, before), "the backward wrote into the logits"
        assert grad.dtype == dtype and grad.shape == (5, V) and grad.is_contiguous()
        assert_close_for(grad.cpu(), want_grad, dtype, msg=lambda m: f"grad {what}: {m}")
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), "a masked token's row must be 0"
        # Written over the (contiguous) logits instead: bitwise the same gradient.
        buffer = logits.contiguous().clone()
        out = tk.logprob_entropy_backward_triton(g_lp, g_h, buffer, tokens, lse, entropy,
                                                 temperature, block_v=block_v, in_place=True)
        assert out is buffer and torch.equal(buffer, grad), f"in place {what}"


@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_op_autograd_matches_reference(device, dtype):
    g = _seed("autograd", dtype)
    for V, temperature in ((4099, 0.7), (50, 1.0)):
        logits, tokens, g_lp, g_h = random_case(4, V, dtype, device, g)
        x = logits.clone().requires_grad_()
        logprobs, entropy, lse = torch.ops.riskpo.token_logprob_entropy_triton(x, tokens, temperature)
        assert not lse.requires_grad
        (logprobs * g_lp + entropy * g_h).sum().backward()
        want_lp, want_h, _, want_grad = reference(logits.cpu(), tokens.cpu(), temperature, g_lp.cpu(),
                                                  g_h.cpu())
        assert_close_for(logprobs.detach().cpu(), want_lp, ACC[dtype])
        assert_close_for(entropy.detach().cpu(), want_h, ACC[dtype])
        assert x.grad.dtype == dtype
        assert_close_for(x.grad.cpu(), want_grad, dtype)
    # Only the entropy used: grad_logprobs arrives as None.
    x = logits.clone().requires_grad_()
    torch.ops.riskpo.token_logprob_entropy_triton(x, tokens, 1.0)[1].sum().backward()
    _, _, _, want_grad = reference(logits.cpu(), tokens.cpu(), 1.0, torch.zeros(4, dtype=ACC[dtype]),
                                   torch.ones(4, dtype=ACC[dtype]))
    assert_close_for(x.grad.cpu(), want_grad, dtype)


def test_rows_loop_over_a_capped_grid(tk, device, monkeypatch):
    """Fewer programs than rows: each program loops over its rows (as at 64k+ rows)."""
    monkeypatch.setattr(tk, "MAX_PROGRAMS", 2)
    logits, tokens, g_lp, g_h = random_case(7, 45, torch.float32, device, _seed("grid"), strided=True)
    logprobs, entropy, lse = tk.logprob_entropy_triton(logits, tokens, 0.9, block_v=16)
    want_lp, want_h, want_lse, want_grad = reference(logits.cpu(), tokens.cpu(), 0.9, g_lp.cpu(), g_h.cpu())
    assert_close_for(logprobs.cpu(), want_lp, torch.float32)
    assert_close_for(entropy.cpu(), want_h, torch.float32)
    assert_close_for(lse.cpu(), want_lse, torch.float32)
    grad = tk.logprob_entropy_backward_triton(g_lp, g_h, logits, tokens, lse, entropy, 0.9, block_v=16)
    assert_close_for(grad.cpu(), want_grad, torch.float32)


def test_non_unit_vocabulary_stride_and_empty_batch(tk, device):
    logits = torch.randn(9, 4, generator=_seed("t")).to(device).t()  # (4, 9), stride (1, 4)
    tokens = torch.tensor([0, 8, 3, 5], device=device)
    logprobs, entropy, _ = tk.logprob_entropy_triton(logits, tokens, 1.0)
    want_lp, want_h, _, _ = reference(logits.cpu(), tokens.cpu(), 1.0)
    assert_close_for(logprobs.cpu(), want_lp, torch.float32)
    assert_close_for(entropy.cpu(), want_h, torch.float32)
    empty = tk.logprob_entropy_triton(torch.zeros(0, 5, device=device),
                                      torch.zeros(0, dtype=torch.long, device=device), 1.0)
    assert all(t.shape == (0,) for t in empty)
    grad = tk.logprob_entropy_backward_triton(*(torch.zeros(0, device=device),) * 2,
                                              torch.zeros(0, 5, device=device),
                                              torch.zeros(0, dtype=torch.long, device=device),
                                              *(torch.zeros(0, device=device),) * 2, 1.0)
    assert grad.shape == (0, 5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("block_v", (512, None))
def test_extreme_logits_stay_finite(tk, device, dtype, block_v):
    V = 4099
    rows = [torch.full((V,), 1e4), torch.full((V,), -1e4), torch.zeros(V),
            torch.cat([torch.tensor([1e4]), torch.full((V - 1,), -1e4)]),    # one-hot, first block
            torch.cat([torch.full((V - 1,), -1e4), torch.tensor([1e4])]),    # one-hot, in the tail
            torch.cat([torch.tensor([3.0, float("-inf")]), torch.randn(V - 2, generator=_seed("x"))])]
    logits = torch.stack(rows).to(dtype).to(device)
    tokens = torch.tensor([0, 5, 7, 0, V - 1, 2], device=device)
    g_lp = torch.full((6,), 0.5, device=device)
    g_h = torch.full((6,), -0.3, device=device)
    logV = float(torch.log(torch.tensor(float(V), dtype=torch.float64)))
    # 0.7 and 1/3: 1/T is not a float32, so z = x / T is rounded; the first H100
    # run failed here at 0.7, where fused multiply-adds rounded it differently
    # from the interpreter (benchmarks/NOTES.md). At 1.0 the product is exact.
    for temperature in (1.0, 0.7, 1 / 3):
        logprobs, entropy, lse = tk.logprob_entropy_triton(logits, tokens, temperature, block_v=block_v)
        assert torch.isfinite(logprobs).all() and torch.isfinite(entropy).all() and torch.isfinite(lse).all()
        torch.testing.assert_close(entropy[:3].cpu(), torch.full((3,), logV), rtol=1e-5, atol=1e-4)
        assert entropy[3:5].abs().max() < 1e-6 and torch.equal(logprobs[3:5].cpu(), torch.zeros(2))
        want_lp, want_h, want_lse, want_grad = reference(logits.cpu(), tokens.cpu(), temperature,
                                                         g_lp.cpu(), g_h.cpu())
        assert_close_for(logprobs.cpu(), want_lp, torch.float32)
        assert_close_for(entropy.cpu(), want_h, torch.float32)
        assert_close_for(lse.cpu(), want_lse, torch.float32)
        grad = tk.logprob_entropy_backward_triton(g_lp, g_h, logits, tokens, lse, entropy, temperature,
                                                  block_v=block_v)
        assert torch.isfinite(grad).all()
        assert grad[5, 1].item() == 0.0, "a -inf logit has p = 0 and gets exactly 0"
        assert_close_for(grad.cpu(), want_grad, dtype)


# Cases where a GPU's arithmetic differs from the interpreter's numpy (IEEE, no
# flush to zero, NaN-propagating max): each reproduced here with an answer that
# must not depend on the difference (benchmarks/NOTES.md, "Triton on the H100").

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.parametrize("block_v", (4, None))
def test_a_row_of_minus_inf_is_nan_not_a_crash(tk, device, block_v):
    # exp(-inf - -inf) is NaN: the running max of an all -inf prefix is not
    # subtracted (shift 0). A row with no finite logit is no distribution: its
    # log-prob and entropy are NaN, as the reference's, and the other rows and
    # a masked (zero-gradient) NaN row are unaffected.
    logits = torch.randn(3, 9, generator=_seed("-inf"))
    logits[1] = float("-inf")
    logits[2, :8] = float("-inf")  # -inf for whole blocks, then one finite logit
    logits = logits.to(device)
    tokens = torch.tensor([0, 3, 8], device=device)
    logprobs, entropy, lse = tk.logprob_entropy_triton(logits, tokens, 0.7, block_v=block_v)
    want_lp, want_h, _, _ = reference(logits.cpu(), tokens.cpu(), 0.7)
    assert torch.isnan(logprobs[1]) and torch.isnan(entropy[1]) and torch.isnan(want_lp[1])
    assert lse[1].item() == float("-inf")
    assert logprobs[2].item() == 0.0 and entropy[2].item() == 0.0
    assert_close_for(logprobs[[0, 2]].cpu(), want_lp[[0, 2]], torch.float32)
    assert_close_for(entropy[[0, 2]].cpu(), want_h[[0, 2]], torch.float32)
    g = torch.tensor([1.0, 0.0, 1.0], device=device)
    grad = tk.logprob_entropy_backward_triton(g, g, logits, tokens, lse, entropy, 0.7, block_v=block_v)
    assert torch.equal(grad[1], torch.zeros(9, device=device))
    assert torch.isfinite(grad[[0, 2]]).all() and (grad[2, :8] == 0).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_subnormal_probabilities_do_not_matter(tk, device, dtype):
    # A GPU flushes subnormal exp() results to 0 (ex2.approx.ftz); numpy keeps
    # them (exp(-100) = 3.7e-44). Both must give the same answer: the
    # log-prob of a token whose probability is subnormal is exact in log space
    # (-100 here, not log(0)), and the rest agrees with a row where those
    # logits are -inf (probability exactly 0).
    V = 300
    logits = torch.zeros(2, V)
    logits[:, 100:] = -torch.linspace(88, 104, V - 100)  # exp() of these is subnormal in float32
    logits = logits.to(dtype).to(device)
    flushed = logits.clone()
    flushed[:, 100:] = float("-inf")
    tokens = torch.tensor([5, 250], device=device)
    logprobs, entropy, lse = tk.logprob_entropy_triton(logits, tokens, 1.0)
    f_lp, f_h, f_lse = tk.logprob_entropy_triton(flushed, tokens, 1.0)
    want = float(logits[1, 250].float()) - math.log(100)
    assert abs(logprobs[1].item() - want) <= 1e-5 * abs(want), (logprobs[1].item(), want)
    assert_close_for(logprobs[0].cpu(), f_lp[0].cpu(), torch.float32)
    assert_close_for(entropy.cpu(), f_h.cpu(), torch.float32)
    assert_close_for(lse.cpu(), f_lse.cpu(), torch.float32)
    g = torch.tensor([0.7, -1.3], device=device)
    grad = tk.logprob_entropy_backward_triton(g, -g, logits, tokens, lse, entropy, 1.0)
    f_grad = tk.logprob_entropy_backward_triton(g, -g, flushed, tokens, f_lse, f_h, 1.0)
    # The target's one-hot term survives whether or not its p is flushed.
    assert_close_for(grad.float().cpu(), f_grad.float().cpu().nan_to_num(), dtype)
    assert abs(grad[1, 250].float().item() - (-1.3)) < 1e-2


# The interpreter computes with numpy, which warns on the NaN it is asked to make.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_or_inf_logit_makes_its_row_nan(tk, device):
    V = 37
    logits = torch.randn(5, V, generator=_seed("nan"))
    logits[0, 3] = float("nan")        # first block
    logits[1, V - 1] = float("nan")    # tail block
    logits[2, 20] = float("inf")
    logits[4, 0] = float("-inf")       # -inf alone is fine
    # A GPU's max (max.f32) returns the other operand where one is NaN, so a
    # block whose only non -inf entry is NaN has max -inf there and NaN here:
    # both must still give a NaN row, through exp(NaN) in the sum.
    logits[0, :16] = float("-inf")
    logits[0, 3] = float("nan")
    logits = logits.to(device)
    tokens = torch.tensor([1, 2, 20, 4, 5], device=device)
    for block_v in (16, None):
        logprobs, entropy, lse = tk.logprob_entropy_triton(logits, tokens, 1.0, block_v=block_v)
        for out in (logprobs, entropy, lse):
            assert torch.isnan(out[:3]).all(), block_v
            assert torch.isfinite(out[3:]).all(), block_v
        # Masked NaN rows (zero upstream gradient) give zeros; unmasked ones NaN.
        g = torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0], device=device)
        grad = tk.logprob_entropy_backward_triton(g, g, logits, tokens, lse, entropy, 1.0, block_v=block_v)
        assert torch.equal(grad[0], torch.zeros(V, device=device))
        assert torch.equal(grad[2], torch.zeros(V, device=device))
        assert torch.isnan(grad[1]).all()
        assert torch.isfinite(grad[3:]).all() and grad[4, 0].item() == 0.0


def test_opcheck(device):
    g = _seed("opcheck")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits = torch.randn(5, 13, generator=g).to(dtype).to(device)
        tokens = torch.randint(0, 13, (5,), generator=g).to(device)
        torch.library.opcheck(torch.ops.riskpo.token_logprob_entropy_triton.default, (logits, tokens, 0.9))
        torch.library.opcheck(torch.ops.riskpo.token_logprob_entropy_triton.default,
                              (logits.clone().requires_grad_(), tokens, 1.0))
        acc = ACC[dtype]
        logprobs, entropy, lse = torch.ops.riskpo.token_logprob_entropy_triton(logits, tokens, 0.9)
        torch.library.opcheck(torch.ops.riskpo.token_logprob_entropy_triton_backward.default,
                              (torch.randn(5, generator=g).to(acc).to(device),
                               torch.randn(5, generator=g).to(acc).to(device),
                               logits, tokens, lse, entropy, 0.9))
        torch.library.opcheck(torch.ops.riskpo.token_logprob_entropy_triton_backward_.default,
                              (torch.randn(5, generator=g).to(acc).to(device),
                               torch.randn(5, generator=g).to(acc).to(device),
                               logits.clone(), tokens, lse, entropy, 0.9))


def test_torch_compile_fullgraph_forward_and_backward(device):
    g = _seed("compile")
    logits, tokens, g_lp, g_h = random_case(6, 29, torch.float32, device, g)
    weights = torch.rand(6, generator=g).to(device)

    def step(x):
        logprobs, entropy, _ = torch.ops.riskpo.token_logprob_entropy_triton(x, tokens, 0.8)
        ratio = torch.exp(logprobs - logprobs.detach())
        return (weights * (-ratio * g_lp - 0.01 * entropy)).sum()

    assert_compiled_matches_eager(step, logits)


def _bad_calls(device):
    f32 = dict(device=device)
    logits, tokens = torch.randn(2, 5, **f32), torch.tensor([0, 1], device=device)
    per_row = torch.zeros(2, **f32)
    return [
        ("fwd", (torch.randn(10, **f32), tokens, 1.0), {}, r"logits must be \(N, V\)"),
        ("fwd", (logits.long(), tokens, 1.0), {}, "logits must be float32"),
        ("fwd", (torch.randn(2, 0, **f32), tokens, 1.0), {}, "empty vocabulary"),
        ("fwd", (logits, torch.tensor([0, 1, 2], device=device), 1.0), {}, r"tokens must be \(N,\) = \(2,\)"),
        ("fwd", (logits, tokens.int(), 1.0), {}, "tokens must be int64"),
        ("fwd", (logits, torch.tensor([0, 1], device="meta"), 1.0), {}, "tokens is a meta tensor"),
        ("fwd", (logits, tokens, 0.0), {}, "temperature must be finite and > 0"),
        ("fwd", (logits, tokens, float("nan")), {}, "temperature must be finite and > 0"),
        ("fwd", (logits, tokens, 1.0), dict(block_v=3), "block_v must be a power of two"),
        ("fwd", (torch.randn(2, 5, device="meta"), torch.tensor([0, 1], device="meta"), 1.0), {},
         "logits is a meta tensor"),
        ("bwd", (per_row, torch.zeros(3, **f32), logits, tokens, per_row, per_row, 1.0), {},
         r"grad_entropy must be \(N,\) = \(2,\)"),
        ("bwd", (per_row, per_row, logits, tokens, per_row.long(), per_row, 1.0), {},
         "lse must be floating point"),
        ("bwd", (per_row, per_row, logits, tokens, per_row, per_row, -2.0), {},
         "temperature must be finite and > 0"),
    ]


def test_the_in_place_backward_refuses_logits_it_cannot_overwrite(tk, device):
    logits = torch.randn(4, 10, device=device)
    tokens = torch.zeros(4, dtype=torch.long, device=device)
    _, entropy, lse = tk.logprob_entropy_triton(logits, tokens, 1.0)
    ones = torch.ones(4, device=device)
    with pytest.raises(ValueError, match="contiguous .* to be overwritten"):
        tk.logprob_entropy_backward_triton(ones, ones, logits.t().contiguous().t(), tokens, lse,
                                           entropy, 1.0, in_place=True)


def test_bad_arguments(tk, device):
    for which, args, kwargs, match in _bad_calls(device):
        fn = tk.logprob_entropy_triton if which == "fwd" else tk.logprob_entropy_backward_triton
        with pytest.raises(ValueError, match=match):
            fn(*args, **kwargs)
    # Through the registered op too: the launcher's ValueError reaches the caller.
    with pytest.raises(ValueError, match="token_logprob_entropy_triton: tokens must be int64"):
        torch.ops.riskpo.token_logprob_entropy_triton(torch.randn(2, 5, device=device),
                                                      torch.tensor([0, 1], dtype=torch.int32, device=device),
                                                      1.0)


def test_out_of_range_tokens(tk, device):
    logits = torch.randn(2, 5, device=device)
    if device.type == "cpu":
        for bad in (7, -1):
            with pytest.raises(ValueError, match=r"tokens must lie in \[0, 5\)"):
                tk.logprob_entropy_triton(logits, torch.tensor([0, bad]), 1.0)
    else:  # no host sync on CUDA: the kernel reads nothing outside the row, and says NaN
        logprobs, entropy, _ = tk.logprob_entropy_triton(logits, torch.tensor([0, 7], device=device), 1.0)
        assert torch.isfinite(logprobs[0]) and torch.isnan(logprobs[1]) and torch.isfinite(entropy).all()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_public_losses_with_triton_match_reference(device, agg):
    """rk.policy_loss and rk.fused_linear_policy_loss through the triton ops."""
    import riskpo_kernels as rk

    g = _seed("public", agg)
    B, T, H, V = 2, 3, 8, 37
    hidden = torch.randn(B, T, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device)
    tokens = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = torch.tensor([[True, True, False], [False, False, False]], device=device)
    advantages = torch.tensor([0.7, -1.2], device=device)
    old = (torch.randn(B, T, generator=g) * 0.5 - 3.6).to(device)
    kwargs = dict(old_logprobs=old, entropy_coef=0.01, temperature=0.8, agg=agg)

    def grads(fn, impl):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(h, w, impl)
        out.loss.backward()
        return out, h.grad, w.grad

    def logits_path(h, w, impl):
        return rk.policy_loss(h @ w.t(), tokens, mask, advantages, impl=impl, **kwargs)

    def fused_path(h, w, impl):
        return rk.fused_linear_policy_loss(h, w, tokens, mask, advantages, chunk_size=4,
                                           impl=impl, **kwargs)

    want, want_h, want_w = grads(logits_path, "reference")
    for fn in (logits_path, fused_path):
        got, got_h, got_w = grads(fn, "triton")
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
        # The fused loss never computes masked rows: 0 there (docs/api.md).
        torch.testing.assert_close(got.logprobs[mask], want.logprobs[mask], rtol=1e-5, atol=1e-5)
        if fn is fused_path:
            assert torch.all(got.logprobs[~mask] == 0)
        torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_differentiable_fused_linear_logprobs(tk, device, dtype, with_bias):
    # rk.fused_linear_logprobs on the Triton kernels: values and gradients
    # against autograd through the materialised logits.
    check_fused_logprob_gradients("triton", dtype, with_bias, device=device)


def test_inplace_backward_writes_the_gradient_over_the_logits(tk, device):
    check_inplace_backward("triton", device)
