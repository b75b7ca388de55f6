"""Which implementation runs: one registry of backends and one resolver.

A backend implements one or both op families on some devices:
- the risk core (``mvar_advantages``, ``grpo_advantages``);
- the vocabulary ops of the policy loss (per row: log-prob, entropy and
  log-sum-exp forward; the gradient backward, out of place and over the logits).

Every public function's ``impl=`` names a backend or ``"auto"``, and the
fused-linear ops' ``vocab_impl`` argument names one; this file is the only
place those names are listed. A new backend is one entry here and its own
file; one that implements the whole fused-linear loss itself (triton-folded)
sets ``fused_linear``.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import _extension
from . import _validation as v
from .risk_core.reference import grpo_advantages_reference, mvar_advantages_reference

RISK_CORE = "risk core"
POLICY = "policy loss"


@dataclass(frozen=True)
class VocabOps:
    """Names of a backend's vocabulary ops in torch.ops.riskpo (schemas in ops.py)."""

    forward: str            # (logits, tokens, T) -> logprobs, entropy, lse
    backward: str           # -> d logits, a new (N, V) tensor
    backward_in_place: str  # -> d logits written over the logits (a temporary of the caller's)

    def op(self, which: str):
        return getattr(torch.ops.riskpo, getattr(self, which))


@dataclass(frozen=True)
class Backend:
    name: str
    devices: tuple[str, ...]               # device types its kernels take
    unavailable: Callable[[], str | None]  # why it cannot run in this process, or None
    mvar_advantages: Callable | None = None
    grpo_advantages: Callable | None = None
    vocab: VocabOps | None = None          # None: the policy loss materialises log_softmax
    # The whole fused-linear policy loss in its own kernels (fused_linear.py's
    # forward contract), or None: the chunk loop runs this backend's vocab ops.
    fused_linear: Callable | None = None

    def serves(self, family: str) -> bool:
        return self.mvar_advantages is not None if family == RISK_CORE else (
            self.vocab is not None or self.name == "reference")


def _always() -> None:
    return None


def _without_extension() -> str | None:
    if _extension.AVAILABLE:
        return None
    return f"the compiled extension is not available ({_extension.LOAD_ERROR})"


def _without_cuda_kernels() -> str | None:
    return _without_extension() or (None if _extension.WITH_CUDA else
                                    "riskpo_kernels was built without CUDA kernels")


def _without_triton() -> str | None:
    # find_spec, not import: importing riskpo_kernels must not import triton.
    return None if importlib.util.find_spec("triton") is not None else "triton is not installed"


def _folded_fused_linear(*args):
    # Imported at call time: importing riskpo_kernels must not import triton.
    from .policy.folded_triton import folded_fused_linear_policy_loss_forward

    return folded_fused_linear_policy_loss_forward(*args)


def _compiled_op(name):
    # Looked up at call time: the dispatcher picks the CPU or CUDA kernel.
    return lambda *args: getattr(torch.ops.riskpo, name)(*args)


BACKENDS = {b.name: b for b in (
    # Plain PyTorch on any device: the readable spec and the test oracle.
    Backend("reference", ("cpu", "cuda"), _always, mvar_advantages_reference,
            grpo_advantages_reference),
    # csrc/*/*_cpu.cpp
    Backend("cpp", ("cpu",), _without_extension, _compiled_op("mvar_advantages"),
            _compiled_op("grpo_advantages"),
            VocabOps("token_logprob_entropy", "token_logprob_entropy_backward",
                     "token_logprob_entropy_backward_")),
    # csrc/risk_core/risk_core_cuda.cu
    Backend("cuda", ("cuda",), _without_cuda_kernels, _compiled_op("mvar_advantages"),
            _compiled_op("grpo_advantages")),
    # policy/triton_kernels.py; on CPU tensors under TRITON_INTERPRET=1 (how CI tests it)
    Backend("triton", ("cuda", "cpu"), _without_triton,
            vocab=VocabOps("token_logprob_entropy_triton", "token_logprob_entropy_triton_backward",
                           "token_logprob_entropy_triton_backward_")),
    # policy/folded_triton.py: fused_linear_policy_loss with the vocabulary work in
    # the lm_head GEMMs' epilogue and prologue (float64 and every other op: "triton").
    Backend("triton-folded", ("cuda", "cpu"), _without_triton,
            vocab=VocabOps("token_logprob_entropy_triton", "token_logprob_entropy_triton_backward",
                           "token_logprob_entropy_triton_backward_"),
            fused_linear=_folded_fused_linear),
)}

# impl="auto": the first of these that can run, per family and device type.
AUTO = {
    (RISK_CORE, "cpu"): ("cpp", "reference"),
    (RISK_CORE, "cuda"): ("cuda", "reference"),
    (POLICY, "cpu"): ("cpp", "reference"),
    (POLICY, "cuda"): ("triton", "reference"),
}
# impl="auto" for fused_linear_policy_loss, per device type, where it differs
# from AUTO: a table entry that the device check's measurement decides
# (benchmarks/device_check.sh times "triton" and "triton-folded" side by side).
FUSED_LINEAR_AUTO = {"cuda": "triton"}
_warned: set = set()


def choices(family: str) -> tuple[str, ...]:
    """The values ``impl=`` takes for a family."""
    return ("auto",) + tuple(name for name, b in BACKENDS.items() if b.serves(family))


def vocab_backends() -> tuple[str, ...]:
    """The values the fused ops' ``vocab_impl`` argument takes."""
    return tuple(name for name, b in BACKENDS.items() if b.vocab is not None)


def resolve(impl: str, device: torch.device, family: str, tensor_name: str) -> Backend:
    """The backend that runs ``family``'s work for tensors on ``device``
    (``tensor_name`` names them in errors). ``auto`` takes the first available
    one of AUTO and warns once when a CUDA tensor falls back to the reference."""
    v.check_choice("impl", impl, choices(family))
    if impl == "auto":
        for name in AUTO.get((family, device.type), ("reference",)):
            backend = BACKENDS[name]
            why = backend.unavailable()
            if why is None:
                return backend
            if device.type == "cuda" and (family, why) not in _warned and _extension.AVAILABLE:
                _warned.add((family, why))
                warnings.warn(f"{why}; CUDA tensors use the reference implementation of the "
                              f"{family}", RuntimeWarning, stacklevel=3)
        raise AssertionError("the reference backend is always available")
    backend = BACKENDS[impl]
    if device.type not in backend.devices:
        raise ValueError(f"impl={impl!r} needs {' or '.join(backend.devices)} tensors, got "
                         f"{tensor_name} on {device}")
    why = backend.unavailable()
    if why is not None:
        raise RuntimeError(f"impl={impl!r}: {why}")
    return backend


def vocab_ops(vocab_impl: str, op: str | None = None) -> VocabOps:
    """The vocabulary ops of the backend a fused op was asked to use."""
    v.check_choice("vocab_impl", vocab_impl, vocab_backends(), op=op)
    return BACKENDS[vocab_impl].vocab
