"""Argument checks shared by the public functions: each error names the argument."""

from __future__ import annotations

import math
import operator
import warnings

import torch

from . import _extension

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float_tensor(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, float16 or bfloat16, got {tensor.dtype}")


def check_all_finite(name: str, tensor: torch.Tensor) -> None:
    """Raises on NaN/Inf where checking is free of a device sync (CPU, eager).

    On CUDA the kernels propagate instead: see the docstrings of the ops."""
    if tensor.device.type != "cpu" or torch.compiler.is_compiling():
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = (~torch.isfinite(tensor)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} contains NaN or Inf (first positions: {bad})")


IMPLS = ("auto", "reference", "cpp", "cuda")
_warned_no_cuda_kernel = False


def resolve_impl(impl: str, device: torch.device) -> str:
    """Maps ``impl`` to the implementation that will run on ``device``."""
    global _warned_no_cuda_kernel
    check_choice("impl", impl, IMPLS)
    if impl == "auto":
        if device.type == "cpu" and _extension.AVAILABLE:
            return "cpp"
        if device.type == "cuda" and _extension.WITH_CUDA:
            return "cuda"
        if device.type == "cuda" and _extension.AVAILABLE and not _warned_no_cuda_kernel:
            _warned_no_cuda_kernel = True
            warnings.warn("riskpo_kernels was built without CUDA; CUDA tensors use the reference "
                          "implementation", RuntimeWarning, stacklevel=3)
        return "reference"
    if impl in ("cpp", "cuda"):
        wanted = "cpu" if impl == "cpp" else "cuda"
        if device.type != wanted:
            raise ValueError(f"impl={impl!r} needs {wanted} tensors, got rewards on {device}")
        if not _extension.AVAILABLE:
            raise RuntimeError(f"impl={impl!r}: the compiled extension is not available "
                               f"({_extension.LOAD_ERROR})")
        if impl == "cuda" and not _extension.WITH_CUDA:
            raise RuntimeError("impl='cuda': riskpo_kernels was built without CUDA kernels")
    return impl
