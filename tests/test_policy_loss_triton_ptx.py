"""The Triton vocabulary kernels as the GPU compiles them, checked without a GPU.

The first H100 run failed test_extreme_logits_stay_finite where the
interpreter passed: the compiler had contracted ``x * inv_t - m`` into one
fused multiply-add (benchmarks/NOTES.md). The kernels are launched with
``KERNEL_OPTIONS`` (no fp fusion) so that every float operation rounds as the
interpreter's do. Triton compiles for a GPU architecture on a machine without
one (LLVM and ptxas ship with its wheel), so this reads the PTX of the
kernels compiled for sm_90, with and without those options.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compile_for_sm90

pytest.importorskip("triton", reason="compiling the kernels needs triton")

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh process with TRITON_INTERPRET=0: the kernels must be JIT
# functions, not the interpreter's stand-ins. Prints, per kernel and option set,
# the counts of the PTX float instructions that matter.
COMPILE = r"""
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from riskpo_kernels.policy import triton_kernels as tk

POINTER = {"tokens_ptr": "*i64"}
def signature(kernel, logits_type):
    sig = {}
    for name in kernel.arg_names:
        if name in ("ACC", "BLOCK_V"):
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = POINTER.get(name, f"*{logits_type}" if name in ("logits_ptr", "grad_logits_ptr") else "*fp32")
        elif name.startswith("inv_temp"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig

counts = {}
for fusion_name, options in (("launch", tk.KERNEL_OPTIONS), ("default", {})):
    for kernel in (tk._logprob_entropy_fwd_kernel, tk._logprob_entropy_bwd_kernel):
        for logits_type in ("fp32", "bf16"):
            src = triton.compiler.ASTSource(fn=kernel, signature=signature(kernel, logits_type),
                                            constexprs={"ACC": tl.float32, "BLOCK_V": 1024})
            ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                 options={"num_warps": 2, **options}).asm["ptx"]
            counts[f"{fusion_name}/{kernel.fn.__name__}/{logits_type}"] = {
                # fma.rn.f32 (not .ftz: that is libdevice's log, written as fmas)
                "fma": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
                # mul/add/sub.f32 without a rounding mode: ptxas may contract them
                "contractible": len(re.findall(r"\b(?:mul|add|sub)\.f32\b", ptx)),
                "rounded": len(re.findall(r"\b(?:mul|add|sub)\.rn\.f32\b", ptx)),
                "ex2": len(re.findall(r"\bex2\.approx", ptx)),
            }
print(json.dumps(counts))
"""


@pytest.fixture(scope="module")
def ptx_counts():
    return compile_for_sm90(COMPILE, ROOT, "the kernels")


def test_the_launch_options_leave_no_multiply_add_to_fuse(ptx_counts):
    launched = {k: v for k, v in ptx_counts.items() if k.startswith("launch/")}
    assert len(launched) == 4
    for name, counts in launched.items():
        assert counts["fma"] == 0, (name, counts)
        assert counts["contractible"] == 0, (name, counts)
        assert counts["rounded"] > 0 and counts["ex2"] > 0, (name, counts)


def test_without_them_the_compiler_fuses(ptx_counts):
    # What the H100 ran: the check above tells the two apart.
    default = {k: v for k, v in ptx_counts.items() if k.startswith("default/")}
    assert all(counts["fma"] > 0 for counts in default.values()), default
