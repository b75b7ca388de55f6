"""The ops as torch.ops.riskpo.*: opcheck, torch.compile, the fallback without
the extension, and the CUDA source compiling with plain nvcc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import riskpo_kernels as rk
from riskpo_kernels.common import write_cpp_header

from conftest import make_rewards

ROOT = Path(__file__).resolve().parents[1]


def mvar_op_cases(device):
    g = torch.Generator().manual_seed(11)
    cases = []
    for dtype, credit, mode, (P, n, Q) in [
        (torch.float32, "uniform", "batch", (7, 4, 3)),
        (torch.float64, "std", "track", (5, 6, 2)),
        (torch.bfloat16, "sum-mean", "mix", (9, 3, 4)),
        (torch.float16, "score", "batch", (4, 1, 1)),
    ]:
        rewards = make_rewards("ternary", P, n, g, dtype, device)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        tracked = mode != "batch"
        q_lo = torch.tensor(-0.5, dtype=acc, device=device) if tracked else None
        q_hi = torch.tensor(1.5, dtype=acc, device=device) if tracked else None
        base = torch.tensor(0.1, dtype=acc, device=device) if tracked else None
        cases.append((rewards, n, Q, 0.2, 0.8, 1.5, 0.3, mode, q_lo, q_hi, credit, True,
                      mode != "mix", base, base, 1e-6))
    return cases


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_opcheck_every_op(request, device):
    request.getfixturevalue("cuda_device" if device == "cuda" else "cpp_available")
    for args in mvar_op_cases(device):
        torch.library.opcheck(torch.ops.riskpo.mvar_advantages.default, args)
    g = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.bfloat16):
        rewards = make_rewards("continuous", 6, 5, g, dtype, device)
        for normalize in (True, False):
            torch.library.opcheck(torch.ops.riskpo.grpo_advantages.default,
                                  (rewards, 5, normalize, 1e-6))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_torch_compile_fullgraph(request, device):
    request.getfixturevalue("cuda_device" if device == "cuda" else "cpp_available")
    torch._dynamo.reset()

    def step(rewards, q_lo, q_hi):
        res = rk.mvar_advantages(rewards, group_size=4, bundle_size=3, quantile_mode="mix",
                                 q_lo=q_lo, q_hi=q_hi, credit="std")
        return res.advantages * 2, res.q_lo, rk.grpo_advantages(rewards, group_size=4)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(13)
    rewards = make_rewards("binary", 10, 4, g, device=device)
    q_lo = torch.tensor(0.5, device=device)
    q_hi = torch.tensor(2.5, device=device)
    for got, want in zip(compiled(rewards, q_lo, q_hi), step(rewards, q_lo, q_hi)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_public_functions_choose_the_compiled_op(cpp_available, monkeypatch):
    calls = []
    real = torch.ops.riskpo.mvar_advantages

    class Spy:
        def __call__(self, *args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(torch.ops.riskpo, "mvar_advantages", Spy())
    rk.mvar_advantages(torch.ones(8), group_size=4)
    assert len(calls) == 1
    rk.mvar_advantages(torch.ones(8), group_size=4, impl="reference")
    assert len(calls) == 1


def test_without_extension_the_package_imports_warns_once_and_falls_back():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["riskpo_kernels._C"] = None  # makes `from . import _C` fail
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import riskpo_kernels as rk
            import torch
            r = torch.tensor([0., 1., 1., 0., 1., 1.])
            a = rk.mvar_advantages(r, group_size=2, bundle_size=2)
            b = rk.mvar_advantages(r, group_size=2, bundle_size=2)
            c = rk.grpo_advantages(r, group_size=2)
        ours = [w for w in caught if "riskpo_kernels" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert "falling back to the reference" in str(ours[0].message)
        assert not rk.extension_available
        want = rk.mvar_advantages(r, group_size=2, bundle_size=2, impl="reference")
        assert torch.equal(a.advantages, want.advantages)
        try:
            rk.mvar_advantages(r, group_size=2, impl="cpp")
        except RuntimeError as e:
            assert "compiled extension is not available" in str(e)
        else:
            raise AssertionError("impl='cpp' without the extension must raise")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_with_nvcc(tmp_path):
    """The CUDA kernels take raw pointers, so plain nvcc builds them without torch."""
    arch = os.environ.get("RISKPO_TEST_CUDA_ARCH", "sm_90")
    write_cpp_header(tmp_path)  # the names setup.py generates from riskpo_kernels/common.py
    cmd = ["nvcc", "-std=c++17", f"-arch={arch}", "-Werror", "all-warnings", f"-I{tmp_path}", "-c",
           str(ROOT / "csrc/risk_core/risk_core_cuda.cu"), "-o", str(tmp_path / "risk_core.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "risk_core.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("g++") is None or not Path("/usr/local/cuda/include").exists()
                    and not list(Path("/usr/local").glob("cuda-*/include")),
                    reason="needs g++ and the CUDA headers")
def test_cuda_dispatch_code_compiles(tmp_path):
    """The API file's CUDA branch (guards, streams, registration) at least parses
    against this torch's headers, which a CPU build never compiles."""
    if torch.version.cuda is not None:
        pytest.skip("a CUDA torch builds the real extension instead")
    cuda_include = next(p for p in [Path("/usr/local/cuda/include"),
                                    *sorted(Path("/usr/local").glob("cuda-*/include"))] if p.exists())
    # CPU wheels ship c10/cuda headers but not the one CMake generates for CUDA builds.
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    write_cpp_header(tmp_path)
    from torch.utils.cpp_extension import include_paths

    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-DRISKPO_WITH_CUDA", f"-I{tmp_path}",
           *[f"-I{p}" for p in include_paths()], f"-I{cuda_include}",
           str(ROOT / "csrc/risk_core/risk_core_api.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def test_the_compiled_ops_take_exactly_the_names_in_common(cpp_available):
    # One source: the C++ parses credit and quantile_mode with the names
    # setup.py generated from riskpo_kernels/common.py.
    from riskpo_kernels.common import CREDITS, QUANTILE_MODES

    rewards = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    for credit in CREDITS:
        for mode in QUANTILE_MODES:
            torch.ops.riskpo.mvar_advantages(rewards, 2, 2, 0.2, 0.8, 1.5, 0.0, mode, None, None,
                                             credit, True, True, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=f"credit must be one of {', '.join(CREDITS)}; got 'x'"):
        torch.ops.riskpo.mvar_advantages(rewards, 2, 2, 0.2, 0.8, 1.5, 0.0, "batch", None, None,
                                         "x", True, True, None, None, 1e-6)
    with pytest.raises(RuntimeError, match=f"quantile_mode must be one of {', '.join(QUANTILE_MODES)}"):
        torch.ops.riskpo.mvar_advantages(rewards, 2, 2, 0.2, 0.8, 1.5, 0.0, "x", None, None,
                                         "std", True, True, None, None, 1e-6)
