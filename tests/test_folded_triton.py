"""The folded fused-linear Triton kernels (riskpo_kernels/policy/folded_triton.py)
against the chunked fused-linear path (vocab_impl="cpp") and against autograd
through the float64 reference: loss, log-probs, entropies and every gradient,
at odd shapes (V not a multiple of any tile, chunks that do not divide N),
with and without bias, temperature 0.7, KL and entropy terms, extreme logits,
padding rows holding NaN; then the bf16 launches compiled for sm_90a.

float32 only under the interpreter: there a bf16 tl.dot multiplies bit
patterns (triton-lang/triton issue 11584) and a float32 -> bf16 cast
truncates where the card rounds. On a CUDA device the same tests run compiled.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from riskpo_kernels.policy import fused_linear as fl
from riskpo_kernels.policy.reference import logprobs_and_entropy_reference
from riskpo_kernels.policy.token_loss import per_token_loss, weighted_sum

from conftest import (H100_SHARED_PER_BLOCK, assert_error_budget, compile_for_sm90, triton_device,
                      triton_mode)

ROOT = Path(__file__).resolve().parent.parent

# As tests/test_policy_loss_triton.py: the interpreter must be chosen before
# triton is first imported, so it is set at collection on a torch built
# without CUDA/ROCm (an explicit TRITON_INTERPRET=0 is kept).
if torch.version.cuda is None and torch.version.hip is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def _mode():
    """'cuda', 'cpu' (interpreter) or 'fresh-process' (conftest.triton_mode)."""
    return triton_mode("riskpo_kernels.policy.folded_triton", "the folded kernels")


@pytest.fixture(scope="module")
def device(_mode):
    """CUDA where present, else the CPU under TRITON_INTERPRET=1."""
    return triton_device(_mode)


def test_in_a_fresh_process(_mode):
    if _mode != "fresh-process":
        pytest.skip("not needed: the tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "not fresh_process and not sm90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def ft(device):
    return importlib.import_module("riskpo_kernels.policy.folded_triton")


@pytest.fixture(scope="module")
def small(ft):
    """Tiny blocks, so N = 37, V = 300, H = 24 span several tiles of each
    kernel with tails; the backward vocabulary blocks (32) are half the
    forward's (64), so two backward blocks share one column of alpha."""
    return ft.FoldedConfig(forward=ft.Tiles(16, 64, 16, 1, 1), dhidden=ft.Tiles(16, 32, 16, 1, 1),
                           dweight=ft.Tiles(16, 32, 16, 1, 1), target=16)


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_case(N=37, H=24, V=300, bias=True, key=(), extreme=False, targets=None):
    """hidden (N, H), weight (V, H), bias, tokens and the loss's per-row inputs.
    extreme: entries on a grid of 1/8 so every logit (|z| up to ~50) and every
    partial sum of the products is exact in float32, whatever the summation
    order: both paths see the same logits, and what is compared is the
    vocabulary math alone."""
    g = _gen(N, H, V, bias, extreme, targets, *key)
    if extreme:
        hidden = torch.randint(-4, 5, (N, H), generator=g).double()
        weight = torch.randint(-12, 13, (V, H), generator=g).double() / 8
        b = torch.randint(-40, 41, (V,), generator=g).double() / 8 if bias else None
    else:
        hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
        weight = torch.randn(V, H, generator=g, dtype=torch.float64) / H ** 0.5 * 2
        b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    tokens = torch.randint(0, V, (N,), generator=g) if targets is None else targets(g, N, V)
    weights = torch.rand(N, generator=g, dtype=torch.float64) + 0.1
    weights[[1, N // 2]] = 0  # padding rows
    advantages = torch.randn(N, generator=g, dtype=torch.float64)
    return dict(hidden=hidden, weight=weight, bias=b, tokens=tokens, weights=weights,
                advantages=advantages, g=g)


def _old_ref(case, temperature, with_old, with_ref):
    """old/ref log-probs near the policy's own (ratios near 1, some clipped)."""
    logits = case["hidden"] @ case["weight"].T + (0 if case["bias"] is None else case["bias"])
    lp = torch.log_softmax(logits / temperature, -1).gather(1, case["tokens"][:, None]).squeeze(1)
    g = case["g"]
    old = lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=torch.float64) if with_old else None
    ref = lp + 0.2 * torch.randn(lp.shape, generator=g, dtype=torch.float64) if with_ref else None
    return old, ref


def _args(case, device, dtype, temperature, with_old, with_ref, kl_coef, entropy_coef, chunk):
    old, ref = _old_ref(case, temperature, with_old, with_ref)

    def put(t, dt=dtype):
        return None if t is None else t.to(device=device, dtype=dt)

    return (put(case["hidden"]), put(case["weight"]), put(case["bias"]),
            case["tokens"].to(device), put(case["weights"], torch.float32),
            put(case["advantages"], torch.float32), put(old, torch.float32),
            put(ref, torch.float32), 0.2, 0.28, 3.0, kl_coef, entropy_coef, temperature, chunk)


NAMES = ("loss", "logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias")


def assert_outputs_close(got, want, rtol=1e-5, what=""):
    """Elementwise rtol and atol; for the loss and the gradients an atol of rtol
    times the output's largest entry: they are sums with cancellation, whose
    rounding scales with the terms, not with the result."""
    assert len(got) == len(want) == 6
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, name, a.shape, b.shape, a.dtype,
                                                           b.dtype)
        a, b = a.cpu().double(), b.cpu().double()
        scale = b.abs().max().item() if b.numel() and name.startswith(("loss", "grad")) else 0.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(scale, 1.0),
                                   msg=lambda m: f"{what} {name}: {m}")


