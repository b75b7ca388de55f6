"""How the per-token loss becomes one number (RISKPO_SPEC.md section 8): verl
0.9.1's ``agg_loss`` modes and TRL 1.16's loss types, defined once.

Every mode is ``loss = sum_t w_t l_t`` with ``w = numerator / count``: the
numerator (B, T) depends only on the batch's own rows, and the count is a
batch-level number that adds up over micro-batches and data-parallel ranks
(tokens, sequences with a response token, rows), or None where the mode has
no normaliser (token-sum). A trainer that splits a minibatch scales each part's
loss by ``count_part / count_total`` and gets the minibatch's loss, which is
what verl's global denominators (``batch_num_tokens``, ``global_batch_size``)
do under data parallelism.

| agg | loss | verl 0.9.1 / TRL 1.16 |
|---|---|---|
| token-mean | sum(l m) / sum(m) | token-mean; TRL bnpo, dapo |
| token-sum | sum(l m) | token-sum |
| seq-mean-token-mean | mean over S of sum_t(l m) / (sum_t(m) + 1e-8) | seq-mean-token-mean |
| seq-mean-token-sum | mean over S of sum_t(l m) | seq-mean-token-sum |
| seq-mean-token-sum-norm | seq-mean-token-sum / L | seq-mean-token-sum-norm |
| trl-grpo | mean over all B rows of sum_t(l m) / max(sum_t(m), 1) | TRL grpo |
| trl-dr-grpo | sum(l m) / (B L) | TRL dr_grpo |

S: the sequences with at least one response token (a fully masked row is left
out, as verl does); L: ``loss_scale_factor`` (verl's, TRL's
``max_completion_length``) or, when None, the padded length T. A batch with
nothing to count has loss 0. The ``+ 1e-8`` is verl's, kept so that the two
agree to rounding.
"""

from __future__ import annotations

import torch

from .. import _validation as v
from ..common import AGGREGATIONS

# The modes whose normaliser includes L (loss_scale_factor, or T).
SCALED = ("seq-mean-token-sum-norm", "trl-dr-grpo")


def check_aggregation(agg, loss_scale_factor, op: str | None = None):
    """The mode and its scale factor (None, or a finite float > 0 for the modes
    that use one); an error naming the argument otherwise."""
    v.check_choice("agg", agg, AGGREGATIONS, op=op)
    if loss_scale_factor is None:
        return agg, None
    if agg not in SCALED:
        v._fail(op, f"loss_scale_factor applies to {' and '.join(SCALED)} only, not agg={agg!r}")
    loss_scale_factor = v.check_float("loss_scale_factor", loss_scale_factor, op=op)
    if loss_scale_factor <= 0:
        v._fail(op, f"loss_scale_factor must be > 0, got {loss_scale_factor}")
    return agg, loss_scale_factor


def aggregation_parts(mask, agg, loss_scale_factor=None):
    """(numerator (B, T), count) of a mode for a batch with this response mask
    (see the module docstring); count is a 0-d tensor, or None for token-sum.
    float32 (float64 for a float64 mask)."""
    m = mask.to(torch.float64 if mask.dtype == torch.float64 else torch.float32)
    B, T = m.shape
    scale = float(loss_scale_factor) if loss_scale_factor is not None else float(max(T, 1))
    per_row = m.sum(1, keepdim=True)
    sequences = (per_row > 0).sum().to(m.dtype)
    rows = torch.tensor(float(B), dtype=m.dtype, device=m.device)
    if agg == "token-mean":
        return m, m.sum()
    if agg == "token-sum":
        return m, None
    if agg == "seq-mean-token-mean":
        return m / (per_row + 1e-8), sequences
    if agg == "seq-mean-token-sum":
        return m, sequences
    if agg == "seq-mean-token-sum-norm":
        return m / scale, sequences
    if agg == "trl-grpo":
        return m / per_row.clamp(min=1.0), rows
    if agg == "trl-dr-grpo":
        return m / scale, rows
    raise ValueError(f"agg must be one of {', '.join(map(repr, AGGREGATIONS))}; got {agg!r}")


def aggregation_weights(mask, agg, loss_scale_factor=None):
    """Per-token weights w (B, T) with loss = sum(w * l): the numerator over the
    count, 0 where there is nothing to count."""
    numerator, count = aggregation_parts(mask, agg, loss_scale_factor)
    if count is None:
        return numerator
    return numerator / count.clamp(min=torch.finfo(numerator.dtype).tiny) * (count > 0)
