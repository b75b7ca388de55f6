"""Loads the compiled extension once, if it was built against the running torch.

setup.py writes ``_C_build.json`` beside the library: the torch (and CUDA) it was
compiled against. A C++ extension is tied to the torch it was built with (the
LibTorch C++ ABI changes between releases, docs/packaging.md), so one built
against another release is not loaded at all: loading it could fail with
undefined symbols or, worse, load and misbehave.

Without the extension (not built, or built against another torch) the package
still imports and warns once, saying why and how to rebuild; every
``impl="auto"`` call runs the reference implementation, and the raw
``torch.ops.riskpo.*`` ops the library would have implemented run reference
kernels registered here instead (same results, slower).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import warnings
from pathlib import Path

import torch

from . import ops  # noqa: F401  (schemas must exist before the kernels register)

BUILD_INFO = "_C_build.json"
_PACKAGE = __name__.rpartition(".")[0]
_ROOT = Path(__file__).resolve().parent.parent  # the source tree or site-packages


def _release(version: str) -> str:
    """'2.13.0+cu130' -> '2.13.0': the local part names the build variant, not the API."""
    return version.split("+", 1)[0]


def build_info(library: str | Path) -> dict | None:
    """What setup.py recorded beside ``library``, or None if nothing was (an old build)."""
    path = Path(library).with_name(BUILD_INFO)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def torch_mismatch(info: dict | None, running: str | None = None,
                   running_cuda: str | None = None) -> str | None:
    """Why a library built as ``info`` says must not load into this torch, or None.

    A CPU-only build needs the same torch release (2.13.0+cpu and 2.13.0+cu130
    export the same CPU symbols); one with CUDA kernels also the same CUDA."""
    if not info or "torch" not in info:
        return None
    running = torch.__version__ if running is None else running
    running_cuda = torch.version.cuda if running_cuda is None else running_cuda
    built = info["torch"]
    if _release(built) != _release(running):
        return f"it was built against torch {built} but torch {running} is running"
    if info.get("with_cuda") and info.get("cuda") != running_cuda:
        return (f"its CUDA kernels were built against torch {built} with CUDA {info.get('cuda')} "
                f"but torch {running} with CUDA {running_cuda} is running")
    return None


def rebuild_advice(root: Path = _ROOT) -> str:
    """The command that rebuilds the extension for this kind of install."""
    if (root / "setup.py").is_file() and (root / "csrc").is_dir():
        # A source tree: an editable install or an in-place build.
        return (f"rebuild it against this torch in the source tree: `cd {root} && "
                "pip install --no-build-isolation --no-deps -e .`")
    return ("reinstall it against this torch: `pip install --no-build-isolation --no-deps "
            "--force-reinstall riskpo-kernels` (or the clone or sdist it came from in place "
            "of the name; docs/packaging.md)")


def _load():
    """(module, None) or (None, why it was not loaded)."""
    name = _PACKAGE + "._C"
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        # Said plainly: `from . import _C` would report a "partially initialized
        # module ... circular import", which is not the problem.
        return None, "the compiled extension riskpo_kernels._C is not built"
    mismatch = torch_mismatch(build_info(spec.origin))
    if mismatch:
        return None, f"the compiled extension {spec.origin} was not loaded: {mismatch}"
    try:
        return importlib.import_module(name), None
    except ImportError as error:  # e.g. undefined symbols: built against another torch
        return None, (f"the compiled extension {spec.origin} failed to load ({error}); it was "
                      "probably built against another torch")


# The reference kernels below stand in for the library's CPU (and, for the risk
# core, CUDA) kernels, so they check what csrc/*/*_api.cpp checks (as ValueError,
# naming the op and the argument, where the C++ raises RuntimeError): the
# references themselves assume valid arguments. Imports at call time: this
# module loads before the rest of the package.


def _check_rewards(op, rewards, group_size):
    from . import _validation as v

    v.check_tensor("rewards", rewards, dtypes="float", op=op)
    if rewards.dim() != 1:
        raise ValueError(f"{op}: rewards must be 1-D (P * n,), got shape {tuple(rewards.shape)}")
    v.check_int("group_size", group_size, 1, op=op)
    if rewards.numel() % group_size:
        raise ValueError(f"{op}: rewards length {rewards.numel()} is not a multiple of "
                         f"group_size {group_size}")
    return v


def _check_scalar_tensor(v, op, name, t, rewards):
    if t is not None:
        v.check_tensor(name, t, dtypes="float", device=rewards.device, op=op,
                       device_name="rewards")
        if t.numel() != 1:
            raise ValueError(f"{op}: {name} must hold one value, got shape {tuple(t.shape)}")


def _mvar_advantages_reference(rewards, group_size, bundle_size, alpha, beta, w_low, w_high,
                               quantile_mode, q_lo_track, q_hi_track, credit, normalize_std,
                               natural_baseline, base_mid, base_low, eps):
    from .common import CREDITS, QUANTILE_MODES
    from .risk_core.reference import mvar_advantages_reference

    op = "mvar_advantages"
    v = _check_rewards(op, rewards, group_size)
    v.check_int("bundle_size", bundle_size, 1, op=op)
    if not 0 < alpha < beta < 1:
        raise ValueError(f"{op}: need 0 < alpha < beta < 1, got alpha={alpha}, beta={beta}")
    for name, value in (("w_low", w_low), ("w_high", w_high), ("eps", eps)):
        v.check_float(name, value, minimum=0.0, op=op)
    v.check_choice("quantile_mode", quantile_mode, QUANTILE_MODES, op=op)
    v.check_choice("credit", credit, CREDITS, op=op)
    if (q_lo_track is None) != (q_hi_track is None):
        raise ValueError(f"{op}: q_lo_track and q_hi_track must be given together")
    for name, t in (("q_lo_track", q_lo_track), ("q_hi_track", q_hi_track),
                    ("base_mid", base_mid), ("base_low", base_low)):
        _check_scalar_tensor(v, op, name, t, rewards)
    return mvar_advantages_reference(rewards, group_size, bundle_size, alpha, beta, w_low, w_high,
                                     quantile_mode, q_lo_track, q_hi_track, credit,
                                     normalize_std, natural_baseline, base_mid, base_low, eps)


def _grpo_advantages_reference(rewards, group_size, normalize_std, eps):
    from .risk_core.reference import grpo_advantages_reference

    v = _check_rewards("grpo_advantages", rewards, group_size)
    v.check_float("eps", eps, minimum=0.0, op="grpo_advantages")
    return grpo_advantages_reference(rewards, group_size, normalize_std, eps)


def _vocab_accumulation(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _check_rows(op, logits, tokens, temperature, **per_row):
    from . import _validation as v

    v.check_tensor("logits", logits, dtypes="float", op=op)
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"{op}: logits must be (N, V) with V >= 1, got shape "
                         f"{tuple(logits.shape)}")
    v.check_tensor("tokens", tokens, dtypes=(torch.int64,), device=logits.device, op=op,
                   device_name="logits")
    if tokens.shape != logits.shape[:1]:
        raise ValueError(f"{op}: tokens must be (N,) = ({logits.shape[0]},), got shape "
                         f"{tuple(tokens.shape)}")
    v.check_temperature(temperature, op=op)
    v.check_token_range(tokens, logits.shape[1], op=op)
    for name, t in per_row.items():
        v.check_tensor(name, t, dtypes="float", device=logits.device, op=op, device_name="logits")
        if t.shape != logits.shape[:1]:
            raise ValueError(f"{op}: {name} must be (N,) = ({logits.shape[0]},), got shape "
                             f"{tuple(t.shape)}")
    return v


def _logprob_entropy_reference(logits, tokens, temperature):
    """logits: (N, V), tokens: (N,) -> logprobs, entropy, lse (N,) in the accumulation dtype."""
    _check_rows("token_logprob_entropy", logits, tokens, temperature)
    z = logits.to(_vocab_accumulation(logits)) / temperature                  # (N, V)
    lse = torch.logsumexp(z, dim=-1)
    logp = z - lse[:, None]
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, 0)).sum(-1)  # p log p -> 0 for -inf logits
    return logp.gather(-1, tokens[:, None]).squeeze(-1), entropy, lse


def _logprob_entropy_gradient(grad_logprobs, grad_entropy, logits, tokens, lse, entropy,
                              temperature):
    """d(g_lp . logprobs + g_H . entropy)/d logits, (N, V) in the logits' dtype:
    dz = g_lp (onehot - p) - g_H p (log p + H) with z = logits / temperature."""
    acc = _vocab_accumulation(logits)
    logp = logits.to(acc) / temperature - lse.to(acc)[:, None]
    p = logp.exp()
    g_lp, g_h = grad_logprobs.to(acc)[:, None], grad_entropy.to(acc)[:, None]
    dz = -p * (g_lp + g_h * torch.where(p > 0, logp + entropy.to(acc)[:, None], 0))
    dz.scatter_add_(1, tokens[:, None], g_lp)
    return (dz / temperature).to(logits.dtype)


def _logprob_entropy_backward_reference(grad_logprobs, grad_entropy, logits, tokens, lse, entropy,
                                        temperature):
    _check_rows("token_logprob_entropy_backward", logits, tokens, temperature,
                grad_logprobs=grad_logprobs, grad_entropy=grad_entropy, lse=lse, entropy=entropy)
    return _logprob_entropy_gradient(grad_logprobs, grad_entropy, logits, tokens, lse, entropy,
                                     temperature)


def _logprob_entropy_backward_inplace_reference(grad_logprobs, grad_entropy, logits, tokens, lse,
                                                entropy, temperature):
    op = "token_logprob_entropy_backward_"
    v = _check_rows(op, logits, tokens, temperature, grad_logprobs=grad_logprobs,
                    grad_entropy=grad_entropy, lse=lse, entropy=entropy)
    if not logits.is_contiguous():
        raise ValueError(f"{op}: logits must be a contiguous (N, V) tensor to be overwritten")
    v.check_writable("logits", logits, op=op)
    logits.copy_(_logprob_entropy_gradient(grad_logprobs, grad_entropy, logits, tokens, lse,
                                           entropy, temperature))


# The library's registrations (csrc/*/*_api.cpp): op -> (its device types, the reference).
REFERENCE_KERNELS = {
    "mvar_advantages": (("cpu", "cuda"), _mvar_advantages_reference),
    "grpo_advantages": (("cpu", "cuda"), _grpo_advantages_reference),
    "token_logprob_entropy": (("cpu",), _logprob_entropy_reference),
    "token_logprob_entropy_backward": (("cpu",), _logprob_entropy_backward_reference),
    "token_logprob_entropy_backward_": (("cpu",), _logprob_entropy_backward_inplace_reference),
}


def _with_schema_defaults(op: str, kernel):
    """``kernel`` called with every argument of ``op``'s schema, in order: the
    dispatcher leaves out of a Python kernel's call the trailing arguments that
    equal their schema defaults."""
    arguments = getattr(torch.ops.riskpo, op).default._schema.arguments

    def full_call(*args, **kwargs):
        rest = [kwargs[a.name] if a.name in kwargs else a.default_value
                for a in arguments[len(args):]]
        return kernel(*args, *rest)

    return full_call


def _register_reference_kernels():
    for op, (device_types, kernel) in REFERENCE_KERNELS.items():
        torch.library.register_kernel(f"riskpo::{op}", device_types,
                                      _with_schema_defaults(op, kernel))


_C, _WHY = _load()
AVAILABLE = _C is not None
WITH_CUDA = bool(_C.with_cuda) if AVAILABLE else False
# Why the extension is not loaded (None when it is); kept an ImportError for callers.
LOAD_ERROR: ImportError | None = None if AVAILABLE else ImportError(_WHY)
if not AVAILABLE:
    _register_reference_kernels()
    warnings.warn(
        f"riskpo_kernels: {_WHY}; falling back to the reference implementation (the raw "
        f"torch.ops.riskpo ops included). To use the compiled kernels, {rebuild_advice()}.",
        RuntimeWarning,
        stacklevel=2,
    )