CASES = [
    # (bias, temperature, old, ref, kl_coef, entropy_coef, chunk)
    (True, 1.0, False, False, 0.0, 0.0, 64),    # one chunk, ratio 1
    (False, 0.7, True, False, 0.0, 0.0, 16),    # chunks of 12/12/13 rows, clipping
    (True, 0.7, True, True, 0.05, 0.01, 16),    # every term: the entropy prologue
    (False, 1.0, False, True, 0.1, -0.02, 37),  # entropy bonus of the other sign
]


@pytest.mark.parametrize("bias, temperature, old, ref, kl_coef, entropy_coef, chunk", CASES)
def test_matches_the_chunked_path(ft, small, device, bias, temperature, old, ref, kl_coef,
                                  entropy_coef, chunk):
    case = make_case(bias=bias, key=(temperature, old, ref, kl_coef, entropy_coef, chunk))
    args = _args(case, device, torch.float32, temperature, old, ref, kl_coef, entropy_coef, chunk)
    hidden_before = args[0].clone()
    got = ft.folded_fused_linear_policy_loss_forward(*args, config=small)
    assert torch.equal(args[0], hidden_before)
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    want = fl.fused_linear_policy_loss_forward(*cpu_args, "cpp")
    assert_outputs_close(got, want, what=f"bias={bias} T={temperature} chunk={chunk}")
    assert got[5].numel() == (300 if bias else 0)


def test_matches_float64_autograd(ft, small, device):
    """Sign and form of d logits: autograd through the float64 reference loss
    (log_softmax, per_token_loss) against the kernels' float32 answer."""
    temperature, kl_coef, entropy_coef = 0.7, 0.05, 0.01
    case = make_case(key=("autograd",))
    args = _args(case, device, torch.float32, temperature, True, True, kl_coef, entropy_coef, 16)
    got = ft.folded_fused_linear_policy_loss_forward(*args, config=small)
    h, w, b = (case[n].clone().requires_grad_() for n in ("hidden", "weight", "bias"))
    logprobs, entropy = logprobs_and_entropy_reference(h @ w.T + b, case["tokens"], temperature)
    old, ref = (a.double().cpu() for a in args[6:8])
    per_token, _ = per_token_loss(logprobs, entropy, case["advantages"], old, ref, 0.2, 0.28, 3.0,
                                  kl_coef, entropy_coef)
    loss = weighted_sum(case["weights"], per_token)
    loss.backward()
    want = (loss.detach(), logprobs.detach(), entropy.detach(), h.grad, w.grad, b.grad)
    assert_outputs_close([x.double() for x in got], want, rtol=2e-5, what="float64 autograd")


