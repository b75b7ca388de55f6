"""The per-row PPO-clip kernel (token_loss_triton.token_loss_and_grads_triton)
against its definition, token_loss.token_loss_and_grads: random rows (both
clip sides, the dual clip, |logp - old| > 20, missing old/ref, KL and entropy
coefficients 0 and not), exact ties on the clip bounds and the dual clip,
non-finite inputs at rows of weight 0 (exact 0 gradients) and at rows of
weight != 0 (the same NaN/inf), tails of the block, float32 and float64; and
its sm_90a compile with the launcher's real specialisation attributes.

Runs on a CUDA device, or on the CPU under Triton's interpreter (the set-up
is test_policy_loss_triton.py's: see its comment).
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from riskpo_kernels.policy.token_loss import per_token_loss, token_loss_and_grads

from conftest import H100_SHARED_PER_BLOCK, compile_for_sm90, triton_device, triton_mode

ROOT = Path(__file__).resolve().parents[1]

if torch.version.cuda is None and torch.version.hip is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DTYPES = (torch.float32, torch.float64)
# (rtol, atol) of the gradients: both sides do the same IEEE operations in the
# same order except exp (numpy's under the interpreter, ex2.approx on the card
# for float32, torch's Sleef / CUDA expf in the definition), a few ulps apart.
GRAD_TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14)}
# The loss: summed in another order, so relative to sum |w l|.
LOSS_REL = {torch.float32: 4e-6, torch.float64: 1e-13}


@pytest.fixture(scope="module")
def _mode():
    """'cuda', 'cpu' (interpreter) or 'fresh-process' (conftest.triton_mode)."""
    return triton_mode("riskpo_kernels.policy.token_loss_triton", "the token-loss kernel")


@pytest.fixture(scope="module")
def device(_mode):
    """CUDA where present, else the CPU under TRITON_INTERPRET=1."""
    return triton_device(_mode)


@pytest.fixture(scope="module")
def tlt(device):
    return importlib.import_module("riskpo_kernels.policy.token_loss_triton")


def test_in_a_fresh_process(_mode):
    if _mode != "fresh-process":
        pytest.skip("not needed: the tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "not fresh_process and not sm90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    last = result.stdout.splitlines()[-1]
    assert " passed" in result.stdout and "skipped" not in last, result.stdout[-2000:]


def _seed(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def random_rows(N, dtype, g, poison=True, far=True):
    """Inputs of token_loss_and_grads, (N,) each: ratios on both sides of the
    clip, both signs of A, some |logp - old| > 20 when ``far``, some weights 0
    (with NaN/inf logp/old/ref/A/H there when ``poison``)."""
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)
    n = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    logp = -r(N) * 6
    old = logp + n(N) * 0.4
    far = (r(N) < 0.1) & far
    old = torch.where(far, logp - torch.sign(n(N)) * (20 + 10 * r(N)), old)
    rows = dict(logprobs=logp, entropy=r(N) * 3, weights=r(N) + 0.1, advantages=n(N) * 2,
                old_logprobs=old, ref_logprobs=logp + n(N) * 0.5)
    zero = r(N) < 0.25
    zero[0] = N > 1  # a weight-0 row (but keep N = 1's only row active)
    rows["weights"] = torch.where(zero, 0.0, rows["weights"])
    if poison:
        bad = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
        for name in ("logprobs", "entropy", "advantages", "old_logprobs", "ref_logprobs"):
            pick = bad[torch.randint(0, 3, (N,), generator=g)]
            rows[name] = torch.where(zero & (r(N) < 0.5), pick, rows[name])
    return {k: t.to(dtype) for k, t in rows.items()}


CONFIGS = [  # (with old, with ref, kl_coef, entropy_coef, clip_low, clip_high, clip_ratio_c)
    (True, True, 0.1, 0.01, 0.2, 0.2, 3.0),
    (True, False, 0.0, 0.0, 0.2, 0.28, 3.0),
    (False, True, 0.0, 0.0, 0.2, 0.2, 3.0),     # KL term with coefficient 0: still applied
    (False, False, 0.0, 0.05, 0.1, 0.3, 1.5),
    (True, True, 0.0, -0.02, 0.5, 0.0, 1.01),  # clip_high 0, a negative entropy coefficient
]


def call_both(tlt, rows, device, cfg):
    with_old, with_ref, kl_coef, entropy_coef, clip_low, clip_high, clip_c = cfg
    args = [rows["logprobs"], rows["entropy"], rows["weights"], rows["advantages"],
            rows["old_logprobs"] if with_old else None, rows["ref_logprobs"] if with_ref else None,
            clip_low, clip_high, clip_c, kl_coef, entropy_coef]
    want = token_loss_and_grads(*args)
    on_device = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    before = [a.clone() for a in on_device if isinstance(a, torch.Tensor)]
    got = tlt.token_loss_and_grads_triton(*on_device)
    after = [a for a in on_device if isinstance(a, torch.Tensor)]
    assert all(torch.equal(b.isnan(), a.isnan()) and torch.equal(b.nan_to_num(), a.nan_to_num())
               for b, a in zip(before, after)), "the kernel wrote an input"
    per_token, _ = per_token_loss(*args[:2], *args[3:6], *args[6:])
    w = args[2].to(per_token.dtype)
    scale = torch.where(w != 0, (w * per_token).abs(), 0).sum()
    return [t.cpu() for t in got], want, scale


def assert_matches(got, want, scale, dtype, what):
    loss, grad_lp, grad_h = got
    assert loss.shape == () and loss.dtype == dtype, what
    for name, t in (("grad_logprobs", grad_lp), ("grad_entropy", grad_h)):
        assert t.dtype == dtype and t.shape == want[1].shape, (name, what)
    rtol, atol = GRAD_TOL[dtype]
    tol = LOSS_REL[dtype] * (scale.item() if math.isfinite(scale.item()) else 1.0)
    torch.testing.assert_close(loss, want[0], rtol=rtol, atol=tol, equal_nan=True,
                               msg=lambda m: f"loss {what}: {m}")
    torch.testing.assert_close(grad_lp, want[1], rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"grad_logprobs {what}: {m}")
    # -entropy_coef w or 0: one multiply, exact on both sides.
    torch.testing.assert_close(grad_h, want[2], rtol=0, atol=0,
                               msg=lambda m: f"grad_entropy {what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", (1, 7, 37, 1025))
def test_matches_the_definition_on_random_rows(tlt, device, dtype, N):
    # Without rows past |logp - old| = 20 too: their ~1e9 losses would hide a
    # wrong loss term of the other rows under the loss's tolerance.
    for (i, cfg), far in itertools.product(enumerate(CONFIGS), (True, False)):
        rows = random_rows(N, dtype, _seed("random", dtype, N, i, far), far=far)
        got, want, scale = call_both(tlt, rows, device, cfg)
        what = f"N={N} cfg={cfg} far={far}"
        assert_matches(got, want, scale, dtype, what)
        # Padding rows: exactly 0, whatever was computed from their NaN/inf inputs.
        zero = rows["weights"] == 0
        assert torch.equal(got[1][zero], torch.zeros(int(zero.sum()), dtype=dtype)), what
        assert torch.equal(got[2][zero], torch.zeros(int(zero.sum()), dtype=dtype)), what
        assert math.isfinite(got[0].item()), f"a padding row reached the loss: {what}"


@pytest.mark.parametrize("N", (5, 16, 32, 37))
def test_small_blocks_tails_and_multiples(tlt, device, monkeypatch, N):
    """Several programs with a 16-row block: tails (5, 37) and exact multiples (16, 32)."""
    monkeypatch.setattr(tlt, "BLOCK_N", 16)
    for dtype in DTYPES:
        rows = random_rows(N, dtype, _seed("blocks", dtype, N))
        got, want, scale = call_both(tlt, rows, device, CONFIGS[0])
        assert_matches(got, want, scale, dtype, f"N={N} block 16")


def test_mixed_input_dtypes(tlt, device):
    """Weights/advantages in bf16, old in float64, ref in float16: cast to
    logprobs' dtype on load, as the definition's .to(acc) does."""
    rows = random_rows(29, torch.float64, _seed("mixed"), poison=False)
    rows = dict(rows, logprobs=rows["logprobs"].float(), entropy=rows["entropy"].float(),
                weights=rows["weights"].bfloat16(), advantages=rows["advantages"].bfloat16(),
                ref_logprobs=rows["ref_logprobs"].half())
    got, want, scale = call_both(tlt, rows, device, CONFIGS[0])
    assert_matches(got, want, scale, torch.float32, "mixed dtypes")


def kernel_ratios(tlt, diffs, dtype, device):
    """The kernel's own exp(clamp(diff)) per row: with A = -1, w = 1 and bounds
    no ratio reaches, grad_logprobs = -A ratio = ratio exactly."""
    diffs = diffs.to(dtype)
    logp = torch.full_like(diffs, -1.0)
    old = logp - diffs
    assert torch.equal(logp - old, diffs)  # the test's diffs are exact
    ones = torch.ones_like(diffs)
    _, grad, _ = tlt.token_loss_and_grads_triton(
        logp.to(device), ones.to(device), ones.to(device), (-ones).to(device), old.to(device),
        clip_low=0.999, clip_high=1e30, clip_ratio_c=1e30)
    return grad.cpu()


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_on_the_clip_bounds_and_the_dual_clip(tlt, device, dtype):
    """Ratios exactly at 1 - clip_low, 1 + clip_high and clip_ratio_c, where
    the clamp's closed interval and _tie_split's even split decide: the
    gradients bit for bit those of the definition. A bound is set from a
    ratio that the kernel and torch compute alike (exp can differ by an ulp:
    such diffs are not used), so both see the same exact tie."""
    candidates = torch.arange(1, 61, dtype=torch.float64) / 128  # exact in both dtypes
    mine = kernel_ratios(tlt, candidates, dtype, device)
    theirs = torch.exp(candidates.to(dtype))
    same = (mine == theirs).nonzero().squeeze(1)
    theirs_neg = torch.exp(-candidates.to(dtype))
    same_neg = (kernel_ratios(tlt, -candidates, dtype, device) == theirs_neg).nonzero().squeeze(1)
    assert len(same) >= 3 and len(same_neg) >= 1, "the kernel's exp never agrees with torch's"
    # dual > up: a ratio past the upper bound, equal to clip_ratio_c.
    up, dual = candidates[same[0]].item(), candidates[same[-1]].item()
    down = -candidates[same_neg[0]].item()
    r_up, r_dual, r_down = (theirs[same[0]].item(), theirs[same[-1]].item(),
                            theirs_neg[same_neg[0]].item())
    # 1 + (r - 1) and 1 - (1 - r) are r exactly (r in (1/2, 2)).
    clip_high, clip_low, clip_c = r_up - 1, 1 - r_down, r_dual
    assert 1 + clip_high == r_up and 1 - clip_low == r_down
    diffs = torch.tensor([up, up, up, down, down, down, dual, dual, dual, 0.0, 20.0, -20.0,
                          20.0, 20.5, -20.5], dtype=torch.float64).to(dtype)
    A = torch.tensor([1.5, -1.5, 0.0, 1.5, -1.5, -0.25, -1.0, -3.0, 2.0, -1.0, -1.0, 1.0,
                      1.0, -1.0, 1.0], dtype=dtype)
    logp = torch.full_like(diffs, -1.0)
    rows = dict(logprobs=logp, entropy=torch.zeros_like(logp), weights=torch.ones_like(logp) * 0.75,
                advantages=A, old_logprobs=logp - diffs, ref_logprobs=logp + 0.25)
    for with_ref in (False, True):
        cfg = (True, with_ref, 0.1 * with_ref, 0.0, clip_low, clip_high, clip_c)
        got, want, _ = call_both(tlt, rows, device, cfg)
        if not with_ref:
            # The ties really are ties in the definition (else this test tests nothing).
            _, t = per_token_loss(logp, None, A, logp - diffs, None, clip_low, clip_high, clip_c)
            assert t.ratio[0] == 1 + clip_high and t.ratio[3] == 1 - clip_low
            assert t.clipped[6] == t.l3[6] and want[1][6] == 0.75 * t.ratio[6] / 2
            # Rows 0-9 use only the ratios both compute alike: bit for bit.
            torch.testing.assert_close(got[1][:10], want[1][:10], rtol=0, atol=0)
            assert got[1][12:].eq(0).all() and got[1][11] != 0, got[1]
        # Rows 10-14: |diff| = 20 passes the gradient, 20.5 does not; exp(+-20)
        # (and exp(ref - logp)) may be an ulp apart.
        assert_matches(got, want, torch.tensor(1.0), dtype, f"ties, ref={with_ref}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_ratio_clamp_passes_the_gradient_on_its_closed_interval(tlt, device, dtype):
    """|logp - old| = 20 exactly: the gradient passes (clamp's closed interval);
    one ulp beyond it, it is 0. clip_ratio_c above exp(20) keeps the dual clip
    out of the way, so the unclipped branch wins for A < 0 past the bound."""
    twenty = torch.tensor(20.0, dtype=dtype)
    beyond = torch.nextafter(twenty, torch.tensor(math.inf, dtype=dtype))
    diffs = torch.stack([twenty, -twenty, beyond, -beyond, twenty, -twenty])
    A = torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.5, -0.5], dtype=dtype)
    logp = torch.full_like(diffs, -1.0)
    old = logp - diffs
    assert torch.equal(logp - old, diffs)
    rows = dict(logprobs=logp, entropy=torch.zeros_like(logp), weights=torch.ones_like(logp),
                advantages=A, old_logprobs=old, ref_logprobs=None)
    got, want, scale = call_both(tlt, rows, device, (True, False, 0.0, 0.0, 0.2, 0.2, 1e9))
    assert_matches(got, want, scale, dtype, "closed clamp interval")
    assert (want[1][:2] != 0).all() and (want[1][2:] == 0).all()
    assert (got[1][:2] != 0).all() and (got[1][2:] == 0).all(), got[1]


def test_non_finite_inputs_at_active_rows_match_the_definition(tlt, device):
    """At weight != 0 a NaN or inf is reported as the definition reports it
    (A = +-inf ties l1 and l2 at -+inf; d l2 = d l1 * 0 is NaN off the clip
    interval), never turned into a number."""
    inf, nan = math.inf, math.nan
    for dtype in DTYPES:
        logp = torch.tensor([-1.0, -1.0, -1.0, -1.0, nan, -inf, -1.0, -1.0, -1.0], dtype=dtype)
        old = torch.tensor([-1.5, -1.0, -1.5, -0.5, -1.0, -1.0, nan, inf, -1.0], dtype=dtype)
        A = torch.tensor([inf, inf, -inf, nan, 1.0, 1.0, 1.0, -1.0, 1.0], dtype=dtype)
        H = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, inf], dtype=dtype)
        rows = dict(logprobs=logp, entropy=H, weights=torch.ones_like(logp), advantages=A,
                    old_logprobs=old, ref_logprobs=logp - 0.5)
        for cfg in CONFIGS:
            got, want, _ = call_both(tlt, rows, device, cfg)
            assert torch.equal(got[1].isnan(), want[1].isnan()), (dtype, cfg, got[1], want[1])
            assert_matches(got, want, torch.tensor(1.0), dtype, f"non-finite {cfg}")


def test_empty_rows_and_determinism(tlt, device):
    empty = torch.zeros(0, device=device)
    loss, grad_lp, grad_h = tlt.token_loss_and_grads_triton(empty, empty, empty, empty)
    assert loss.shape == () and loss.item() == 0 and grad_lp.shape == grad_h.shape == (0,)
    rows = {k: t.to(device) for k, t in random_rows(3000, torch.float32, _seed("det")).items()}
    first = tlt.token_loss_and_grads_triton(*rows.values(), kl_coef=0.1, entropy_coef=0.01)
    second = tlt.token_loss_and_grads_triton(*rows.values(), kl_coef=0.1, entropy_coef=0.01)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "not bitwise reproducible"


def test_entropy_may_be_absent_without_its_term(tlt, device):
    rows = {k: t.to(device) for k, t in random_rows(9, torch.float64, _seed("noH")).items()}
    got = tlt.token_loss_and_grads_triton(rows["logprobs"], None, rows["weights"], rows["advantages"])
    want = tlt.token_loss_and_grads_triton(rows["logprobs"], rows["entropy"], rows["weights"],
                                           rows["advantages"])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_drop_in_for_the_fused_linear_chunk_loop(tlt, device, monkeypatch, dtype):
    """In place of token_loss_and_grads inside the fused-linear op's chunk loop
    (issue 18's hook on CUDA): the same loss and gradients, several chunks,
    padding, old/ref log-probs, KL and entropy terms."""
    import riskpo_kernels as rk
    from riskpo_kernels.policy import fused_linear

    g = _seed("fused", dtype)
    B, T, H, V = 2, 7, 8, 37
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype).to(device)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype).to(device)
    tokens = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(dtype).to(device)
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(dtype).to(device)
    old = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 3.5).to(dtype).to(device)
    ref = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 - 3.5).to(dtype).to(device)
    calls = []

    def kernel(*args, **kwargs):
        calls.append(args[0].shape[0])
        return tlt.token_loss_and_grads_triton(*args, **kwargs)

    # Once the op picks the kernel itself on CUDA (the hook's table, if present),
    # the baseline run is told not to.
    if isinstance(getattr(fused_linear, "ROW_MATH_TRITON", None), dict):
        monkeypatch.setitem(fused_linear.ROW_MATH_TRITON, device.type, False)
    results = []
    for swap in (False, True):
        if swap:
            monkeypatch.setattr(fused_linear, "token_loss_and_grads", kernel)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = rk.fused_linear_policy_loss(h, w, tokens, mask, adv, old_logprobs=old,
                                          ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.01,
                                          chunk_size=4, impl="triton")
        out.loss.backward()
        results.append((out.loss.detach(), h.grad, w.grad))
    assert len(calls) >= 2, calls  # several chunks went through the kernel
    rtol, atol = GRAD_TOL[dtype]
    for name, got, want in zip(("loss", "grad_hidden", "grad_weight"), results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=rtol * 10, atol=atol * 10, msg=name)


def test_bad_arguments(tlt, device):
    x = torch.zeros(4, device=device)
    call = tlt.token_loss_and_grads_triton
    with pytest.raises(TypeError, match="logprobs must be float32 or float64"):
        call(x.bfloat16(), x, x, x)
    with pytest.raises(ValueError, match=r"weights must be \(N,\) = \(4,\)"):
        call(x, x, x[:3], x)
    with pytest.raises(ValueError, match=r"logprobs must be \(N,\)"):
        call(x.view(2, 2), x, x, x)
    with pytest.raises(TypeError, match="advantages must be floating point"):
        call(x, x, x, x.long())
    with pytest.raises(TypeError, match="old_logprobs must be a tensor"):
        call(x, x, x, x, [0.0] * 4)
    with pytest.raises(TypeError, match="entropy must be a tensor"):
        call(x, None, x, x, entropy_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef must be a real number"):
        call(x, x, x, x, kl_coef="0.1")
    if device.type == "cuda":
        with pytest.raises(ValueError, match="ref_logprobs must be on logprobs' device"):
            call(x, x, x, x, None, x.cpu())


# ---- the sm_90a compile, as launched ----------------------------------------------
#
# Runs in a fresh process with TRITON_INTERPRET=0 (the kernel must be a JIT
# function). The launcher runs on CPU tensors with its launch seam (_run)
# recording instead of launching; each recorded call is bound by triton's own
# binder for a CUDA sm_90 target, so the signature, the 16-byte divisibility
# attributes (aligned and offset slices, N % 16 == 0 or not) and the options
# are what the card's launch would compile. cuobjdump reads the cubin's
# registers, stack, local (spill) memory and static shared memory; triton's
# metadata has the dynamic shared memory.
COMPILE = r"""
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.backends.nvidia.compiler import get_ptxas
try:  # triton's launch internals (3.7's names): without them, say so and stop
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature, JITFunction
    JITFunction._pack_args
except (ImportError, AttributeError) as error:
    print(json.dumps({"no_binder": f"{type(error).__name__}: {error}"}))
    sys.exit(0)
from riskpo_kernels.policy import token_loss_triton as tlt

calls = []
tlt._run = lambda grid, *args, **meta: calls.append((args, meta))
tlt.INTERPRETED = True  # lets the launcher take CPU tensors; nothing is launched
names = []
for dtype in (torch.float32, torch.float64):
    x = torch.randn(4099, dtype=dtype)
    for n, offset, old, ref, ent in ((3534, 0, True, True, 0.01), (2048, 0, True, False, 0.0),
                                     (1000, 3, False, True, 0.0), (257, 1, False, False, 0.05)):
        s = x[offset:offset + n]
        tlt.token_loss_and_grads_triton(s, s, s, s, s if old else None, s if ref else None,
                                        kl_coef=0.1, entropy_coef=ent)
        names.append(f"{str(dtype)[6:]}/N{n}+{offset}/old{int(old)}ref{int(ref)}ent{int(ent != 0)}")
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
kernel = tlt._token_loss_kernel
binder = create_function_from_signature(kernel.signature, kernel.params, backend)
cuobjdump = os.path.join(os.path.dirname(get_ptxas(target.arch).path), "cuobjdump")
out = {}
for name, (args, meta) in zip(names, calls):
    bound, specialization, _ = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(meta), bound,
                                                              specialization, None)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    out[name] = {
        "target": re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1),
        "num_warps": compiled.metadata.num_warps,
        "aligned": sum(1 for a in attrs.values() if a),
        "registers": int(fields["REG"]), "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        "shared": int(fields["SHARED"]) + compiled.metadata.shared,
        "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
        "contractible_f32": len(re.findall(r"\b(?:mul|add|sub)\.f32\b", ptx)),
        "ex2": len(re.findall(r"\bex2\.approx", ptx)),
        # torch.clamp/maximum/minimum propagate a NaN; PTX's plain min/max drop it.
        "minmax_f32": len(re.findall(r"\b(?:max|min)\.f32\b", ptx)),
        "minmax_nan_f32": len(re.findall(r"\b(?:max|min)\.NaN\.f32\b", ptx)),
    }
