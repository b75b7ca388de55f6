"""The PPO-clip token loss of RiskPO and GRPO (RISKPO_SPEC.md section 8), defined once.

``per_token_loss`` is the definition. The reference (``reference.token_policy_loss``)
aggregates it over the mask and differentiates it with autograd. The fused-linear
op needs d loss / d (logp, H) per token inside its chunk loop, where it runs
below autograd (an op's implementation records no graph): ``token_loss_and_grads``
evaluates the same definition and adds its derivative in closed form, written
from the terms the definition returns. tests/test_policy_loss_fused_linear.py
holds that derivative to autograd through the definition at 1e-12 (float64),
ties on the clip boundaries and the dual clip included.

Not torch.func: it does take gradients below autograd, but inside an op's
implementation it fails under torch's dispatch modes (opcheck's schema and fake
checks: "Cannot access data pointer of Tensor that doesn't have storage"), and
it cost ~0.45 ms of Python per chunk (135 -> 570 us at 128 tokens, 2-core EPYC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RATIO_LOG_CLAMP = 20.0  # ratio = exp(clamp(logp - old, -20, 20)), as verl


@dataclass(frozen=True)
class TokenTerms:
    """The pieces of the per-token loss the metrics read (all the loss's shape)."""

    old: torch.Tensor      # old log-probs (logp.detach() when absent)
    ratio: torch.Tensor    # exp(clamp(logp - old, -20, 20))
    l1: torch.Tensor       # -A ratio
    l2: torch.Tensor       # -A clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped: torch.Tensor  # max(l1, l2)
    l3: torch.Tensor       # -A clip_ratio_c, the dual clip
    kl: torch.Tensor | None  # k3 estimator, with ref log-probs


def per_token_loss(logprobs, entropy, advantages, old_logprobs=None, ref_logprobs=None,
                   clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0,
                   entropy_coef=0.0) -> tuple[torch.Tensor, TokenTerms]:
    """Elementwise, any shape (advantages broadcast to logprobs')::

        ratio = exp(clamp(logp - old, -20, 20))
        l     = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))
        l     = min(l, -A clip_ratio_c)        where A < 0 (dual clip)
        l    += kl_coef (exp(ref - logp) - (ref - logp) - 1) - entropy_coef H

    Returns (l, TokenTerms). ``old_logprobs=None`` means old = logp.detach():
    ratio 1, and the gradient flows through the numerator only."""
    acc = logprobs.dtype
    A = advantages.to(acc)
    old = logprobs.detach() if old_logprobs is None else old_logprobs.to(acc)
    ratio = torch.exp(torch.clamp(logprobs - old, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP))
    l1 = -A * ratio
    l2 = -A * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clipped = torch.maximum(l1, l2)
    l3 = -A * clip_ratio_c
    per_token = torch.where(A < 0, torch.minimum(clipped, l3), clipped)
    kl = None
    if ref_logprobs is not None:
        delta = ref_logprobs.to(acc) - logprobs
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + kl_coef * kl
    if entropy_coef != 0:
        per_token = per_token - entropy_coef * entropy
    return per_token, TokenTerms(old, ratio, l1, l2, clipped, l3, kl)


def weighted_sum(weights, per_token):
    """sum(w * l) over the tokens with w != 0: a NaN at a token of weight 0
    (padding) must not reach the loss, while one at a response token does."""
    return torch.where(weights != 0, weights * per_token, 0).sum()


def _tie_split(a, b, grad_a, grad_b, take_larger):
    """Gradient of max(a, b) (take_larger) or min(a, b), torch's convention:
    the gradient goes to the winner and is split evenly on a tie."""
    a_wins = a > b if take_larger else a < b
    b_wins = a < b if take_larger else a > b
    return torch.where(a_wins, grad_a, torch.where(b_wins, grad_b, (grad_a + grad_b) / 2))


def token_loss_and_grads(logprobs, entropy, weights, advantages, old_logprobs=None,
                         ref_logprobs=None, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0,
                         kl_coef=0.0, entropy_coef=0.0):
    """All inputs (N,) (old/ref may be None). Returns (sum_t w_t l_t,
    grad_logprobs (N,), grad_entropy (N,)) of :func:`per_token_loss`; tokens of
    weight 0 contribute nothing, not even a NaN."""
    per_token, t = per_token_loss(logprobs, entropy, advantages, old_logprobs, ref_logprobs,
                                  clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef)
    A = advantages.to(logprobs.dtype)
    diff = logprobs - t.old
    # d/d logp of each branch; clamp passes the gradient on its closed interval.
    d_ratio = t.ratio * ((diff >= -RATIO_LOG_CLAMP) & (diff <= RATIO_LOG_CLAMP))
    d_l1 = -A * d_ratio
    d_l2 = d_l1 * ((t.ratio >= 1 - clip_low) & (t.ratio <= 1 + clip_high))
    d_clipped = _tie_split(t.l1, t.l2, d_l1, d_l2, take_larger=True)
    d_dual = _tie_split(t.clipped, t.l3, d_clipped, torch.zeros_like(d_clipped), take_larger=False)
    d_logprob = torch.where(A < 0, d_dual, d_clipped)
    if ref_logprobs is not None:
        d_logprob = d_logprob + kl_coef * (1 - torch.exp(ref_logprobs.to(logprobs.dtype) - logprobs))
    w = weights.to(logprobs.dtype)
    active = w != 0
    return (weighted_sum(w, per_token), torch.where(active, w * d_logprob, 0),
            torch.where(active, -entropy_coef * w, 0))