def test_extreme_logits(ft, small, device):
    """Logits up to ~+-50 (z up to ~70 at T 0.7): one word dominates most rows,
    so log-probs near 0 and entropies near 0 must come out of a cancellation
    of base-2 exponents, with E bounded by 2 and no overflow."""
    case = make_case(key=("extreme",), extreme=True)
    logits = case["hidden"] @ case["weight"].T + case["bias"]
    assert logits.abs().max() > 40
    for temperature in (1.0, 0.7):
        args = _args(case, device, torch.float32, temperature, True, True, 0.05, 0.01, 16)
        got = ft.folded_fused_linear_policy_loss_forward(*args, config=small)
        cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
        want = fl.fused_linear_policy_loss_forward(*cpu_args, "cpp")
        assert all(torch.isfinite(x).all() for x in got)
        assert_outputs_close(got, want, what=f"extreme T={temperature}")


def test_targets_in_one_block_and_repeated(ft, small, device):
    """Every target in one vocabulary block, most of them the same word: the
    d weight kernel's one-hot term loops over several blocks of target rows
    (37 > 16) and sums repeated words."""
    case = make_case(key=("targets",),
                     targets=lambda g, N, V: torch.randint(40, 44, (N,), generator=g))
    args = _args(case, device, torch.float32, 0.7, True, False, 0.0, 0.0, 64)
    got = ft.folded_fused_linear_policy_loss_forward(*args, config=small)
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    assert_outputs_close(got, fl.fused_linear_policy_loss_forward(*cpu_args, "cpp"), what="targets")


def test_default_config_and_last_word(ft, device):
    """The launcher's own blocks, a single row and the vocabulary's last word as target."""
    case = make_case(N=5, H=40, V=131, key=("default",),
                     targets=lambda g, N, V: torch.full((N,), V - 1, dtype=torch.int64))
    args = _args(case, device, torch.float32, 1.0, True, True, 0.1, 0.01, 2)
    got = ft.folded_fused_linear_policy_loss_forward(*args)
    cpu_args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    assert_outputs_close(got, fl.fused_linear_policy_loss_forward(*cpu_args, "cpp"), what="default")
    one = tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 5 else a
                for a in args)
    got = ft.folded_fused_linear_policy_loss_forward(*one)
    cpu_one = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in one)
    assert_outputs_close(got, fl.fused_linear_policy_loss_forward(*cpu_one, "cpp"), what="one row")


def test_public_function_with_impl_triton_folded(ft, device):
    """impl="triton-folded" reaches the folded kernels through the backend seam
    (the op's vocab_impl) and gives the C++ path's loss and gradients, masked
    rows gathered away as on every path; float64 runs the chunked path."""
    import riskpo_kernels as rk

    g = _gen("public")
    B, T, H, V = 2, 5, 16, 70
    for dtype in (torch.float32, torch.float64):
        hidden = torch.randn(B, T, H, generator=g).to(dtype)
        weight = (0.3 * torch.randn(V, H, generator=g)).to(dtype)
        tokens = torch.randint(0, V, (B, T), generator=g)
        mask = torch.rand(B, T, generator=g) > 0.3
        advantages = torch.randn(B, generator=g).to(dtype)
        results = {}
        for impl, dev in (("triton-folded", device), ("cpp", torch.device("cpu"))):
            h, w = (t.to(dev).requires_grad_() for t in (hidden, weight))
            out = rk.fused_linear_policy_loss(h, w, tokens.to(dev), mask.to(dev),
                                              advantages.to(dev), impl=impl, chunk_size=4)
            out.loss.backward()
            results[impl] = [t.detach().cpu() for t in (out.loss, out.logprobs, h.grad, w.grad)]
        for got, want in zip(results["triton-folded"], results["cpp"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the interpreter's numpy max
def test_nan_in_padding_rows_stays_out(ft, small, device):
    """A padding row (weight 0) whose hidden state is NaN: its log-prob and
    entropy are NaN, the loss and every gradient are finite and equal those
    of the same batch with that row zeroed."""
    case = make_case(key=("nan",))
    args = list(_args(case, device, torch.float32, 1.0, True, False, 0.0, 0.01, 16))
    clean = list(args)
    clean[0] = args[0].clone()
    clean[0][1] = 0
    args[0] = clean[0].clone()
    args[0][1] = float("nan")
    got = ft.folded_fused_linear_policy_loss_forward(*args, config=small)
    want = ft.folded_fused_linear_policy_loss_forward(*clean, config=small)
    assert torch.isnan(got[1][1]) and torch.isnan(got[2][1])
    for name, a, b in zip(NAMES, got, want):
        if name in ("logprobs", "entropy"):
            a, b = a[torch.arange(a.shape[0]) != 1], b[torch.arange(b.shape[0]) != 1]
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_no_rows(ft, small, device):
    case = make_case(key=("empty",))
    args = _args(case, device, torch.float32, 1.0, False, False, 0.0, 0.0, 16)
    empty = tuple(a[:0] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == 37 else a
                  for a in args)
    loss, lp, ent, gh, gw, gb = ft.folded_fused_linear_policy_loss_forward(*empty, config=small)
    assert loss.item() == 0 and lp.shape == (0,) and gh.shape == (0, 24)
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))


