"""Builds riskpo_kernels._C: the C++ CPU kernels always, the CUDA kernels too when
torch has CUDA and nvcc is found (set RISKPO_NO_CUDA=1 to skip them).

Build against the torch already installed: `pip install --no-build-isolation .`
(or `-e .`). Build isolation would compile against another torch than the one
that runs the package, so a build without torch stops with that instruction
(docs/packaging.md). The torch version built against is written beside the
extension (riskpo_kernels/_C_build.json) and checked at import.
"""

import glob
import json
import os
import runpy
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Metadata and sdist commands need no compiler and no torch (the isolated
# `python -m build --sdist` has neither); everything else builds the extension.
_METADATA_ONLY = {"egg_info", "dist_info", "sdist", "--version", "--name", "check", "clean"}
_BUILDING = not (set(sys.argv[1:]) & _METADATA_ONLY) and len(sys.argv) > 1

_NO_TORCH = """
riskpo-kernels compiles a C++ extension against the torch you run, and this build
environment has no torch: pip's build isolation hides the installed one (and
fetching another to compile against would give an extension that does not match
yours). Install torch and the build tools, then build without isolation:

    pip install "torch>=2.11" "setuptools>=77" wheel ninja   # GPU: torch's CUDA wheel
    pip install --no-build-isolation riskpo-kernels          # from an index or an sdist
    pip install --no-build-isolation .                       # from a clone (-e . to edit)

docs/packaging.md has the CUDA build and the reasons.
"""

if _BUILDING:
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(_NO_TORCH)
# The option names the kernels share with Python, generated from their one
# source (riskpo_kernels/common.py) into a header the C++ and CUDA code include.
GENERATED = os.path.join(ROOT, "build", "generated")
if _BUILDING:
    runpy.run_path(os.path.join(ROOT, "riskpo_kernels", "common.py"))["write_cpp_header"](GENERATED)

# A CUDA torch without a visible GPU: torch derives the arch list from the GPUs
# present and, finding none, fails with IndexError at `arch_list[-1] += '+PTX'`.
# Build for the common data-centre and consumer cards instead (override with
# TORCH_CUDA_ARCH_LIST, or skip CUDA with RISKPO_NO_CUDA=1).
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern), recursive=True))


def _extension():
    cpp_sources = _sources("**/*.cpp")
    # -fopenmp: at::parallel_for runs serially in code compiled without it (its
    # OpenMP body is header-only). The library resolves to the libgomp torch loads.
    # -fno-trapping-math / -fno-math-errno (torch builds with both): without them
    # GCC does not if-convert the float selects of the vocabulary loops.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    link_flags = ["-fopenmp"]
    sanitizer = os.environ.get("RISKPO_SANITIZE")  # e.g. "address": a debugging build
    if sanitizer:
        cxx_flags += [f"-fsanitize={sanitizer}", "-fno-omit-frame-pointer", "-g"]
        link_flags += [f"-fsanitize={sanitizer}"]
    with_cuda = (
        os.environ.get("RISKPO_NO_CUDA", "0") != "1"
        and cpp_extension.torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
    if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        print(f"riskpo-kernels: no GPU visible, building CUDA kernels for TORCH_CUDA_ARCH_LIST="
              f"{DEFAULT_CUDA_ARCHS!r} (set it to choose, or RISKPO_NO_CUDA=1 for a CPU-only build)")
    if not with_cuda:
        return cpp_extension.CppExtension(
            "riskpo_kernels._C", cpp_sources, include_dirs=[GENERATED],
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    return cpp_extension.CUDAExtension(
        "riskpo_kernels._C",
        cpp_sources + _sources("**/*.cu"),
        include_dirs=[GENERATED],
        define_macros=[("RISKPO_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        extra_link_args=link_flags,
    )


def _build_ext_class():
    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        """Writes, beside each built extension, the torch it was compiled against:
        riskpo_kernels._extension compares it with the running torch before it
        loads the library (a mismatch would fail with undefined symbols or worse)."""

        def build_extension(self, ext):
            super().build_extension(ext)
            info = {"torch": torch.__version__, "cuda": torch.version.cuda,
                    "with_cuda": any(s.endswith(".cu") for s in ext.sources)}
            target = os.path.join(os.path.dirname(self.get_ext_fullpath(ext.name)), "_C_build.json")
            with open(target, "w") as f:
                json.dump(info, f)

        def copy_extensions_to_source(self):
            # Editable installs and `build_ext --inplace` copy the .so from the
            # build directory into the package; the record must travel with it.
            super().copy_extensions_to_source()
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                self.copy_file(os.path.join(os.path.dirname(regular_file), "_C_build.json"),
                               os.path.join(os.path.dirname(inplace_file), "_C_build.json"),
                               level=self.verbose)

    return BuildExtension


setup(
    ext_modules=[_extension()] if _BUILDING else [],
    cmdclass={"build_ext": _build_ext_class()} if _BUILDING else {},
)
