"""The RiskPO advantage estimator written the way the public reference writes it.

The public RiskPO code (a fork of verl; advantage estimator
``grpo_bundle_RVaR_quantile_tracking``) computes Mixed-VaR advantages with
Python loops over every response, prompt and bundle, dictionaries keyed by
prompt uid, and arithmetic on one 0-d tensor per response. This module keeps
that structure on purpose, for two jobs:

- **speed baseline**: it is what the compiled kernels are measured against
  (``benchmarks/bench_advantages.py``); vectorising it would make the baseline
  a different program from the one people actually train with.
- **independent oracle**: it shares no code path with the vectorised
  reference (no padding of the last bundle, no ``(B, Q, n)`` reshapes, no
  ``torch.where`` masks), so an indexing mistake in one is unlikely to be
  repeated in the other.

It computes exactly the function of RISKPO_SPEC.md sections 3-5, including
the fixes marked there (a bundle std <= 1e-3 counts as 1), so its advantages
equal ``mvar_advantages(..., impl="reference")`` up to rounding. Where the
public code differs from the spec, the spec wins, and a comment says so.

Do not use it for training: it is thousands of times slower than the kernels.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..common import CREDITS, QUANTILE_MODES, accumulation_dtype
from .reference import STD_FLOOR, SUM_MEAN_FLOOR


def mvar_advantages_loop(scores, index, bundle_size=5, alpha=0.2, beta=0.8, w_low=1.5,
                         w_high=0.0, quantile_mode="batch", q_lo=None, q_hi=None,
                         credit="uniform", normalize_std=True, natural_baseline=True,
                         base_mid=0.0, base_low=0.0, eps=1e-6) -> torch.Tensor:
    """Mixed-VaR advantages by explicit loops (RISKPO_SPEC.md sections 3-5).

    scores: (bsz,) float reward of each response.
    index:  bsz prompt uids (any hashable; a list, numpy array or tensor).
        Responses of one prompt share a uid; sample j of a prompt is its j-th
        response in order of appearance. Prompts form bundles of
        ``bundle_size`` in order of first appearance (the last may be smaller).
    q_lo, q_hi: tracked quantiles as Python floats, or None (track and mix
        modes then use the batch quantiles).
    base_mid, base_low: mean baselines as Python floats.

    Returns advantages (bsz,) in ``scores``' dtype, computed in float64 for
    float64 scores and float32 otherwise. A bundle whose scores are not all
    finite gets NaN advantages (as the reference does).
    """
    if credit not in CREDITS:
        raise ValueError(f"credit must be one of {CREDITS}; got {credit!r}")
    if quantile_mode not in QUANTILE_MODES:
        raise ValueError(f"quantile_mode must be one of {QUANTILE_MODES}; got {quantile_mode!r}")
    if isinstance(index, torch.Tensor):
        index = index.tolist()  # 0-d tensors hash by identity, not by value
    out_dtype = scores.dtype
    acc = accumulation_dtype(out_dtype)
    scores = scores.detach().reshape(-1).to(acc)
    bsz = scores.shape[0]
    if len(index) != bsz:
        raise ValueError(f"index has {len(index)} uids for {bsz} scores")

    one = torch.ones((), dtype=acc, device=scores.device)
    nan = torch.full((), float("nan"), dtype=acc, device=scores.device)
    # The kernels receive tracked quantiles as tensors of the accumulation dtype;
    # rounding them the same way keeps float32 results comparable.
    tracked = quantile_mode != "batch" and q_lo is not None and q_hi is not None
    if tracked:
        q_lo_track = torch.tensor(float(q_lo), dtype=acc, device=scores.device)
        q_hi_track = torch.tensor(float(q_hi), dtype=acc, device=scores.device)

    with torch.no_grad():
        # 1. Group responses by prompt, as verl's GRPO estimator does. A dict keeps
        #    insertion order, so id2score's keys are the prompts in first appearance.
        id2score = defaultdict(list)   # uid -> [0-d score of sample 0, 1, ...]
        id2pos = defaultdict(list)     # uid -> [position in the batch of sample 0, 1, ...]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
            id2pos[index[i]].append(i)

        # 2. Per-prompt statistics for the std and sum-mean credits.
        id2mean, id2std = {}, {}
        for uid, group in id2score.items():
            group_t = torch.stack(group)
            id2mean[uid] = torch.mean(group_t)
            if len(group) == 1:
                id2std[uid] = one  # the std of one sample is undefined (NaN): spec says 1
            else:
                std = torch.std(group_t)
                id2std[uid] = std if std > STD_FLOOR else one

        # 3. Bundles: consecutive runs of bundle_size prompts. The public code reads
        #    a bundle uid per response from the trainer; the trainer makes them this way.
        uids = list(id2score)
        bundles = [uids[k:k + bundle_size] for k in range(0, len(uids), bundle_size)]

        advantages = torch.zeros(bsz, dtype=acc, device=scores.device)
        for bundle in bundles:
            # 3a. Paper j = the j-th sample of every prompt of the bundle. With the
            #     spec's equal group sizes this is n papers; with ragged groups the
            #     public code stops at the smallest, leaving the surplus responses at 0.
            num_papers = min(len(id2score[uid]) for uid in bundle)
            paper_scores, paper_members = [], []
            for j in range(num_papers):
                members = [id2pos[uid][j] for uid in bundle]
                paper_score = id2score[bundle[0]][j]
                for uid in bundle[1:]:
                    paper_score = paper_score + id2score[uid][j]
                paper_scores.append(paper_score)
                paper_members.append(members)
            S = torch.stack(paper_scores)

            if not bool(torch.isfinite(S).all()):
                for members in paper_members:
                    for i in members:
                        advantages[i] = nan
                continue

            # 3b. Quantiles and spread of the bundle's paper scores.
            if num_papers == 1:
                batch_lo = batch_hi = S[0]
                std = one
            else:
                batch_lo = torch.quantile(S, alpha)
                batch_hi = torch.quantile(S, beta)
                std = torch.std(S)
                # Spec fix: the public code divides by 0 + eps here, which in track
                # and mix mode gives advantages of about 1e6 for a flat bundle.
                if not std > STD_FLOOR:
                    std = one
            if tracked and quantile_mode == "track":
                q_down, q_up = q_lo_track, q_hi_track
            elif tracked and quantile_mode == "mix":
                q_down = (q_lo_track + batch_lo) * 0.5
                q_up = (q_hi_track + batch_hi) * 0.5
            else:
                q_down, q_up = batch_lo, batch_hi

            # 4. Mixed-VaR advantage of each paper, then its share for each response.
            for paper_score, members in zip(paper_scores, paper_members):
                rvar = torch.clamp(paper_score - q_down, min=0) - torch.clamp(paper_score - q_up, min=0)
                if natural_baseline:
                    rvar = rvar + (q_down - q_up)
                rvar = (rvar - base_mid) / (beta - alpha + eps)
                cvar_low = (-torch.clamp(q_down - paper_score, min=0) - base_low) / (alpha + eps)
                mixed = rvar + w_low * cvar_low
                # The public code has either the lower or the upper tail; the spec
                # allows both, and skips the upper one at weight 0 as the kernels do.
                if w_high != 0:
                    cvar_high = torch.clamp(paper_score - q_up, min=0) / (1 - beta + eps)
                    mixed = mixed + w_high * cvar_high
                paper_advantage = mixed / (1 + w_low + w_high)
                if normalize_std:
                    paper_advantage = paper_advantage / (std + eps)

                if credit == "sum-mean":
                    # Split the paper's advantage in proportion to how far each
                    # response is from its prompt's mean; evenly if they cancel out.
                    ratios = [scores[i] - id2mean[index[i]] for i in members]
                    sum_ratio = torch.stack(ratios).sum()
                    if sum_ratio.abs().item() > SUM_MEAN_FLOOR:
                        for i, ratio in zip(members, ratios):
                            advantages[i] = paper_advantage * (ratio / sum_ratio)
                    else:
                        share = paper_advantage / len(members)
                        for i in members:
                            advantages[i] = share
                    continue
                for i in members:
                    if credit == "uniform":
                        advantages[i] = paper_advantage
                    elif credit == "score":
                        advantages[i] = (0.5 if scores[i] > 0.0 else 1.5) * paper_advantage
                    else:  # std
                        advantages[i] = paper_advantage / (id2std[index[i]] + eps)

    return advantages.to(out_dtype)


def mvar_advantages_loop_flat(rewards, group_size, **kw) -> torch.Tensor:
    """:func:`mvar_advantages_loop` for prompt-major flat rewards.

    rewards: (P * n,) with response ``p * n + j`` = sample j of prompt p, or (P, n).
    """
    flat = rewards.reshape(-1)
    if flat.numel() % group_size:
        raise ValueError(f"rewards length {flat.numel()} is not a multiple of group_size {group_size}")
    index = [i // group_size for i in range(flat.numel())]
    return mvar_advantages_loop(flat, index, **kw)