def test_bad_arguments(ft, small, device):
    case = make_case(key=("bad",))
    args = list(_args(case, device, torch.float32, 1.0, False, False, 0.0, 0.0, 16))
    call = ft.folded_fused_linear_policy_loss_forward
    with pytest.raises(TypeError, match="float64"):
        call(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() and i < 3 else a
               for i, a in enumerate(args)])
    bad = list(args)
    bad[1] = args[1][:, :5]
    with pytest.raises(ValueError, match="weight must be"):
        call(*bad)
    if device.type == "cpu":  # checked where it costs no sync
        bad = list(args)
        bad[3] = args[3].clone()
        bad[3][0] = 300
        with pytest.raises(ValueError, match="tokens must lie in"):
            call(*bad)
    with pytest.raises(ValueError, match="chunk_size"):
        call(*args[:-1], 0)
    with pytest.raises(ValueError, match="must divide config.forward.vocab"):
        call(*args, config=ft.FoldedConfig(ft.Tiles(16, 32, 16), ft.Tiles(16, 64, 16),
                                           ft.Tiles(16, 32, 16)))
    with pytest.raises(ValueError, match="power of two"):
        call(*args, config=ft.FoldedConfig(ft.Tiles(16, 48, 16), ft.Tiles(16, 16, 16),
                                           ft.Tiles(16, 16, 16)))
    with pytest.raises(TypeError, match="config must be a FoldedConfig"):
        call(*args, config={"forward": 1})


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_16bit_on_a_card_within_the_chunked_paths_error(ft, device, dtype):
    """bf16/fp16 (compiled only: the interpreter's 16-bit dot is wrong) at the
    launcher's own blocks: each output's error against float64 autograd is at
    most twice that of the chunked path on the same 16-bit inputs
    (flash-attention's criterion; the chunked path rounds its logits to 16
    bits, the folded kernels keep them in float32)."""
    if device.type != "cuda":
        pytest.skip("a 16-bit tl.dot is only right compiled (triton issue 11584)")
    case = make_case(N=300, H=256, V=5000, key=("16bit", dtype))
    args = _args(case, device, dtype, 0.7, True, True, 0.05, 0.01, 128)
    got = ft.folded_fused_linear_policy_loss_forward(*args)
    chunked = fl.fused_linear_policy_loss_forward(*args, "triton")
    # The exact answer on the same (16-bit rounded) inputs, in float64.
    exact = fl.fused_linear_policy_loss_forward(
        *[a.cpu().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else
          a.cpu() if isinstance(a, torch.Tensor) else a for a in args], "cpp")
    for name, a, b, e in zip(NAMES, got, chunked, exact):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_error_budget(a.cpu(), b.cpu(), e, floor=1e-5)


