"""Argument checks, one layer for the public functions and for the ops whose
implementations are Python (the Triton ops, the fused-linear op): each error is
a ``ValueError`` that names the argument. The C++ API files
(``csrc/*/*_api.cpp``) check the same contract for the C++ and CUDA ops, and
``tests/test_hostile_inputs.py`` holds both to it.

Tensors are checked before any kernel sees them: type, dtype, shape, device
(the ``meta`` device included), and that their storage is allocated and holds
every element (FSDP frees a resharded parameter's storage with
``untyped_storage().resize_(0)``; reading such a tensor is a segfault).
"""

from __future__ import annotations

import math
import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INT64_MAX = 2**63 - 1

# Tensor classes whose storage can be inspected. Subclasses such as FakeTensor,
# FunctionalTensor or DTensor manage their storage themselves.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _fail(op: str | None, message: str):
    raise ValueError(f"{op}: {message}" if op else message)


def check_choice(name: str, value, choices, op: str | None = None):
    if not isinstance(value, str) or value not in choices:
        _fail(op, f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_int(name: str, value, minimum: int, maximum: int = INT64_MAX,
              op: str | None = None) -> int:
    """A Python or NumPy integer in [minimum, maximum] (an int64 at most): bool,
    float and numbers past int64 are refused rather than cast."""
    if isinstance(value, bool):
        _fail(op, f"{name} must be an integer, got {value!r}")
    try:
        value = operator.index(value)
    except TypeError:
        _fail(op, f"{name} must be an integer, got {value!r}")
    if value < minimum:
        _fail(op, f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        _fail(op, f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None, op: str | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(op, f"{name} must be a real number, got {value!r}")
    try:
        value = float(value)
    except OverflowError:  # an int past float's range
        _fail(op, f"{name} must be finite, got {value}")
    if not math.isfinite(value):
        _fail(op, f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        _fail(op, f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value, op: str | None = None) -> bool:
    """True or False only: bool('False') is True, so strings, numbers and
    tensors are refused instead of being cast."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_
        return bool(value)
    _fail(op, f"{name} must be True or False, got {value!r}")


def check_storage(name: str, tensor: torch.Tensor, op: str | None = None) -> None:
    """The tensor's storage is allocated and holds all its elements."""
    if type(tensor) not in _PLAIN_TENSORS or tensor.numel() == 0 or tensor.is_meta:
        return
    if torch.compiler.is_compiling():  # storages of traced tensors are not real
        return
    last = tensor.storage_offset() + sum((size - 1) * stride
                                         for size, stride in zip(tensor.shape, tensor.stride()))
    needed = (last + 1) * tensor.element_size()
    held = tensor.untyped_storage().nbytes()
    if held < needed:
        _fail(op, f"{name} has no allocated storage for its {tuple(tensor.shape)} elements "
                  f"(its storage holds {held} bytes, {needed} needed; was it freed, e.g. a "
                  f"resharded FSDP parameter?)")


def check_tensor(name: str, tensor, *, dtypes=None, device=None, op: str | None = None,
                 device_name: str = "the other tensors") -> torch.Tensor:
    """Type, dtype (one of ``dtypes``; "float" for FLOAT_DTYPES), layout, device
    (``device``, when given; never meta) and storage."""
    if not isinstance(tensor, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if dtypes == "float":
        if tensor.dtype not in FLOAT_DTYPES:
            _fail(op, f"{name} must be float32, float64, float16 or bfloat16, got {tensor.dtype}")
    elif dtypes is not None and tensor.dtype not in dtypes:
        _fail(op, f"{name} must be {' or '.join(str(d).replace('torch.', '') for d in dtypes)}, "
                  f"got {tensor.dtype}")
    if tensor.is_meta:
        _fail(op, f"{name} is a meta tensor (no data): the kernels need real tensors")
    if tensor.layout != torch.strided:
        _fail(op, f"{name} must be a dense (strided) tensor, got layout {tensor.layout}")
    if device is not None and tensor.device != device:
        _fail(op, f"{name} is on {tensor.device} but {device_name} on {device}")
    check_storage(name, tensor, op)
    return tensor


def check_float_tensor(name: str, tensor, op: str | None = None) -> torch.Tensor:
    return check_tensor(name, tensor, dtypes="float", op=op)


def check_writable(name: str, tensor: torch.Tensor, op: str | None = None) -> None:
    """What torch asks of a tensor before an in-place write: not part of an
    autograd graph while grad mode is on (the write would be invisible to it),
    and not an inference tensor outside inference mode."""
    if tensor.requires_grad and torch.is_grad_enabled():
        _fail(op, f"{name} requires grad, and writing into it in place would corrupt its "
                  "autograd graph; pass a tensor that does not require grad (or run under "
                  "torch.no_grad())")
    if tensor.is_inference() and not torch.is_inference_mode_enabled():
        _fail(op, f"{name} is an inference tensor, which cannot be written in place outside "
                  "torch.inference_mode()")


def check_all_finite(name: str, tensor: torch.Tensor) -> float | None:
    """Raises on NaN/Inf where checking is free of a device sync (CPU, eager),
    and returns max |x| there (None elsewhere, and for an empty tensor).

    On CUDA the kernels propagate instead: see the docstrings of the ops.
    (One aminmax: NaN and infinities reach the extremes, at a tenth of the cost
    of isfinite().all() on CPU.)"""
    if tensor.device.type != "cpu" or torch.compiler.is_compiling() or not tensor.numel():
        return None
    low, high = (float(x) for x in torch.aminmax(tensor))
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = (~torch.isfinite(tensor)).nonzero().flatten()[:5].tolist()
        raise ValueError(f"{name} contains NaN or Inf (first positions: {bad})")
    return max(-low, high)


def check_token_range(tokens: torch.Tensor, vocab: int, op: str | None = None) -> None:
    """Token ids in [0, vocab) where checking costs no device sync (CPU, eager):
    an id out of range would index outside a row. On CUDA the kernels give a
    NaN log-prob for it instead."""
    if tokens.device.type != "cpu" or not tokens.numel() or torch.compiler.is_compiling():
        return
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        _fail(op, f"tokens must lie in [0, {vocab}), got values in [{low}, {high}]")


def check_mask_values(mask: torch.Tensor, op: str | None = None) -> None:
    """A floating mask must be finite and >= 0 where checking costs no device
    sync (CPU, eager): a negative weight turns the entropy's mean to -inf and
    the loss to nonsense, and NaN would reach every gradient. One aminmax."""
    if (mask.dtype == torch.bool or mask.device.type != "cpu" or not mask.numel()
            or torch.compiler.is_compiling()):
        return
    low, high = (float(x) for x in torch.aminmax(mask))
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0:
        _fail(op, f"mask must hold finite values >= 0, got values in [{low}, {high}]")


# 1/T is taken in float32 by the kernels: a T whose reciprocal overflows there
# (subnormal T) would turn every logit into inf and the answer into NaN.
_MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def check_temperature(temperature, op: str | None = None) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        _fail(op, f"temperature must be a real number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        _fail(op, f"temperature must be finite and > 0, got {temperature}")
    if temperature < _MIN_TEMPERATURE:
        _fail(op, f"temperature must be >= {_MIN_TEMPERATURE:.3g} (its reciprocal must fit "
                  f"in float32), got {temperature}")
    return float(temperature)


def check_loss_scalars(clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature,
                       op: str | None = None) -> tuple[float, ...]:
    """The PPO-clip loss's scalars (RISKPO_SPEC.md section 8), for the public
    functions and the fused-linear op alike."""
    clip_low = check_float("clip_low", clip_low, minimum=0.0, op=op)
    clip_high = check_float("clip_high", clip_high, minimum=0.0, op=op)
    if clip_low >= 1:
        _fail(op, f"clip_low must be < 1, got {clip_low}")
    clip_ratio_c = check_float("clip_ratio_c", clip_ratio_c, op=op)
    if clip_ratio_c <= 1:
        _fail(op, f"clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")
    kl_coef = check_float("kl_coef", kl_coef, minimum=0.0, op=op)
    entropy_coef = check_float("entropy_coef", entropy_coef, op=op)
    temperature = check_temperature(temperature, op=op)
    return clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature
