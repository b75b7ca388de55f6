"""Packaging: what a user's install gets (docs/packaging.md).

- The sdist builds a wheel (it carries csrc/'s headers and .cu, the license),
  and that wheel, in a fresh venv beside this torch, loads its compiled ops.
- A build without torch (pip's build isolation) stops at once, saying what to type.
- An extension built against another torch is named and not loaded; a missing
  or unloadable one says how to rebuild; then the raw torch.ops.riskpo ops run
  the reference kernels, checked here against the reference and autograd.

The import cases run in subprocesses on a copy of the package (the in-tree
library is never touched or rebuilt).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from riskpo_kernels import _extension

ROOT = Path(__file__).resolve().parent.parent
SO_NAME = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
IGNORED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.so", "*.egg-info",
                                 "__pycache__", ".pytest_cache", ".hypothesis", "_C_build.json")


def run_python(code, cwd, timeout=300, python=sys.executable):
    out = subprocess.run([python, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         cwd=cwd, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def package_copy(tmp_path, *, library: bytes | None = None, info: dict | None = None,
                 source_tree=False):
    """riskpo_kernels' Python files under tmp_path/'site', optionally with a fake
    library and build record beside them, or laid out as a source tree."""
    site = tmp_path / "site"
    shutil.copytree(ROOT / "riskpo_kernels", site / "riskpo_kernels", ignore=IGNORED)
    if library is not None:
        (site / "riskpo_kernels" / SO_NAME).write_bytes(library)
    if info is not None:
        (site / "riskpo_kernels" / _extension.BUILD_INFO).write_text(json.dumps(info))
    if source_tree:
        shutil.copy(ROOT / "setup.py", site / "setup.py")
        (site / "csrc").mkdir()
    return site


IMPORT_AND_REPORT = """
    import json, sys, warnings
    sys.path.insert(0, {site!r})
    # This venv's editable install resolves riskpo_kernels.* the copy lacks to the tree.
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not getattr(f, "__module__", "").startswith("__editable__")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import riskpo_kernels as rk
    assert rk.__file__.startswith({site!r}), rk.__file__
    print(json.dumps({{"available": rk.extension_available,
                      "loaded": "riskpo_kernels._C" in sys.modules,
                      "warnings": [str(w.message) for w in caught
                                   if "riskpo_kernels" in str(w.message)]}}))