# ---- the sm_90a compile, as launched ----------------------------------------------
#
# As tests/test_token_loss_triton.py: a fresh process with TRITON_INTERPRET=0
# runs the launcher on CPU tensors with its launch seam (_run) recording, at
# the shapes and blocks (each of CUDA_16BIT_CANDIDATES) of a bf16 call at H 1536 (bias, entropy
# term, two chunks: FIRST both ways) and H 4096 (neither, 300 rows: no
# divisibility of M). Each recorded launch is bound by triton's own binder for
# a CUDA sm_90 target (signature, 16-byte divisibility attributes, options),
# compiled, and cuobjdump reads registers, stack, local (spill) memory and
# static shared memory; triton's metadata has the dynamic shared memory.
COMPILE = r"""
import itertools, json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from triton.backends.nvidia.compiler import get_ptxas
from riskpo_kernels.policy import folded_triton as ft

calls = []
ft._run = lambda kernel, grid, *args, **meta: calls.append((kernel, args, meta))
ft.INTERPRETED = True  # lets the launcher take CPU tensors; nothing is launched
labels = []
for (config_name, config), (H, N, chunk, bias, ent) in itertools.product(
        ft.CUDA_16BIT_CANDIDATES.items(),
        ((1536, 512, 256, True, 0.01), (4096, 300, 300, False, 0.0))):
    V = 2048  # only V % 16 reaches the specialisation (151936 % 16 == 0 as well)
    h = torch.zeros(N, H, dtype=torch.bfloat16)
    w = torch.zeros(V, H, dtype=torch.bfloat16)
    b = torch.zeros(V, dtype=torch.bfloat16) if bias else None
    x = torch.ones(N)
    before = len(calls)
    ft.folded_fused_linear_policy_loss_forward(h, w, b, torch.zeros(N, dtype=torch.int64), x, x,
                                               x, x, 0.2, 0.28, 3.0, 0.05, ent, 1.0, chunk,
                                               config=config)
    label = f"{config_name}/H{H}/M{chunk}/bias{int(bias)}ent{int(ent != 0)}"
    labels += [label] * (len(calls) - before)
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
cuobjdump = os.path.join(os.path.dirname(get_ptxas(target.arch).path), "cuobjdump")
out, seen = {}, set()
for label, (kernel, args, meta) in zip(labels, calls):
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, _ = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(meta), bound,
                                                              specialization, None)
    key = (kernel.fn.__name__, repr(signature), repr(sorted(constexprs.items(), key=repr)),
           repr(attrs))
    if key in seen:
        continue
    seen.add(key)

    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    name = f"{kernel.fn.__name__}/{label}"
    if kernel is ft._dweight_kernel:
        name += f"/first{int(meta['FIRST'])}"
    out[name] = {
        "target": re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1),
        "num_warps": compiled.metadata.num_warps, "num_stages": options.num_stages,
        "aligned": sum(1 for a in attrs.values() if a),
        "registers": int(fields["REG"]), "stack": int(fields["STACK"]),
        "local": int(fields["LOCAL"]),
        "shared": int(fields["SHARED"]) + compiled.metadata.shared,
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "ex2": len(re.findall(r"\bex2\.approx", ptx)),
        "lg2": len(re.findall(r"\blg2\.approx", ptx)),
        "libdevice_log": len(re.findall(r"__nv_log", ptx)),
    }
print(json.dumps(out))

"""

@pytest.fixture(scope="module")
def sm90():
    return compile_for_sm90(COMPILE, ROOT, "the kernels")


def test_sm90_compile_fits_the_h100(sm90):
    print(json.dumps(sm90, indent=1))  # the numbers, with -s
    kernels = {name.split("/")[0] for name in sm90}
    assert {name.split("/")[1] for name in sm90} == {"default", "wide"}
    assert kernels == {"_fwd_kernel", "_dhidden_kernel", "_dweight_kernel"}, sorted(sm90)
    # Per config, 3 kernels at 2 shapes, d weight FIRST both ways at H 1536.
    assert len(sm90) == 7 * 2, sorted(sm90)
    for name, r in sm90.items():
        assert r["target"] == "sm_90a" and r["num_warps"] == 8, (name, r)
        assert r["registers"] <= 255, (name, r)
        assert r["local"] == 0 and r["stack"] == 0, (name, r)  # no spills
        assert r["shared"] <= H100_SHARED_PER_BLOCK, (name, r)
        assert r["wgmma"] > 0, (name, r)  # Hopper's tensor-core path, not mma.sync
        assert r["libdevice_log"] == 0, (name, r)
        if name.startswith("_fwd_kernel"):
            assert r["ex2"] > 0 and r["lg2"] == 0, (name, r)
        else:
            # The point of the fold: no exp per element in the backward
            # prologue, and one lg2.approx only with an entropy term.
            assert r["ex2"] == 0, (name, r)
            assert (r["lg2"] > 0) == ("ent1" in name), (name, r)
