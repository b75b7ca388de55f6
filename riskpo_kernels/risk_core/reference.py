"""Plain-PyTorch reference of the risk core: the readable spec and the test oracle.

Vectorised over bundles, prompts and samples (no Python loop over responses).
Same signature and outputs as ``torch.ops.riskpo.mvar_advantages`` and
``torch.ops.riskpo.grpo_advantages``; the formulas are RISKPO_SPEC.md's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import accumulation_dtype

STD_FLOOR = 1e-3        # a std at or below this counts as 1 (spec section 4, fix)
SUM_MEAN_FLOOR = 1e-6   # sum-mean credit: |D| at or below this splits the paper evenly


def guarded_std(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Unbiased std along ``dim``; 1 where it is <= STD_FLOOR or there is one sample."""
    if x.shape[dim] < 2 or x.numel() == 0:
        return torch.ones_like(x.select(dim, 0))
    sd = x.std(dim)
    return torch.where(sd > STD_FLOOR, sd, torch.ones_like(sd))


def mvar_advantages_reference(rewards, group_size, bundle_size, alpha, beta, w_low, w_high,
                              quantile_mode, q_lo_track, q_hi_track, credit, normalize_std,
                              natural_baseline, base_mid, base_low, eps):
    """rewards: (P * n,) -> advantages (P * n,), bundle_scores (B, n), q_lo (B,), q_hi (B,).

    B = ceil(P / bundle_size); the last bundle may hold fewer prompts. A bundle
    whose scores are not all finite gets NaN advantages and quantiles.
    """
    n = group_size
    acc = accumulation_dtype(rewards.dtype)
    r = rewards.to(acc).view(-1, n)                                          # (P, n)
    P = r.shape[0]
    Q = min(bundle_size, max(P, 1))  # a bundle larger than the batch is the batch
    B = -(-P // Q)
    padded = F.pad(r, (0, 0, 0, B * Q - P)).view(B, Q, n)                    # zero prompts pad
    prompts = (torch.arange(B * Q, device=r.device) < P).view(B, Q).sum(1)   # (B,) Qb

    scores = padded.sum(1)                                                   # (B, n)
    finite = torch.isfinite(scores).all(1)                                   # (B,)
    safe = torch.where(finite[:, None], scores, torch.zeros_like(scores))
    if B == 0:  # torch.quantile rejects empty inputs
        batch_lo = batch_hi = safe.new_empty(0)
    else:
        batch_lo = torch.quantile(safe, alpha, dim=1)
        batch_hi = torch.quantile(safe, beta, dim=1)
    tracked = q_lo_track is not None and q_hi_track is not None
    if tracked and quantile_mode == "track":
        q_lo = q_lo_track.to(acc).reshape(()).expand(B)
        q_hi = q_hi_track.to(acc).reshape(()).expand(B)
    elif tracked and quantile_mode == "mix":
        q_lo = (q_lo_track.to(acc).reshape(()) + batch_lo) * 0.5
        q_hi = (q_hi_track.to(acc).reshape(()) + batch_hi) * 0.5
    else:
        q_lo, q_hi = batch_lo, batch_hi

    zero = torch.zeros((), dtype=acc, device=r.device)
    base_mid = zero if base_mid is None else base_mid.to(acc).reshape(())
    base_low = zero if base_low is None else base_low.to(acc).reshape(())
    lo, hi = q_lo[:, None], q_hi[:, None]
    baseline = (lo - hi) if natural_baseline else zero
    g_mid = (F.relu(safe - lo) - F.relu(safe - hi) + baseline - base_mid) / (beta - alpha + eps)
    g_low = (-F.relu(lo - safe) - base_low) / (alpha + eps)
    mixed = g_mid + w_low * g_low
    if w_high != 0:
        mixed = mixed + w_high * F.relu(safe - hi) / (1 - beta + eps)
    A = mixed / (1 + w_low + w_high)                                         # (B, n) per paper
    if normalize_std:
        A = A / (guarded_std(safe, 1)[:, None] + eps)

    A = A[:, None, :]                                                        # (B, 1, n)
    if credit == "uniform":
        adv = A.expand(B, Q, n)
    elif credit == "score":
        adv = torch.where(padded > 0, 0.5 * A, 1.5 * A)
    elif credit == "std":
        prompt_sd = F.pad(guarded_std(r, 1), (0, B * Q - P), value=1.0).view(B, Q, 1)
        adv = A / (prompt_sd + eps)
    elif credit == "sum-mean":
        centred = F.pad(r - r.mean(1, keepdim=True), (0, 0, 0, B * Q - P)).view(B, Q, n)
        D = centred.sum(1, keepdim=True)                                     # (B, 1, n)
        spread = D.abs() > SUM_MEAN_FLOOR
        adv = torch.where(spread, A * centred / torch.where(spread, D, torch.ones_like(D)),
                          A / prompts.to(acc)[:, None, None])
    else:
        raise ValueError(f"credit must be one of uniform, score, std, sum-mean; got {credit!r}")

    nan = torch.full((), float("nan"), dtype=acc, device=r.device)
    adv = torch.where(finite[:, None, None], adv, nan)
    advantages = adv.reshape(B * Q, n)[:P].reshape(-1).to(rewards.dtype)
    return (advantages, scores,
            torch.where(finite, q_lo, nan).contiguous(), torch.where(finite, q_hi, nan).contiguous())


def grpo_advantages_reference(rewards, group_size, normalize_std, eps):
    """rewards: (P * n,) -> (P * n,): (r - mean) / (std + eps) per group of n.

    A group of one has mean 0 and std 1; a group with a non-finite reward gets NaN.
    Mean, std and the quotient are float64 whatever the rewards' dtype: the
    std of float32 rewards near the float32 limit overflows float32, while the
    advantages themselves are of order 1.
    """
    n = group_size
    r = rewards.to(torch.float64).view(-1, n)                                # (P, n)
    mean = r.mean(1, keepdim=True)
    sd = r.std(1, keepdim=True) if n > 1 and r.numel() else torch.zeros_like(mean)
    finite = torch.isfinite(mean) & torch.isfinite(sd)
    if n == 1:
        mean, sd = torch.zeros_like(mean), torch.ones_like(sd)
    adv = r - mean
    if normalize_std:
        adv = adv / (sd + eps)
    adv = torch.where(finite, adv, torch.full_like(adv, float("nan")))
    return adv.reshape(-1).to(rewards.dtype)
