"""The per-token PPO-clip loss with its derivatives in closed form.

The fused-linear path computes the gradient during the forward pass (the
aggregation weights are known from the mask up front), so it needs
d loss / d logp and d loss / d H per token without autograd. The subgradient
choices are torch's, so the result equals autograd through
`reference.token_policy_loss`: clamp passes the gradient on its closed
interval, and maximum/minimum split it evenly between tied arguments.
"""

from __future__ import annotations

import torch

from .reference import RATIO_LOG_CLAMP


def _tie_split(a, b, grad_a, grad_b, take_larger):
    """Gradient of max(a, b) (take_larger) or min(a, b), torch's convention."""
    a_wins = a > b if take_larger else a < b
    b_wins = a < b if take_larger else a > b
    return torch.where(a_wins, grad_a, torch.where(b_wins, grad_b, (grad_a + grad_b) / 2))


def token_loss_and_grads(logprobs, entropy, weights, advantages, old_logprobs=None,
                         ref_logprobs=None, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0,
                         kl_coef=0.0, entropy_coef=0.0):
    """All inputs (N,) (old/ref may be None). Returns (weighted loss sum,
    grad_logprobs (N,), grad_entropy (N,)) of sum_t w_t l_t; tokens with weight
    0 contribute nothing, not even a NaN."""
    A = advantages.to(logprobs.dtype)
    old = logprobs if old_logprobs is None else old_logprobs.to(logprobs.dtype)
    diff = logprobs - old
    ratio = torch.exp(torch.clamp(diff, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP))
    d_ratio = ratio * ((diff >= -RATIO_LOG_CLAMP) & (diff <= RATIO_LOG_CLAMP))

    l1 = -A * ratio
    low, high = 1 - clip_low, 1 + clip_high
    l2 = -A * torch.clamp(ratio, low, high)
    d_l1 = -A * d_ratio
    d_l2 = -A * d_ratio * ((ratio >= low) & (ratio <= high))
    clipped = torch.maximum(l1, l2)
    d_clipped = _tie_split(l1, l2, d_l1, d_l2, take_larger=True)
    l3 = -A * clip_ratio_c
    dual = torch.minimum(clipped, l3)
    d_dual = _tie_split(clipped, l3, d_clipped, torch.zeros_like(d_clipped), take_larger=False)
    negative = A < 0
    per_token = torch.where(negative, dual, clipped)
    d_logprob = torch.where(negative, d_dual, d_clipped)

    if ref_logprobs is not None:
        delta = ref_logprobs.to(logprobs.dtype) - logprobs
        per_token = per_token + kl_coef * (torch.exp(delta) - delta - 1)
        d_logprob = d_logprob + kl_coef * (1 - torch.exp(delta))
    if entropy_coef != 0:
        per_token = per_token - entropy_coef * entropy

    w = weights.to(logprobs.dtype)
    active = w != 0
    loss = torch.where(active, w * per_token, 0).sum()
    grad_logprobs = torch.where(active, w * d_logprob, 0)
    grad_entropy = torch.where(active, -entropy_coef * w, 0)
    return loss, grad_logprobs, grad_entropy