"""


def import_copy(site, tmp_path):
    out = run_python(IMPORT_AND_REPORT.format(site=str(site)), cwd=tmp_path, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_for_another_torch_is_named_and_not_loaded(tmp_path):
    # Not an ELF file: loading it would fail, so a clean report proves it was not loaded.
    site = package_copy(tmp_path, library=b"not a library",
                        info={"torch": "2.11.0+cpu", "cuda": None, "with_cuda": False})
    report = import_copy(site, tmp_path)
    assert not report["available"] and not report["loaded"]
    [message] = report["warnings"]
    assert f"built against torch 2.11.0+cpu but torch {torch.__version__} is running" in message
    assert "pip install --no-build-isolation --no-deps --force-reinstall riskpo-kernels" in message
    assert "circular import" not in message and "partially initialized" not in message


def test_missing_extension_says_it_is_not_built_and_how_to_rebuild_in_place(tmp_path):
    site = package_copy(tmp_path, source_tree=True)
    report = import_copy(site, tmp_path)
    assert not report["available"]
    [message] = report["warnings"]
    assert "riskpo_kernels._C is not built" in message
    assert f"cd {site} && pip install --no-build-isolation --no-deps -e ." in message
    assert "circular import" not in message and "partially initialized" not in message


def test_unloadable_library_without_a_record_names_the_error(tmp_path):
    site = package_copy(tmp_path, library=b"not a library")
    report = import_copy(site, tmp_path)
    assert not report["available"] and not report["loaded"]
    [message] = report["warnings"]
    assert "failed to load" in message and "probably built against another torch" in message
    assert "--force-reinstall" in message


@pytest.mark.parametrize("info, running, running_cuda, expected", [
    ({"torch": "2.13.0+cpu", "cuda": None, "with_cuda": False}, "2.13.0+cpu", None, None),
    # The CPU symbols of one release are the same in its CPU and CUDA builds.
    ({"torch": "2.13.0+cpu", "cuda": None, "with_cuda": False}, "2.13.0+cu130", "13.0", None),
    ({"torch": "2.13.0+cpu", "cuda": None, "with_cuda": False}, "2.14.1+cpu", None,
     "built against torch 2.13.0+cpu but torch 2.14.1+cpu is running"),
    ({"torch": "2.13.0+cu130", "cuda": "13.0", "with_cuda": True}, "2.13.0+cu128", "12.8",
     "with CUDA 13.0 but torch 2.13.0+cu128 with CUDA 12.8 is running"),
    ({"torch": "2.13.0+cu130", "cuda": "13.0", "with_cuda": True}, "2.13.0+cpu", None,
     "with CUDA 13.0 but torch 2.13.0+cpu with CUDA None is running"),
    (None, "2.13.0", None, None),  # no record (an older build): loading decides
])
def test_torch_mismatch(info, running, running_cuda, expected):
    why = _extension.torch_mismatch(info, running, running_cuda)
    assert why == expected or (expected is not None and why is not None and expected in why)


RAW_OPS_WITHOUT_EXTENSION = """
    import sys, warnings
    sys.modules["riskpo_kernels._C"] = None  # as if not built
    warnings.simplefilter("ignore")
    import torch
    import riskpo_kernels as rk
    from riskpo_kernels.risk_core.reference import (grpo_advantages_reference,
                                                    mvar_advantages_reference)
    from riskpo_kernels.policy.reference import logprobs_and_entropy_reference
    assert not rk.extension_available
    g = torch.Generator().manual_seed(0)
    ops = torch.ops.riskpo

    r = torch.randint(0, 2, (7 * 5,), generator=g).float()
    args = (r, 5, 3, 0.2, 0.8, 0.5, 0.5, "batch", None, None, "uniform", True, True, None,
            None, 1e-6)
    for got, want in zip(ops.mvar_advantages(*args), mvar_advantages_reference(*args)):
        assert torch.equal(got, want), (got, want)
    assert torch.equal(ops.grpo_advantages(r, 5, True, 1e-6),
                       grpo_advantages_reference(r, 5, True, 1e-6))
    # By keyword, the schema's defaults for the rest (the dispatcher drops trailing defaults).
    by_keyword = ops.mvar_advantages(r, group_size=5, credit="score", w_low=1.0)
    want = mvar_advantages_reference(r, 5, 5, 0.2, 0.8, 1.0, 0.0, "batch", None, None, "score",
                                     True, True, None, None, 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(by_keyword, want))
    torch.library.opcheck(ops.mvar_advantages.default, args)
    torch.library.opcheck(ops.grpo_advantages.default, (r, 5, True, 1e-6))

    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}
    for dtype, atol in tol.items():
        logits = (torch.randn(6, 37, generator=g, dtype=torch.float64) * 3).to(dtype)
        logits[1, 5] = float("-inf")  # a masked vocabulary entry: probability 0, no NaN
        tokens = torch.randint(0, 37, (6,), generator=g)
        tokens[1] = 4
        T = 0.7
        lp, ent, lse = ops.token_logprob_entropy(logits, tokens, T)
        x = logits.detach().clone().requires_grad_()
        want_lp, want_ent = logprobs_and_entropy_reference(x, tokens, T)
        torch.testing.assert_close(lp, want_lp.detach(), atol=atol, rtol=atol)
        torch.testing.assert_close(ent, want_ent.detach(), atol=atol, rtol=atol)
        g_lp = torch.randn(6, generator=g, dtype=torch.float64).to(lp.dtype)
        g_ent = torch.randn(6, generator=g, dtype=torch.float64).to(lp.dtype)
        (want_lp * g_lp + want_ent * g_ent).sum().backward()
        grad = ops.token_logprob_entropy_backward(g_lp, g_ent, logits, tokens, lse, ent, T)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        torch.testing.assert_close(grad.double(), x.grad.double(), atol=4 * atol, rtol=4 * atol)
        over = logits.clone()
        ops.token_logprob_entropy_backward_(g_lp, g_ent, over, tokens, lse, ent, T)
        assert torch.equal(over, grad)
    logits = torch.randn(4, 9, generator=g)
    tokens = torch.randint(0, 9, (4,), generator=g)
    torch.library.opcheck(ops.token_logprob_entropy.default, (logits, tokens, 1.3))
    try:
        ops.token_logprob_entropy(logits, torch.tensor([0, 1, 9, 2]), 1.0)
    except ValueError as e:
        assert "tokens must lie in [0, 9)" in str(e)
    else:
        raise AssertionError("an out-of-range token must be refused")
    # Bad arguments: an error naming the op and the argument, as the C++ ops give.
    bad = {"credit": (args[:10] + ("scores",) + args[11:], "credit must be one of"),
           "quantile_mode": (args[:7] + ("tracked",) + args[8:], "quantile_mode must be one of"),
           "length": ((r[:-1],) + args[1:], "not a multiple of group_size 5"),
           "alpha": (args[:3] + (0.9,) + args[4:], "need 0 < alpha < beta < 1")}
    for case, (bad_args, message) in bad.items():
        try:
            ops.mvar_advantages(*bad_args)
        except ValueError as e:
            assert str(e).startswith("mvar_advantages: ") and message in str(e), (case, str(e))
        else:
            raise AssertionError(f"{case}: accepted")
    grad = torch.zeros(4, 9, requires_grad=True)
    try:
        ops.token_logprob_entropy_backward_(torch.ones(4), torch.ones(4), grad, tokens,
                                            torch.ones(4), torch.ones(4), 1.0)
    except ValueError as e:
        assert "logits requires grad" in str(e)
    else:
        raise AssertionError("writing over a tensor that requires grad must be refused")
    print("ok")