print(json.dumps(out))
"""

@pytest.fixture(scope="module")
def sm90():
    result = compile_for_sm90(COMPILE, ROOT, "the kernel")
    if "no_binder" in result:
        pytest.skip(f"triton {importlib.import_module('triton').__version__} lacks the launch "
                    f"internals this binds with ({result['no_binder']}); written for triton 3.7")
    return result


def test_sm90_compile_fits_the_h100(sm90):
    print(json.dumps(sm90, indent=1))  # the numbers, with -s
    assert len(sm90) == 8
    for name, r in sm90.items():
        assert r["target"] == "sm_90a" and r["num_warps"] == 4, (name, r)
        assert r["registers"] <= 255, (name, r)
        assert r["local"] == 0 and r["stack"] == 0, (name, r)  # no spills
        assert r["shared"] <= H100_SHARED_PER_BLOCK, (name, r)
        if name.startswith("float32"):
            # KERNEL_OPTIONS: no contracted multiply-add, so the card rounds as
            # the interpreter does (triton_kernels.py), up to exp's ex2.approx.
            # (float64's exp is libdevice's, written with fmas: exact to ~1 ulp.)
            assert r["fma_f32"] == 0 and r["contractible_f32"] == 0 and r["ex2"] > 0, (name, r)
            # The interpreter's min/max propagate NaN either way (numpy), so
            # only the PTX shows that the card's do too.
            assert r["minmax_f32"] == 0 and r["minmax_nan_f32"] > 0, (name, r)
    # The offset slices lose the 16-byte alignment of their inputs: another
    # specialisation, compiled and checked above as well.
    assert len({r["aligned"] for r in sm90.values()}) > 1
