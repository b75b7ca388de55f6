"""Shared test helpers. Nothing here queries a device at import time."""

from __future__ import annotations

import re
import sys
import zlib
from pathlib import Path

import pytest
import torch

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

# (rtol, atol) for outputs stored in each dtype, against the reference run on
# the same inputs. Low precision: both compute in float32 and round once on
# store, so they may land one unit in the last place apart.
TOLERANCES = {
    torch.float64: (1e-6, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2 * 2.0**-10, 1e-3),
    torch.bfloat16: (2 * 2.0**-7, 1e-2),
}


def assert_close_for(actual, expected, dtype, **kwargs):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, **kwargs)


def assert_error_budget(actual, low_precision_reference, exact, factor=2.0, floor=1e-6):
    """flash-attention's criterion: the kernel's error against an exact (float64)
    answer is at most `factor` times that of plain torch in the same precision,
    plus a relative `floor` (a few float32 ulps) under which both are rounding."""
    exact = exact.double()
    kernel_error = (actual.double() - exact).norm()
    torch_error = (low_precision_reference.double() - exact).norm()
    allowed = factor * torch_error + floor * exact.norm()
    assert kernel_error <= allowed, (kernel_error.item(), torch_error.item(), allowed.item())


def assert_compiled_matches_eager(step, x):
    """torch.compile(step, fullgraph=True) on x -> scalar gives the eager value and gradient."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss1, loss2 = compiled(x1), step(x2)
    loss1.backward()
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    torch.testing.assert_close(x1.grad, x2.grad)


def make_rewards(kind: str, num_prompts: int, group_size: int, generator, dtype=torch.float32,
                 device="cpu"):
    """(P * n,) rewards: binary {0, 1}, ternary {-1, 0, 1} or continuous."""
    shape = (num_prompts * group_size,)
    if kind == "binary":
        r = torch.randint(0, 2, shape, generator=generator).double()
    elif kind == "ternary":
        r = torch.randint(-1, 2, shape, generator=generator).double()
    elif kind == "continuous":
        r = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 0.5
    else:
        raise ValueError(kind)
    return r.to(dtype).to(device)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny model directory of the trainer's embedded task (context 16)."""
    from riskpo_train.model import build_char_tokenizer, build_tiny_model, save_model_dir

    path = tmp_path_factory.mktemp("models") / "tiny"
    tokenizer = build_char_tokenizer()
    save_model_dir(build_tiny_model(tokenizer, hidden_size=32, max_positions=16), tokenizer, path)
    return path


@pytest.fixture
def cuda_device():
    """Skips (at run time, not import) where no CUDA device is present."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import riskpo_kernels as rk

    if not rk.extension_with_cuda:
        pytest.fail("CUDA is present but riskpo_kernels was built without its CUDA kernels")
    return torch.device("cuda")


@pytest.fixture
def cpp_available():
    import riskpo_kernels as rk

    if not rk.extension_available:
        pytest.fail("the compiled extension is not built: run `make test`")


# ---- the `gpu` marker and the device check's plugin ---------------------------
#
# `gpu` marks every test that can touch CUDA or the Triton kernels on a card, so
# that benchmarks/device_check.sh runs them first (`-m gpu`) and the rest of the
# suite (`-m "not gpu"`) with the time left. It is set here, at collection, so
# no test file needs a decorator and a new test is covered when it is added. A
# test is marked when
#   - it uses the cuda_device fixture (test_cuda_* in test_risk_core_kernels.py,
#     test_cuda_graph_capture_of_the_whole_step in test_riskpo_policy_loss.py), or
#   - it is marked `cuda`, or
#   - its node id (file, name or parametrization id) says "cuda" or "triton",
#     case-insensitive. That catches every test in test_policy_loss_triton.py;
#     the [cuda] cases that ask for cuda_device through request.getfixturevalue
#     (test_risk_core_hand_cases.py, test_risk_core_kernels.py's sweeps,
#     test_risk_core_ops.py); test_cuda_source_compiles_with_nvcc and
#     test_cuda_dispatch_code_compiles (nvcc / the CUDA headers); and any case
#     parametrized by impl/device "triton" or "cuda" (test_policy_loss_fused_linear.py
#     has none at the time of writing: its cpp/reference cases stay unmarked).
# Not marked: the trainer runs in a subprocess with --device auto
# (test_train_demo.py, test_train_distributed.py), which use CUDA where present;
# the device check's training smoke step runs the trainer on the card instead.
# Check the set with `pytest --collect-only -q -m gpu`.
_GPU_IN_NODEID = re.compile(r"cuda|triton", re.IGNORECASE)


def touches_gpu(item) -> bool:
    return ("cuda_device" in getattr(item, "fixturenames", ())
            or item.get_closest_marker("cuda") is not None
            or _GPU_IN_NODEID.search(item.nodeid) is not None)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if touches_gpu(item):
            item.add_marker(pytest.mark.gpu)


def pytest_configure(config):
    """Registers tests/_device_plugin.py (failure log, counts, per-test time
    limits for the device check): inert unless its RISKPO_* variables are set.
    The device check loads it with -p already; then this is a no-op."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import _device_plugin

    if not config.pluginmanager.is_registered(_device_plugin):
        config.pluginmanager.register(_device_plugin, "riskpo-device-plugin")


