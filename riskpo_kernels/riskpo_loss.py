"""RiskPO end to end: rewards in, loss out (the risk core, then the fused-linear
policy loss), with no host synchronisation in between."""

from __future__ import annotations

from .policy import PolicyLossOutput, fused_linear_policy_loss
from .policy.fused_linear import check_linear
from .risk_core import MVaRResult, QuantileTracker, mvar_advantages


def tracked_inputs(tracker: QuantileTracker | None, alpha, beta, quantile_mode, mean_baseline,
                   natural_baseline) -> dict:
    """The tracker's part of :func:`mvar_advantages`' arguments: ``q_lo``, ``q_hi``
    for track / mix mode and, with ``mean_baseline``, ``base_mid``, ``base_low``
    (spec section 6). Before the tracker's first update: batch quantiles and
    zero baselines."""
    inputs = {"q_lo": None, "q_hi": None, "base_mid": 0.0, "base_low": 0.0}
    if tracker is not None and not isinstance(tracker, QuantileTracker):
        raise ValueError(f"tracker must be a QuantileTracker or None, got {type(tracker).__name__}")
    if tracker is None:
        if mean_baseline:
            raise ValueError("mean_baseline needs a tracker (its baselines are the tracked ones)")
        return inputs
    if tracker.initialized:
        if quantile_mode != "batch":
            inputs["q_lo"], inputs["q_hi"] = tracker.value(alpha), tracker.value(beta)
        if mean_baseline:
            inputs["base_mid"], inputs["base_low"] = tracker.baselines(alpha, beta,
                                                                       natural_baseline)
    return inputs


def riskpo_policy_loss(hidden, weight, tokens, mask, rewards, *, group_size, bundle_size=5,
                       alpha=0.2, beta=0.8, w_low=1.5, w_high=0.0, quantile_mode="batch",
                       credit="uniform", normalize_std=True, natural_baseline=True,
                       mean_baseline=False, eps=1e-6, tracker: QuantileTracker | None = None,
                       bias=None, chunk_size=None, old_logprobs=None, ref_logprobs=None,
                       clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0,
                       entropy_coef=0.0, temperature=1.0, agg="token-mean",
                       loss_scale_factor=None, impl="auto") -> tuple[PolicyLossOutput, MVaRResult]:
    """Mixed-VaR advantages of ``rewards`` (:func:`mvar_advantages`) fed to
    :func:`fused_linear_policy_loss` as per-sequence advantages.

    hidden: (B, T, H) with B = P * n responses in prompt-major order (row
    p * n + j is sample j of prompt p); rewards: (B,) or (P, n); the other
    arguments as in the two functions. ``tracker`` supplies the tracked
    quantiles for ``quantile_mode`` track / mix (batch quantiles until its first
    update) and, with ``mean_baseline``, the baselines of spec section 6. The
    tracker is read, not updated: update it with ``result.bundle_scores`` after
    the step, as the reference does.

    Returns (loss output, MVaRResult).
    """
    check_linear(hidden, weight, bias)  # before the advantages, which read hidden's batch size
    risk = mvar_advantages(rewards, group_size=group_size, bundle_size=bundle_size, alpha=alpha,
                           beta=beta, w_low=w_low, w_high=w_high, quantile_mode=quantile_mode,
                           credit=credit, normalize_std=normalize_std,
                           natural_baseline=natural_baseline, eps=eps, impl="auto",
                           **tracked_inputs(tracker, alpha, beta, quantile_mode, mean_baseline,
                                            natural_baseline))
    if risk.advantages.shape[0] != hidden.shape[0]:
        raise ValueError(f"rewards hold {risk.advantages.shape[0]} responses but hidden has "
                         f"{hidden.shape[0]} sequences (B must equal P * n)")
    out = fused_linear_policy_loss(hidden, weight, tokens, mask, risk.advantages, bias=bias,
                                   chunk_size=chunk_size, old_logprobs=old_logprobs,
                                   ref_logprobs=ref_logprobs, clip_low=clip_low,
                                   clip_high=clip_high, clip_ratio_c=clip_ratio_c,
                                   kl_coef=kl_coef, entropy_coef=entropy_coef,
                                   temperature=temperature, agg=agg,
                                   loss_scale_factor=loss_scale_factor, impl=impl)
    return out, risk
