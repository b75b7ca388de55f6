"""Plain-PyTorch reference of the token-level policy loss (RISKPO_SPEC.md section 8).

It materialises the float32 log-softmax, as verl and TRL do: the readable spec
and the test oracle. The loss on top of the per-token log-probs and entropies
(`token_policy_loss`, which aggregates `token_loss.per_token_loss`) is shared
by every implementation: it is O(B * T), while the vocabulary-sized work is
what the kernels replace.
"""

from __future__ import annotations

import torch

from .aggregation import aggregation_weights
from .token_loss import per_token_loss, weighted_sum


def logprobs_and_entropy_reference(logits, tokens, temperature):
    """logits: (N, V), tokens: (N,) -> logprobs (N,), entropy (N,), both float32
    (float64 for float64 logits), differentiable w.r.t. logits."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp_all = torch.log_softmax(logits.to(acc) / temperature, dim=-1)        # (N, V)
    logprobs = logp_all.gather(-1, tokens[:, None]).squeeze(-1)
    p = logp_all.exp()
    # p log p -> 0 as p -> 0: a -inf logit (masked vocabulary) must give neither
    # 0 * -inf forward nor, through a where, a NaN gradient backward.
    entropy = -(p * torch.where(p > 0, logp_all, 0)).sum(-1)
    return logprobs, entropy


def token_policy_loss(logprobs, entropy, mask, advantages, old_logprobs=None, ref_logprobs=None,
                      clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0,
                      entropy_coef=0.0, agg="token-mean", loss_scale_factor=None):
    """PPO-clip loss with dual clip, k3 KL and entropy bonus, from per-token values.

    logprobs, entropy: (B, T) differentiable; mask: (B, T); advantages: (B,) or
    (B, T); old_logprobs, ref_logprobs: (B, T) or None (old = logprobs.detach()).
    Returns the scalar loss and a dict of 0-d metrics (means over the mask).
    """
    acc = logprobs.dtype
    A = advantages.to(acc)
    A = A[:, None].expand_as(logprobs) if A.dim() == 1 else A
    per_token, terms = per_token_loss(logprobs, entropy, A, old_logprobs, ref_logprobs, clip_low,
                                      clip_high, clip_ratio_c, kl_coef, entropy_coef)
    loss = weighted_sum(aggregation_weights(mask, agg, loss_scale_factor).to(acc), per_token)

    m = mask.to(acc)
    count = m.sum()

    def masked_mean(x):  # weighted by a float mask; 0 for an empty mask
        return torch.where(m != 0, x.detach().to(acc) * m, 0).sum() / count.clamp(
            min=torch.finfo(acc).tiny)

    metrics = {
        "clipfrac": masked_mean((terms.l2 > terms.l1).to(acc)),
        "clipfrac_lower": masked_mean(((terms.clipped > terms.l3) & (A < 0)).to(acc)),
        "approx_kl": masked_mean(terms.old - logprobs.detach()),
        "entropy": masked_mean(entropy),
    }
    if terms.kl is not None:
        metrics["kl"] = masked_mean(terms.kl)
    return loss, metrics


def policy_loss_reference(logits, tokens, mask, advantages, old_logprobs=None, ref_logprobs=None,
                          clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0,
                          entropy_coef=0.0, temperature=1.0, agg="token-mean",
                          loss_scale_factor=None):
    """logits: (B, T, V) -> (loss, logprobs (B, T), entropy (B, T), metrics)."""
    B, T, V = logits.shape
    logprobs, entropy = logprobs_and_entropy_reference(logits.reshape(B * T, V),
                                                       tokens.reshape(B * T), temperature)
    logprobs, entropy = logprobs.view(B, T), entropy.view(B, T)
    loss, metrics = token_policy_loss(logprobs, entropy, mask, advantages, old_logprobs,
                                      ref_logprobs, clip_low, clip_high, clip_ratio_c, kl_coef,
                                      entropy_coef, agg, loss_scale_factor)
    return loss, logprobs, entropy, metrics
