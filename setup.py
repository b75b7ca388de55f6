"""Builds riskpo_kernels._C: the C++ CPU kernels always, the CUDA kernels too when
torch has CUDA and nvcc is found (set RISKPO_NO_CUDA=1 to skip them).

Build against the torch already installed: `pip install --no-build-isolation -e .`
(build isolation would fetch and compile against another torch).
"""

import glob
import os
import runpy

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The option names the kernels share with Python, generated from their one
# source (riskpo_kernels/common.py) into a header the C++ and CUDA code include.
GENERATED = os.path.join(ROOT, "build", "generated")
runpy.run_path(os.path.join(ROOT, "riskpo_kernels", "common.py"))["write_cpp_header"](GENERATED)


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


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