"""


def test_raw_ops_run_the_reference_without_the_extension():
    out = run_python(RAW_OPS_WITHOUT_EXTENSION, cwd=ROOT, timeout=180)
    assert out.stdout.strip().splitlines()[-1] == "ok"


def test_a_build_without_torch_stops_at_once_with_the_commands_to_type(tmp_path):
    """What pip's build isolation runs (setup.py bdist_wheel with no torch importable)."""
    code = f"""
        import runpy, sys
        sys.modules["torch"] = None  # an isolated build environment has no torch
        sys.argv = ["setup.py", "bdist_wheel"]
        runpy.run_path({str(ROOT / "setup.py")!r}, run_name="__main__")
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    assert out.returncode != 0
    assert "pip install --no-build-isolation ." in out.stderr
    assert "pip install --no-build-isolation riskpo-kernels" in out.stderr
    assert "Traceback" not in out.stderr
    # Metadata needs no torch: pip asks for it before building (read from the
    # tree's pyproject.toml; --version writes nothing).
    code = code.replace('"bdist_wheel"', '"--version"')
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("0.1.0"), out.stdout + out.stderr


@pytest.mark.slow
def test_sdist_builds_a_wheel_whose_compiled_ops_load_in_a_fresh_venv(tmp_path):
    """~1-3 min: one compile of the extension, from the sdist, as a user's pip would."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    dist = tmp_path / "dist"
    run_python(f"""
        import setuptools.build_meta as backend  # the PEP 517 hook `python -m build` calls
        print(backend.build_sdist({str(dist)!r}))
    """, cwd=src, timeout=120)
    [sdist] = dist.glob("riskpo_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"LICENSE", "setup.py", "pyproject.toml", "riskpo_kernels/common.py",
                *(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file())}
    assert expected <= names, sorted(expected - names)
    assert any(n.endswith(".cu") for n in names) and any(n.endswith(".h") for n in names)

    # From the sdist alone, in a directory with no source tree around it.
    env = dict(os.environ, PIP_NO_INPUT="1")
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                            "--no-deps", "-q", str(sdist), "-w", str(wheels)],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert build.returncode == 0, build.stdout + build.stderr
    [wheel] = wheels.glob("riskpo_kernels-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert f"riskpo_kernels/{SO_NAME}" in names
        record = json.loads(zf.read(f"riskpo_kernels/{_extension.BUILD_INFO}"))
    assert record["torch"] == torch.__version__
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    # A fresh venv that sees this venv's torch through a .pth (no reinstall).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    fresh_python = venv / "bin" / "python"
    fresh_site = Path(run_python("import sysconfig; print(sysconfig.get_paths()['purelib'])",
                                 cwd=tmp_path, python=fresh_python).stdout.strip())
    (fresh_site / "outer-torch.pth").write_text(str(Path(torch.__file__).parent.parent) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh_python),
                              "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr

    out = run_python(f"""
        import warnings
        warnings.simplefilter("error", RuntimeWarning)  # the fallback warning would fail this
        import torch, riskpo_kernels as rk
        from riskpo_kernels import _extension
        assert rk.__file__.startswith({str(fresh_site)!r}), rk.__file__
        assert rk.extension_available and _extension._C.__file__.startswith({str(fresh_site)!r})
        r = torch.tensor([0., 1., 1., 0., 1., 1.])
        got = rk.mvar_advantages(r, group_size=2, bundle_size=2, impl="cpp").advantages
        want = rk.mvar_advantages(r, group_size=2, bundle_size=2, impl="reference").advantages
        torch.testing.assert_close(got, want)
        print("compiled", _extension._C.__file__)
    """, cwd=tmp_path, python=fresh_python)
    assert out.stdout.strip().startswith("compiled ")


CUDA_WITHOUT_GPU = """
    import os, runpy, sys
    import setuptools, torch
    from torch.utils import cpp_extension
    # A CUDA torch with nvcc found but no GPU visible (what a container build sees).
    torch.version.cuda = "13.0"
    torch.cuda.is_available = lambda: False
    cpp_extension.CUDA_HOME = "/usr/local/cuda"
    captured = {}
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    sys.argv = ["setup.py", "bdist_wheel"]
    runpy.run_path("setup.py", run_name="__main__")
    [ext] = captured["ext_modules"]
    print(any(s.endswith(".cu") for s in ext.sources), os.environ.get("TORCH_CUDA_ARCH_LIST"))
"""


@pytest.mark.parametrize("env, expected", [
    ({}, "True 7.5;8.0;8.6;8.9;9.0+PTX"),   # not torch's IndexError at arch_list[-1] += '+PTX'
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, "True 9.0"),
    ({"RISKPO_NO_CUDA": "1"}, "False None"),
])
def test_cuda_build_without_a_visible_gpu_picks_architectures(tmp_path, env, expected):
    """setup.py's choices only (nothing is compiled), on a copy of what it reads."""
    shutil.copy(ROOT / "setup.py", tmp_path)
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "riskpo_kernels").mkdir()
    shutil.copy(ROOT / "riskpo_kernels" / "common.py", tmp_path / "riskpo_kernels")
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TORCH_CUDA_ARCH_LIST", "RISKPO_NO_CUDA")}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(CUDA_WITHOUT_GPU)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**environ, **env})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == expected
