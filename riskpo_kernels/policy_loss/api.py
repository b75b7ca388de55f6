"""Public policy-loss function: checks, implementation choice, output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import _validation as v
from .reference import AGGREGATIONS, logprobs_and_entropy_reference, token_policy_loss

IMPLS = ("auto", "reference", "cpp")  # "triton" arrives with the GPU kernels


@dataclass(frozen=True)
class PolicyLossOutput:
    """loss: scalar, differentiable. logprobs, entropy: (B, T) float32 (float64
    for float64 logits), detached. metrics: 0-d tensors clipfrac, clipfrac_lower,
    approx_kl, entropy, and kl when reference log-probs are given."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict = field(default_factory=dict)


def _check_token_tensor(name, t, shape, device):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits is on {device}")


def _resolve(impl, device):
    v.check_choice("impl", impl, IMPLS)
    if impl == "auto":
        return "cpp" if device.type == "cpu" and v._extension.AVAILABLE else "reference"
    if impl == "cpp":
        if device.type != "cpu":
            raise ValueError(f"impl='cpp' needs cpu tensors, got logits on {device}")
        if not v._extension.AVAILABLE:
            raise RuntimeError(f"impl='cpp': the compiled extension is not available "
                               f"({v._extension.LOAD_ERROR})")
    return impl


def policy_loss(logits, tokens, mask, advantages, *, old_logprobs=None, ref_logprobs=None,
                clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0, entropy_coef=0.0,
                temperature=1.0, agg="token-mean", impl="auto") -> PolicyLossOutput:
    """PPO-clip policy loss of RiskPO / GRPO (RISKPO_SPEC.md section 8), per token::

        logp  = log_softmax(logits / T)[y],   H = entropy(softmax(logits / T))
        ratio = exp(clamp(logp - old, -20, 20))
        l     = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))
        l     = min(l, -A clip_ratio_c)        where A < 0 (dual clip)
        l    += kl_coef (exp(ref - logp) - (ref - logp) - 1) - entropy_coef H

    aggregated over the mask by ``agg`` (token-mean, seq-mean-token-mean,
    seq-mean-token-sum, seq-mean-token-sum-norm).

    logits: (B, T, V); tokens: (B, T) int64 in [0, V); mask: (B, T) bool or
    float; advantages: (B,) or (B, T); old_logprobs, ref_logprobs: (B, T) or None.
    The vocabulary-sized work runs in one pass forward and one backward
    (``impl="cpp"``: C++ on CPU); nothing of size B*T*V is saved for backward.
    """
    v.check_float_tensor("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    if V < 1:
        raise ValueError("logits has an empty vocabulary (V = 0)")
    device = logits.device
    _check_token_tensor("tokens", tokens, (B, T), device)
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 (or int32), got {tokens.dtype}")
    _check_token_tensor("mask", mask, (B, T), device)
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f"mask must be bool or floating point, got {mask.dtype}")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in ((B,), (B, T)):
        shape = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must be (B,) = ({B},) or (B, T) = ({B}, {T}), got {shape}")
    _check_token_tensor("advantages", advantages, advantages.shape, device)
    v.check_float_tensor("advantages", advantages)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            _check_token_tensor(name, t, (B, T), device)
            v.check_float_tensor(name, t)
    clip_low = v.check_float("clip_low", clip_low, minimum=0.0)
    clip_high = v.check_float("clip_high", clip_high, minimum=0.0)
    if clip_low >= 1:
        raise ValueError(f"clip_low must be < 1, got {clip_low}")
    clip_ratio_c = v.check_float("clip_ratio_c", clip_ratio_c)
    if clip_ratio_c <= 1:
        raise ValueError(f"clip_ratio_c must be > 1 (dual clip), got {clip_ratio_c}")
    kl_coef = v.check_float("kl_coef", kl_coef, minimum=0.0)
    entropy_coef = v.check_float("entropy_coef", entropy_coef)
    temperature = v.check_float("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    v.check_choice("agg", agg, AGGREGATIONS)
    impl = _resolve(impl, device)

    tokens = tokens.long()
    if device.type == "cpu" and tokens.numel() and not torch.compiler.is_compiling():
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= V:
            raise ValueError(f"tokens must lie in [0, {V}), got values in [{low}, {high}]")

    flat_logits, flat_tokens = logits.reshape(B * T, V), tokens.reshape(B * T)
    if impl == "reference":
        logprobs, entropy = logprobs_and_entropy_reference(flat_logits, flat_tokens, temperature)
    else:
        logprobs, entropy, _ = torch.ops.riskpo.token_logprob_entropy(flat_logits, flat_tokens,
                                                                      temperature)
    logprobs, entropy = logprobs.view(B, T), entropy.view(B, T)
    loss, metrics = token_policy_loss(logprobs, entropy, mask, advantages, old_logprobs,
                                      ref_logprobs, clip_low, clip_high, clip_ratio_c, kl_coef,
                                      entropy_coef, agg)
    return PolicyLossOutput(loss, logprobs.detach(), entropy.detach(), metrics)
