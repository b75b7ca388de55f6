"""The optimisation of one RL step: old and reference log-probs in one no-grad
pass, and one optimizer step per minibatch over micro-batches of the fused
loss, each scaled by its share of the minibatch's normaliser so that the sum
over micro-batches and ranks is the loss of the whole minibatch."""

from __future__ import annotations

import torch

from riskpo_kernels.policy.aggregation import aggregation_parts

from .config import TrainConfig
from .distributed import DistContext
from .rollout import Rollout


def aggregation_count(mask: torch.Tensor, cfg: TrainConfig) -> torch.Tensor | None:
    """What the loss aggregation divides by for this response mask (tokens,
    sequences with a response token, or rows: riskpo_kernels' aggregation_parts,
    the one definition), float64; None for token-sum, which divides by nothing.
    Summed over micro-batches and ranks it is the minibatch's count."""
    _, count = aggregation_parts(mask, cfg.loss_agg, cfg.loss_scale_factor)
    return None if count is None else count.to(torch.float64)


def loss_share(local_count: torch.Tensor | None, total_count: torch.Tensor | None,
               device) -> torch.Tensor:
    """The factor that turns the fused loss of one micro-batch (normalised by
    its own count) into its share of the minibatch's loss: local / total, as
    verl's global denominators; 1 for token-sum (parts simply add up)."""
    if local_count is None:
        return torch.ones((), dtype=torch.float64, device=device)
    return local_count / total_count.clamp(min=1.0)


def loss_options(cfg: TrainConfig) -> dict:
    return {"clip_low": cfg.clip_low, "clip_high": cfg.clip_high, "clip_ratio_c": cfg.clip_ratio_c,
            "kl_coef": cfg.kl_coef, "entropy_coef": cfg.entropy_coef, "agg": cfg.loss_agg,
            "loss_scale_factor": cfg.loss_scale_factor}


def micro_batches(rows: int, size: int):
    size = rows if size <= 0 else size
    for start in range(0, rows, size):
        yield slice(start, min(start + size, rows))


@torch.no_grad()
def rollout_logprobs(policy, batch: Rollout, micro_batch_size: int) -> tuple:
    """(logprobs, entropy): (B, Tr) float32 of the responses under ``policy``,
    0 at padding (never computed)."""
    lps, ents = [], []
    for rows in micro_batches(batch.response.shape[0], micro_batch_size):
        lp, ent = policy(batch.input_ids[rows], batch.attention_mask[rows], batch.response[rows],
                         batch.response_mask[rows])
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents)


def gradient_norm_and_clip(params, max_norm: float) -> torch.Tensor:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm.detach().float()


def update(policy, optimizer, batch: Rollout, advantages, old_logprobs, ref_logprobs,
           cfg: TrainConfig, ctx: DistContext) -> dict:
    """One optimizer step on this rank's rows of a minibatch.

    The fused loss of each micro-batch is scaled by its share of the minibatch's
    normaliser (all-reduced over ranks) and by ``world``, because FSDP averages
    gradients over ranks: the gradient is then exactly that of the loss of the
    whole minibatch, however it is split. A non-finite loss or gradient norm
    skips the step (the weights stay as they were) and is counted.

    Returns floats: loss, grad_norm, skipped (0/1), and token-weighted sums of
    clipfrac, clipfrac_lower, approx_kl, kl with their weight ``tokens``.
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    count = aggregation_count(batch.response_mask, cfg)
    total = None if count is None else ctx.all_reduce_sum(count)
    options = loss_options(cfg)
    device = batch.response.device
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # loss, tokens, 4 metrics
    parts = list(micro_batches(batch.response.shape[0], cfg.micro_batch_size))
    for index, rows in enumerate(parts):
        if hasattr(policy, "set_requires_gradient_sync"):
            # FSDP: accumulate unsharded gradients locally, reduce-scatter once
            # after the last micro-batch (every rank has as many micro-batches).
            policy.set_requires_gradient_sync(index == len(parts) - 1)
        mask = batch.response_mask[rows]
        share = loss_share(aggregation_count(mask, cfg), total, device)
        loss, _, _, metrics = policy(
            batch.input_ids[rows], batch.attention_mask[rows], batch.response[rows], mask,
            advantages[rows], old_logprobs[rows],
            None if ref_logprobs is None else ref_logprobs[rows], loss_options=options)
        (loss * (share * ctx.world).to(loss.dtype)).backward()
        tokens = mask.sum(dtype=torch.float64)
        sums += torch.stack([loss.detach().double() * share, tokens,
                             metrics["clipfrac"].double() * tokens,
                             metrics["clipfrac_lower"].double() * tokens,
                             metrics["approx_kl"].double() * tokens,
                             metrics.get("kl", torch.zeros((), device=device)).double() * tokens])
    ctx.all_reduce_sum(sums)
    grad_norm = gradient_norm_and_clip(params, cfg.max_grad_norm)
    finite = bool(torch.isfinite(sums[0]).item() and torch.isfinite(grad_norm).item())
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": sums[0].item(), "grad_norm": grad_norm.item(), "skipped": 0.0 if finite else 1.0,
            "tokens": sums[1].item(), "clipfrac": sums[2].item(), "clipfrac_lower": sums[3].item(),
            "approx_kl": sums[4].item(), "kl": sums[5].item()}
