"""Public risk-core functions: argument checks, implementation choice, results."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _validation as v
from .. import backends
from ..common import CREDITS, QUANTILE_MODES, accumulation_dtype


@dataclass(frozen=True)
class MVaRResult:
    """Output of :func:`mvar_advantages`.

    advantages:    (P * n,) rewards' dtype, prompt-major (index p * n + j).
    bundle_scores: (num_bundles, n) float32 (float64 for float64 rewards).
    q_lo, q_hi:    (num_bundles,) the quantiles used for each bundle; NaN marks a
                   bundle whose rewards were not all finite.
    """

    advantages: torch.Tensor
    bundle_scores: torch.Tensor
    q_lo: torch.Tensor
    q_hi: torch.Tensor


def _flat_rewards(rewards, group_size):
    v.check_tensor("rewards", rewards, dtypes="float")
    if rewards.dim() == 2:
        if group_size is None:
            group_size = rewards.shape[1]
        elif v.check_int("group_size", group_size, 1) != rewards.shape[1]:
            raise ValueError(f"group_size={group_size} does not match rewards of shape "
                             f"{tuple(rewards.shape)} (P, n)")
    elif rewards.dim() != 1:
        raise ValueError(f"rewards must be (P * n,) or (P, n), got shape {tuple(rewards.shape)}")
    if group_size is None:
        raise ValueError("group_size is required for 1-D rewards")
    group_size = v.check_int("group_size", group_size, 1)
    flat = rewards.detach().reshape(-1)  # advantages are constants of the loss
    if flat.numel() % group_size:
        raise ValueError(f"rewards length {flat.numel()} is not a multiple of group_size {group_size}")
    magnitude = v.check_all_finite("rewards", flat)
    return flat, group_size, magnitude


def _scalar_tensor(name, value, like, dtype):
    """A float or one-element tensor as a 0-d tensor on ``like``'s device.

    Floats become tensors by a fill on the device (no host-to-device copy, no
    sync); a CPU tensor for device rewards is read on the host for the same reason.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        v.check_tensor(name, value)
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, got shape "
                             f"{tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}")
        if value.device == like.device:
            return value.detach().reshape(()).to(dtype)
        if value.device.type == "cpu":
            value = value.item()
        else:
            raise ValueError(f"{name} is on {value.device} but rewards is on {like.device}")
    value = v.check_float(name, value)
    return torch.full((), value, dtype=dtype, device=like.device)