def check_fused_logprob_gradients(impl, dtype, with_bias, device="cpu", chunk_size=4):
    """rk.fused_linear_logprobs(impl) against impl="reference" (autograd through
    the materialised logits) on the same inputs: values, and the gradients of
    sum(g_lp * logprobs + g_H * entropy) for random g_lp, g_H w.r.t. hidden,
    weight and bias. Odd shapes; chunks that do not divide the rows."""
    import riskpo_kernels as rk

    g = torch.Generator().manual_seed(zlib.crc32(repr((impl, dtype, with_bias, chunk_size)).encode()))
    B, T, H, V = 3, 5, 7, 37
    leaves = [torch.randn(B, T, H, generator=g, dtype=torch.float64),
              torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5,
              torch.randn(V, generator=g, dtype=torch.float64) if with_bias else None]
    tokens = torch.randint(0, V, (B, T), generator=g).to(device)
    upstream = [torch.randn(B, T, generator=g, dtype=torch.float64).to(device) for _ in range(2)]
    results = {}
    for which in (impl, "reference"):
        inputs = [None if x is None else x.to(dtype).to(device).requires_grad_() for x in leaves]
        hidden, weight, bias = inputs
        lp, ent = rk.fused_linear_logprobs(hidden, weight, tokens, bias=bias, temperature=0.7,
                                           chunk_size=chunk_size, impl=which)
        (lp * upstream[0].to(lp.dtype) + ent * upstream[1].to(ent.dtype)).sum().backward()
        results[which] = [lp, ent] + [x.grad for x in inputs if x is not None]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    names = ["logprobs", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    for name, got, want in zip(names, results[impl], results["reference"]):
        got, want = got.detach().cpu(), want.detach().cpu()
        if name in ("logprobs", "entropy"):  # float32 (the accumulation dtype)
            assert_close_for(got, want, acc, msg=name)
        elif dtype == torch.bfloat16:
            # Both round the logits' gradient to bf16 before the matmuls, and the
            # chunks' products are rounded to bf16 before they are summed in
            # float32: compare by relative norm (METHOD.md), as the fused loss's test.
            err = (got.double() - want.double()).norm() / want.double().norm().clamp(min=1e-12)
            assert err < 2e-2, f"{name}: relative error {err:.2e}"
        else:
            assert_close_for(got, want, dtype, msg=name)


def check_inplace_backward(impl, device="cpu"):
    """rk.policy_loss(inplace_backward=True): the same loss and gradients as the
    default, the gradient written over the caller's logits (no (N, V) buffer of
    its own), and the default never writing them."""
    import riskpo_kernels as rk

    g = torch.Generator().manual_seed(17)
    B, T, V = 3, 4, 37
    logits = torch.randn(B, T, V, generator=g).to(device)
    tokens = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.3).to(device)
    adv = torch.randn(B, generator=g).to(device)
    old = (torch.randn(B, T, generator=g) - 3).to(device)
    kwargs = dict(old_logprobs=old, entropy_coef=0.01, temperature=0.8, impl=impl)
    default = logits.clone().requires_grad_()
    want = rk.policy_loss(default, tokens, mask, adv, **kwargs)
    want.loss.backward()
    assert torch.equal(default.detach(), logits), "the default wrote the caller's logits"
    overwritten = logits.clone().requires_grad_()
    got = rk.policy_loss(overwritten, tokens, mask, adv, inplace_backward=True, **kwargs)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    got.loss.backward()
    torch.testing.assert_close(overwritten.grad, default.grad, rtol=0, atol=0)
    assert overwritten.grad.data_ptr() == overwritten.data_ptr(), "the gradient has a buffer of its own"
    # Through a matmul, as a trainer uses it: the lm_head's gradient is unchanged.
    hidden = torch.randn(B, T, 8, generator=g).to(device)
    weights = []
    for inplace in (False, True):
        w = torch.randn(V, 8, generator=torch.Generator().manual_seed(3)).to(device).requires_grad_()
        rk.policy_loss(hidden @ w.t(), tokens, mask, adv, inplace_backward=inplace,
                       **kwargs).loss.backward()
        weights.append(w.grad)
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=0)


# --- Triton test files: where their kernels run, and their static sm_90a compile ----------

H100_SHARED_PER_BLOCK = 227 * 1024  # the opt-in maximum of one block on sm_90


def triton_mode(kernel_module: str, what: str) -> str:
    """'cuda', 'cpu' (the interpreter) or 'fresh-process' for the Triton kernels
    of ``kernel_module`` (which exposes INTERPRETED); skips without triton, or on
    a CPU-only machine with TRITON_INTERPRET unset (or 0). ``what`` names the
    kernels in the skip reason."""
    import importlib
    import os

    pytest.importorskip("triton", reason=f"{what} need the triton package")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs a CUDA device, or TRITON_INTERPRET=1 to run the triton kernels on the CPU")
    return "cpu" if importlib.import_module(kernel_module).INTERPRETED else "fresh-process"


def triton_device(mode: str) -> torch.device:
    """The device of a triton_mode; skips where the file reruns in a fresh process."""
    if mode == "fresh-process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: "
                    "test_in_a_fresh_process runs these tests")
    return torch.device(mode)


def compile_for_sm90(script: str, root: Path, what: str) -> dict:
    """Runs ``script`` (which prints one JSON line last) in a fresh process with
    the interpreter off; skips where this triton cannot compile for a CUDA GPU."""
    import json
    import os
    import subprocess

    pytest.importorskip("triton", reason=f"compiling {what} needs triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, cwd=root, env=env)
    last = run.stderr.strip().splitlines()[-1:] or [""]
    if run.returncode != 0 and ("triton.backends.nvidia" in last[0]
                                or (("ptxas" in last[0] or "cuobjdump" in last[0])
                                    and ("not found" in last[0].lower()
                                         or "No such file" in last[0]))):
        pytest.skip(f"this triton install cannot compile for a CUDA GPU: {last[0]}")
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