def mvar_advantages(rewards, group_size=None, bundle_size=5, alpha=0.2, beta=0.8, w_low=1.5,
                    w_high=0.0, quantile_mode="batch", q_lo=None, q_hi=None, credit="uniform",
                    normalize_std=True, natural_baseline=True, base_mid=0.0, base_low=0.0,
                    eps=1e-6, impl="auto") -> MVaRResult:
    """Mixed Value-at-Risk advantages of RiskPO (RISKPO_SPEC.md sections 2-5).

    Prompts are cut into bundles of ``bundle_size`` (the last may hold fewer);
    paper j of bundle b scores ``S[b, j] = sum_q r[p_q, j]``. With the bundle's
    quantiles ``q_lo`` (level alpha) and ``q_hi`` (level beta)::

        g_mid  = ((S - q_lo)+ - (S - q_hi)+ + c - base_mid) / (beta - alpha + eps)
        g_low  = (-(q_lo - S)+ - base_low) / (alpha + eps)
        g_high = (S - q_hi)+ / (1 - beta + eps)
        A      = (g_mid + w_low g_low + w_high g_high) / (1 + w_low + w_high)

    with ``c = q_lo - q_hi`` under ``natural_baseline``, then ``A / (sd_b + eps)``
    under ``normalize_std`` (sd_b <= 1e-3 counts as 1), then shared among the
    paper's responses by ``credit``.

    rewards: (P * n,) or (P, n), float32/float64/float16/bfloat16, CPU or CUDA.
    q_lo, q_hi: tracked quantiles (floats or 0-d tensors) for ``quantile_mode``
        ``track`` / ``mix``; when both are None those modes fall back to batch.
    base_mid, base_low: mean baselines (floats or 0-d tensors), 0 by default.
    impl: ``auto`` (the compiled kernel for the tensor's device), ``reference``,
        ``cpp`` or ``cuda``.

    Defaults are the spec's formula at its plainest: uniform credit (each
    response gets its paper's advantage) and beta 0.8 (section 3). No single
    default is "the paper's": its two published recipes differ in beta, credit
    and baseline. For one of them, pass its options::

        rk.mvar_advantages(rewards, group_size=n, **rk.recipes.advantage_options("math"))

    and to change one of them, give it to ``advantage_options`` (the explicit
    value wins): ``**rk.recipes.advantage_options("math", bundle_size=8)``; next
    to the unpacked recipe it would be a duplicate keyword, a ``TypeError``.
    (``riskpo-train`` defaults to the math recipe's options.)

    Returns an :class:`MVaRResult`. Non-finite rewards raise ``ValueError`` on
    CPU; on CUDA (no host sync) they make their bundle's advantages and
    quantiles NaN.
    """
    flat, n, magnitude = _flat_rewards(rewards, group_size)
    # A bundle larger than the batch is the whole batch: clamped, so that no
    # implementation sizes anything by a bundle_size in the billions.
    bundle_size = min(v.check_int("bundle_size", bundle_size, 1), max(flat.numel() // n, 1))
    alpha, beta = v.check_float("alpha", alpha), v.check_float("beta", beta)
    if not 0 < alpha < beta < 1:
        raise ValueError(f"need 0 < alpha < beta < 1, got alpha={alpha}, beta={beta}")
    w_low = v.check_float("w_low", w_low, minimum=0.0)
    w_high = v.check_float("w_high", w_high, minimum=0.0)
    eps = v.check_float("eps", eps, minimum=0.0)
    v.check_choice("credit", credit, CREDITS)
    v.check_choice("quantile_mode", quantile_mode, QUANTILE_MODES)
    normalize_std = v.check_bool("normalize_std", normalize_std)
    natural_baseline = v.check_bool("natural_baseline", natural_baseline)
    if (q_lo is None) != (q_hi is None):
        raise ValueError("q_lo and q_hi must be given together (or both None for batch quantiles)")
    backend = backends.resolve(impl, flat.device, backends.RISK_CORE, "rewards")

    acc = accumulation_dtype(flat.dtype)
    if quantile_mode == "batch":  # tracked values are not read: skip their conversion
        q_lo = q_hi = None
    q_lo_t = _scalar_tensor("q_lo", q_lo, flat, acc)
    q_hi_t = _scalar_tensor("q_hi", q_hi, flat, acc)
    # Zero baselines are the kernels' default: passing None spares two fills.
    base_mid_t = None if isinstance(base_mid, (int, float)) and base_mid == 0 else \
        _scalar_tensor("base_mid", base_mid, flat, acc)
    base_low_t = None if isinstance(base_low, (int, float)) and base_low == 0 else \
        _scalar_tensor("base_low", base_low, flat, acc)

    out = MVaRResult(*backend.mvar_advantages(
        flat, n, bundle_size, alpha, beta, w_low, w_high, quantile_mode, q_lo_t, q_hi_t, credit,
        normalize_std, natural_baseline, base_mid_t, base_low_t, eps))
    if magnitude is not None and magnitude * bundle_size > torch.finfo(acc).max \
            and bool(torch.isnan(out.q_lo).any()):
        # The rewards are finite (checked, CPU), so a bundle's score overflowed
        # the accumulation dtype: a NaN bundle would be a silent wrong answer.
        bad = torch.isnan(out.q_lo).nonzero().flatten()[:5].tolist()
        raise ValueError(f"rewards: the bundle scores (sums of {bundle_size} prompts' rewards) of "
                         f"bundles {bad} overflow {out.bundle_scores.dtype}; pass float64 rewards")
    return out


def grpo_advantages(rewards, group_size=None, normalize_std=True, eps=1e-6, impl="auto"):
    """GRPO advantages (RISKPO_SPEC.md section 7), per group of ``n`` samples::

        A = (r - mean(r)) / (std(r) + eps)     (unbiased std)
        A = r - mean(r)                         (normalize_std=False, Dr. GRPO)

    A group of one has mean 0 and std 1.

    rewards: (P * n,) or (P, n) -> advantages (P * n,) in the rewards' dtype.
    Non-finite rewards raise ``ValueError`` on CPU; on CUDA their group is NaN.
    """
    flat, n, _ = _flat_rewards(rewards, group_size)
    eps = v.check_float("eps", eps, minimum=0.0)
    normalize_std = v.check_bool("normalize_std", normalize_std)
    backend = backends.resolve(impl, flat.device, backends.RISK_CORE, "rewards")
    return backend.grpo_advantages(flat, n, normalize_std, eps)
