"""Tests of the plain-PyTorch policy-loss reference (RISKPO_SPEC.md section 8).

The reference is the oracle every kernel is compared with, so it is checked here
on its own: hand-computed cases (each expected value worked out in the comments
from the spec's formulas), the metrics, float64 gradchecks, the closed form of
the vocabulary gradient, NaN handling, and an independent re-statement of verl's
`compute_policy_loss` (vanilla PPO with dual clip).

Masks are float64 wherever a float64 result is compared tightly: a bool or
float32 mask gives float32 aggregation weights (see
`test_bool_mask_matches_float64_mask_to_float32_precision`).
"""

from __future__ import annotations

import math

import pytest
import torch

import riskpo_kernels as rk

from riskpo_kernels.policy import (AGGREGATIONS, aggregation_weights,
                                        logprobs_and_entropy_reference, policy_loss_reference,
                                        token_policy_loss)

F64 = torch.float64
LN2, LN3 = math.log(2.0), math.log(3.0)
E = math.e


def t64(x):
    return torch.tensor(x, dtype=F64)


def close(actual, expected, rtol=1e-12, atol=1e-12):
    if not torch.is_tensor(expected):
        expected = t64(expected)
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=rtol, atol=atol)


def entropy_of(p):
    return -sum(q * math.log(q) for q in p)


# --------------------------------------------------------------------------------------
# 1. Hand-computed cases
# --------------------------------------------------------------------------------------


def test_logprobs_and_entropy_v2_with_temperature():
    # Temperature 2.
    # Row 0: logits [1, 3] -> z = [0.5, 1.5]; p = [1, e] / (1 + e).
    #   y = 0: logp = 0.5 - log(e^0.5 + e^1.5) = -log(1 + e).
    #   H = -(p0 log p0 + p1 log p1).
    # Row 1: logits [0, 0] -> uniform; y = 1: logp = -log 2, H = log 2.
    # Row 2: logits [4, -2] -> z = [2, -1]; p = [1, e^-3] / (1 + e^-3);
    #   y = 1: logp = -1 - log(e^2 + e^-1) = -3 - log(1 + e^-3).
    logits = t64([[1.0, 3.0], [0.0, 0.0], [4.0, -2.0]])
    tokens = torch.tensor([0, 1, 1])
    logp, H = logprobs_and_entropy_reference(logits, tokens, 2.0)
    p_row0 = [1 / (1 + E), E / (1 + E)]
    q = math.exp(-3)
    p_row2 = [1 / (1 + q), q / (1 + q)]
    close(logp, [-math.log(1 + E), -LN2, -3 - math.log(1 + q)])
    close(H, [entropy_of(p_row0), LN2, entropy_of(p_row2)])
    assert logp.dtype == F64 and H.dtype == F64


def test_logprobs_and_entropy_v3_temperature_cancels():
    # logits [0, 2 ln 2, 2 ln 3] at temperature 2 are z = [0, ln 2, ln 3]: p = [1, 2, 3] / 6.
    # logp_y = log((y + 1) / 6); H = -(1/6 log 1/6 + 1/3 log 1/3 + 1/2 log 1/2).
    row = [0.0, 2 * LN2, 2 * LN3]
    logits = t64([row, row, row])
    tokens = torch.tensor([0, 1, 2])
    logp, H = logprobs_and_entropy_reference(logits, tokens, 2.0)
    close(logp, [math.log(1 / 6), math.log(2 / 6), math.log(3 / 6)])
    h = entropy_of([1 / 6, 2 / 6, 3 / 6])
    close(H, [h, h, h])


def test_minus_inf_logit_gives_finite_entropy_and_gradient():
    # A -inf logit (masked vocabulary) has p = 0 and p log p -> 0.
    # logits [0, -inf, 0] at T = 1: p = [1/2, 0, 1/2], y = 0: logp = -ln 2, H = ln 2.
    #   d logp / d x = onehot - p = [1/2, 0, -1/2];
    #   d H / d x = -p (log p + H) = [-(1/2)(-ln 2 + ln 2), 0, 0] = 0.
    # logits [ln 3, 0, -inf] at T = 1: p = [3/4, 1/4, 0], y = 1: logp = ln(1/4).
    x = t64([[0.0, -math.inf, 0.0], [LN3, 0.0, -math.inf]]).requires_grad_()
    logp, H = logprobs_and_entropy_reference(x, torch.tensor([0, 1]), 1.0)
    close(logp, [-LN2, math.log(0.25)])
    close(H, [LN2, entropy_of([0.75, 0.25])])
    (g_logp,) = torch.autograd.grad(logp.sum(), x, retain_graph=True)
    (g_H,) = torch.autograd.grad(H.sum(), x)
    close(g_logp, [[0.5, 0.0, -0.5], [-0.75, 0.75, 0.0]])
    h1 = entropy_of([0.75, 0.25])
    close(g_H, [[0.0, 0.0, 0.0],
                [-0.75 * (math.log(0.75) + h1), -0.25 * (math.log(0.25) + h1), 0.0]])


def test_logprobs_and_entropy_float32_accumulates_in_float32():
    # Half-precision logits are promoted to float32 before the log-softmax.
    logits = torch.tensor([[1.0, 3.0]], dtype=torch.bfloat16)
    logp, H = logprobs_and_entropy_reference(logits, torch.tensor([0]), 1.0)
    assert logp.dtype == torch.float32 and H.dtype == torch.float32
    # logits [1, 3] at T=1: logp_0 = -log(1 + e^2).
    close(logp, [-math.log(1 + E**2)], rtol=1e-6, atol=1e-6)


# One token, A and ratio chosen; clip_low = clip_high = 0.2, c = 3.
#   l1 = -A r, l2 = -A clamp(r, 0.8, 1.2), l = max(l1, l2), A < 0: l = min(l, -3A).
#   d l / d logp = d l / d r * r: -A r where the unclipped l1 is selected, else 0.
# columns: A, r, l, dl/dlogp, counts in clipfrac (l2 > l1), in clipfrac_lower
REGIMES = {
    # r in [0.8, 1.2]: l1 = l2 = -1.1, no clip.
    "inside": (1.0, 1.1, -1.1, -1.1, 0, 0),
    # A > 0, r = 1.5 > 1.2: l1 = -3, l2 = -2.4 -> l = -2.4, constant in logp.
    "above_A_pos": (2.0, 1.5, -2.4, 0.0, 1, 0),
    # A > 0, r = 0.5 < 0.8: l1 = -0.5, l2 = -0.8 -> l = l1 = -0.5 (pessimistic: no clip).
    "below_A_pos": (1.0, 0.5, -0.5, -0.5, 0, 0),
    # A < 0, r = 0.5 < 0.8: l1 = 0.5, l2 = 0.8 -> l = 0.8, clipped; 0.8 < 3 so no dual clip.
    "below_A_neg": (-1.0, 0.5, 0.8, 0.0, 1, 0),
    # A < 0, r = 2 (> 1.2 but < c): l1 = 2, l2 = 1.2 -> l = 2 < 3, unclipped, dl/dlogp = 2.
    "above_A_neg_below_c": (-1.0, 2.0, 2.0, 2.0, 0, 0),
    # Dual clip: A = -1, r = e^2 ~ 7.39: l1 = 7.39 > l2 = 1.2, max = 7.39 > -A c = 3
    #   -> l = 3, gradient 0, counted by clipfrac_lower (not by clipfrac: l2 < l1).
    "dual_clip": (-1.0, E**2, 3.0, 0.0, 0, 1),
    # Dual clip with |A| != 1: A = -0.5, r = 4: max(2, 0.6) = 2 > 1.5 -> l = 1.5.
    "dual_clip_half": (-0.5, 4.0, 1.5, 0.0, 0, 1),
    # A = 0: every term is 0.
    "zero_advantage": (0.0, 1.5, 0.0, 0.0, 0, 0),
}


@pytest.mark.parametrize("name", list(REGIMES))
def test_ppo_clip_regimes_single_token(name):
    A, r, l_exp, g_exp, clip_exp, lower_exp = REGIMES[name]
    old = t64([[-1.3]])
    logp = (old + math.log(r)).requires_grad_()
    H = t64([[0.7]])
    mask = t64([[1.0]])
    loss, metrics = token_policy_loss(logp, H, mask, t64([A]), old_logprobs=old)
    close(loss, l_exp)
    (g,) = torch.autograd.grad(loss, logp)
    close(g, [[g_exp]])
    close(metrics["clipfrac"], float(clip_exp))
    close(metrics["clipfrac_lower"], float(lower_exp))
    close(metrics["approx_kl"], -math.log(r))  # old - logp
    close(metrics["entropy"], 0.7)
    assert "kl" not in metrics
    if g_exp == 0.0:
        # Clipped: the loss is constant in logp, not only its autograd gradient.
        for d in (-1e-3, 1e-3):
            loss_d, _ = token_policy_loss(logp.detach() + d, H, mask, t64([A]), old_logprobs=old)
            close(loss_d, l_exp)


def test_ppo_regimes_together_token_mean_and_metrics():
    # The first six regimes of REGIMES in one row of T = 6, token-mean:
    #   loss = (-1.1 - 2.4 - 0.5 + 0.8 + 2 + 3) / 6 = 1.8 / 6 = 0.3.
    #   d loss / d logp = [-1.1, 0, -0.5, 0, 2, 0] / 6.
    #   clipfrac = 2/6, clipfrac_lower = 1/6,
    #   approx_kl = -(ln 1.1 + ln 1.5 + ln 0.5 + ln 0.5 + ln 2 + 2) / 6.
    names = ["inside", "above_A_pos", "below_A_pos", "below_A_neg", "above_A_neg_below_c",
             "dual_clip"]
    A = t64([[REGIMES[n][0] for n in names]])
    r = [REGIMES[n][1] for n in names]
    old = t64([[-0.5, -1.0, -1.5, -2.0, -2.5, -3.0]])
    logp = (old + t64([[math.log(x) for x in r]])).requires_grad_()
    H = t64([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    loss, metrics = token_policy_loss(logp, H, torch.ones(1, 6, dtype=F64), A, old_logprobs=old)
    close(loss, 0.3)
    (g,) = torch.autograd.grad(loss, logp)
    close(g, t64([[-1.1, 0.0, -0.5, 0.0, 2.0, 0.0]]) / 6)
    close(metrics["clipfrac"], 2 / 6)
    close(metrics["clipfrac_lower"], 1 / 6)
    close(metrics["approx_kl"], -(math.log(1.1) + math.log(1.5) + 2 * math.log(0.5) + LN2 + 2) / 6)
    close(metrics["entropy"], 2.1 / 6)


def test_asymmetric_clip_range():
    # clip_low = 0.1, clip_high = 0.3 (DAPO's clip-higher), A = 1:
    #   r = 1.25 in [0.9, 1.3]: l = -1.25, gradient -1.25 (the symmetric 0.2 would clip it).
    #   r = 1.4 > 1.3: l = -1.3, gradient 0.
    # A = -1:
    #   r = 0.85 < 0.9: l1 = 0.85, l2 = 0.9 -> l = 0.9, gradient 0, clipped.
    # token-mean over 3 tokens: loss = (-1.25 - 1.3 + 0.9) / 3 = -1.65 / 3.
    old = t64([[0.0, 0.0, 0.0]])
    logp = t64([[math.log(1.25), math.log(1.4), math.log(0.85)]]).requires_grad_()
    A = t64([[1.0, 1.0, -1.0]])
    zeros, ones = torch.zeros(1, 3, dtype=F64), torch.ones(1, 3, dtype=F64)
    loss, metrics = token_policy_loss(logp, zeros, ones, A, old_logprobs=old, clip_low=0.1,
                                      clip_high=0.3)
    close(loss, -1.65 / 3)
    (g,) = torch.autograd.grad(loss, logp)
    close(g, [[-1.25 / 3, 0.0, 0.0]])
    close(metrics["clipfrac"], 2 / 3)
    close(metrics["clipfrac_lower"], 0.0)


def test_ratio_log_clamp_at_20():
    # ratio = exp(clamp(logp - old, -20, 20)).
    # Token 0: logp - old = 25, A = -1 -> r = e^20; l1 = e^20 > 3 -> dual clip, l = 3.
    # Token 1: logp - old = -25, A = 1 -> r = e^-20; l1 = -e^-20 > l2 = -0.8 -> l = -e^-20,
    #   and its gradient is 0 because the clamp saturates.
    # token-mean: loss = (3 - e^-20) / 2; approx_kl is the spec's mean(old - logp)
    # = (-25 + 25) / 2 = 0
    # (verl logs the clamped difference instead; the two agree for |logp - old| <= 20).
    old = t64([[-30.0, -1.0]])
    logp = t64([[-5.0, -26.0]]).requires_grad_()
    zeros, ones = torch.zeros(1, 2, dtype=F64), torch.ones(1, 2, dtype=F64)
    loss, metrics = token_policy_loss(logp, zeros, ones, t64([[-1.0, 1.0]]), old_logprobs=old)
    close(loss, (3 - math.exp(-20)) / 2)
    (g,) = torch.autograd.grad(loss, logp)
    close(g, [[0.0, 0.0]])
    close(metrics["clipfrac_lower"], 0.5)
    close(metrics["clipfrac"], 0.0)
    close(metrics["approx_kl"], 0.0)


def test_dual_clip_with_other_c():
    # c = 2, A = -1, r = 2.5: max(l1, l2) = max(2.5, 1.2) = 2.5 > 2 -> l = 2.
    # c = 10 on the same token: 2.5 < 10 -> l = 2.5, gradient -A r = 2.5.
    old = t64([[0.0]])
    logp = t64([[math.log(2.5)]]).requires_grad_()
    args = (torch.zeros(1, 1, dtype=F64), torch.ones(1, 1, dtype=F64), t64([-1.0]))
    loss, m = token_policy_loss(logp, *args, old_logprobs=old, clip_ratio_c=2.0)
    close(loss, 2.0)
    close(m["clipfrac_lower"], 1.0)
    loss, m = token_policy_loss(logp, *args, old_logprobs=old, clip_ratio_c=10.0)
    close(loss, 2.5)
    close(torch.autograd.grad(loss, logp)[0], [[2.5]])
    close(m["clipfrac_lower"], 0.0)


def test_k3_kl_term_and_metric():
    # old absent -> ratio 1, l_ppo = -A. A = 0 here so only the KL term remains.
    # kl = exp(ref - logp) - (ref - logp) - 1:
    #   token 0: ref - logp = ln 2  -> kl = 2 - ln 2 - 1 = 1 - ln 2;
    #            d kl/d logp = 1 - e^delta = -1.
    #   token 1: ref - logp = -ln 2 -> kl = 1/2 + ln 2 - 1 = ln 2 - 1/2;
    #            d kl/d logp = 1 - 1/2 = 1/2.
    #   token 2: ref = logp -> kl = 0.
    # kl_coef = 0.1, token-mean over 3: loss = 0.1 (1 - ln 2 + ln 2 - 1/2) / 3 = 0.05 / 3.
    logp = t64([[-1.0, -2.0, -0.5]]).requires_grad_()
    ref = t64([[-1.0 + LN2, -2.0 - LN2, -0.5]])
    mask = torch.ones(1, 3, dtype=F64)
    loss, m = token_policy_loss(logp, torch.zeros(1, 3, dtype=F64), mask, t64([0.0]),
                                ref_logprobs=ref, kl_coef=0.1)
    close(loss, 0.05 / 3)
    (g,) = torch.autograd.grad(loss, logp)
    close(g, [[0.1 * -1 / 3, 0.1 * 0.5 / 3, 0.0]])
    close(m["kl"], 0.5 / 3)
    # The kl metric is reported whenever ref is given, even with kl_coef = 0 (and then
    # the loss carries no KL).
    loss0, m0 = token_policy_loss(logp, torch.zeros(1, 3, dtype=F64), mask, t64([0.0]),
                                  ref_logprobs=ref, kl_coef=0.0)
    close(loss0, 0.0)
    close(m0["kl"], 0.5 / 3)
    _, m_none = token_policy_loss(logp, torch.zeros(1, 3, dtype=F64), mask, t64([0.0]))
    assert "kl" not in m_none
    assert set(m_none) == {"clipfrac", "clipfrac_lower", "approx_kl", "entropy"}
    assert set(m) == {"clipfrac", "clipfrac_lower", "approx_kl", "entropy", "kl"}


def test_entropy_bonus():
    # l = -A - entropy_coef * H with ratio 1 (old absent); A = [1, -2] per token,
    # H = [0.5, 2.0], entropy_coef = 0.01, token-mean:
    #   loss = ((-1 - 0.005) + (2 - 0.02)) / 2 = 0.975 / 2.
    #   d loss / d H = -0.01 / 2 per token; d loss / d logp = -A r / 2 = [-1, 2] / 2.
    logp = t64([[-1.0, -2.0]]).requires_grad_()
    H = t64([[0.5, 2.0]]).requires_grad_()
    loss, m = token_policy_loss(logp, H, torch.ones(1, 2, dtype=F64), t64([[1.0, -2.0]]),
                                entropy_coef=0.01)
    close(loss, 0.975 / 2)
    g_logp, g_H = torch.autograd.grad(loss, (logp, H))
    close(g_H, [[-0.005, -0.005]])
    close(g_logp, [[-0.5, 1.0]])
    close(m["entropy"], 1.25)
    # entropy_coef = 0: H carries no gradient at all.
    loss, _ = token_policy_loss(logp, H, torch.ones(1, 2, dtype=F64), t64([[1.0, -2.0]]))
    close(loss, 0.5)
    g_H = torch.autograd.grad(loss, H, allow_unused=True)[0]
    assert g_H is None or torch.equal(g_H, torch.zeros_like(g_H))


# Aggregation case (RISKPO_SPEC.md section 8: verl 0.9.1's modes, TRL 1.16's loss
# types). ratio = 1 (old absent) and A = -L per token, so the per-token loss is
# l = max(L, L) = L, and for L > 0 (A < 0) the dual clip min(L, 3L) = L leaves it.
# B = 3, T = 4; 100 marks masked-out values.
#   row 0: L = [1, 2, 3, 100], m = [1, 1, 1, 0]  -> sum 6,  count 3
#   row 1: L = [4, 5, 100, 100], m = [1, 1, 0, 0] -> sum 9, count 2
#   row 2: all masked                             -> left out of verl's sequence means
# S = 2 sequences with a response token, B = 3 rows, L = T = 4.
# token-mean              = (6 + 9) / 5                        = 3
# token-sum               = 6 + 9                              = 15
# seq-mean-token-mean     = (6 / (3 + e) + 9 / (2 + e)) / 2    ~ 3.25   (e = 1e-8: verl's)
# seq-mean-token-sum      = (6 + 9) / 2                        = 7.5
# seq-mean-token-sum-norm = 7.5 / 4                            = 1.875
# trl-grpo                = (6 / 3 + 9 / 2 + 0 / 1) / 3        = 6.5 / 3 (all B rows)
# trl-dr-grpo             = (6 + 9) / (3 * 4)                  = 1.25
# weights w (loss = sum w l, and d loss / d logp = w * (-A r) = w * L).
VERL_EPS = 1e-8
L_AGG = [[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 100.0, 100.0], [100.0] * 4]
M_AGG = [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0] * 4]


def _rows(a, b):  # weights a on row 0's three tokens, b on row 1's two
    return [[a] * 3 + [0], [b] * 2 + [0, 0], [0] * 4]


AGG_EXPECTED = {
    "token-mean": (3.0, _rows(1 / 5, 1 / 5)),
    "token-sum": (15.0, _rows(1, 1)),
    "seq-mean-token-mean": ((6 / (3 + VERL_EPS) + 9 / (2 + VERL_EPS)) / 2,
                            _rows(1 / ((3 + VERL_EPS) * 2), 1 / ((2 + VERL_EPS) * 2))),
    "seq-mean-token-sum": (7.5, _rows(1 / 2, 1 / 2)),
    "seq-mean-token-sum-norm": (1.875, _rows(1 / 8, 1 / 8)),
    "trl-grpo": (6.5 / 3, _rows(1 / 9, 1 / 6)),
    "trl-dr-grpo": (1.25, _rows(1 / 12, 1 / 12)),
}


def test_aggregations_cover_every_mode():
    assert set(AGG_EXPECTED) == set(AGGREGATIONS)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_aggregation_hand_case_with_empty_row(agg):
    loss_exp, w_exp = AGG_EXPECTED[agg]
    L = t64(L_AGG)
    mask = t64(M_AGG)
    logp = torch.full((3, 4), -1.0, dtype=F64, requires_grad=True)
    H = torch.zeros(3, 4, dtype=F64)
    loss, m = token_policy_loss(logp, H, mask, -L, agg=agg)
    close(loss, loss_exp)
    close(aggregation_weights(mask, agg), w_exp)
    (g,) = torch.autograd.grad(loss, logp)
    close(g, t64(w_exp) * L)
    # Metrics do not depend on agg: clipfrac 0 (r = 1), approx_kl 0 (old = logp).
    close(m["clipfrac"], 0.0)
    close(m["clipfrac_lower"], 0.0)
    close(m["approx_kl"], 0.0)


def test_the_normalising_length_is_the_padded_one_or_the_scale_factor():
    # Same rows with 2 more padding columns: T = 6 -> seq-mean-token-sum-norm 7.5 / 6,
    # trl-dr-grpo 15 / (3 * 6); the other modes do not change. loss_scale_factor = 5
    # replaces T: 7.5 / 5 and 15 / (3 * 5).
    L = torch.cat([t64(L_AGG), torch.full((3, 2), 100.0, dtype=F64)], 1)
    mask = torch.cat([t64(M_AGG), torch.zeros(3, 2, dtype=F64)], 1)
    logp = torch.full((3, 6), -1.0, dtype=F64)
    H = torch.zeros(3, 6, dtype=F64)
    padded = {"seq-mean-token-sum-norm": 7.5 / 6, "trl-dr-grpo": 15 / 18}
    scaled = {"seq-mean-token-sum-norm": 7.5 / 5, "trl-dr-grpo": 15 / 15}
    for agg in AGGREGATIONS:
        loss, _ = token_policy_loss(logp, H, mask, -L, agg=agg)
        close(loss, padded.get(agg, AGG_EXPECTED[agg][0]))
    for agg, want in scaled.items():
        loss, _ = token_policy_loss(logp, H, mask, -L, agg=agg, loss_scale_factor=5)
        close(loss, want)


def test_loss_scale_factor_is_checked():
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1))
    with pytest.raises(ValueError, match="loss_scale_factor applies to seq-mean-token-sum-norm"):
        rk.policy_loss(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), *args[2:],
                       agg="token-mean", loss_scale_factor=4.0)
    for bad in (0.0, -1.0, float("nan"), "4"):
        with pytest.raises(ValueError, match="loss_scale_factor"):
            rk.policy_loss(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), *args[2:],
                           agg="seq-mean-token-sum-norm", loss_scale_factor=bad)


def test_unknown_aggregation_raises():
    with pytest.raises(ValueError, match="agg must be one of"):
        aggregation_weights(torch.ones(1, 2), "sum")
    with pytest.raises(ValueError):
        token_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1),
                          agg="seq-sum")


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_all_masked_batch_gives_zero_loss_metrics_and_gradient(agg):
    g = torch.Generator().manual_seed(1)
    B, T, V = 2, 3, 5
    logits = torch.randn(B, T, V, generator=g, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=F64)
    old = torch.randn(B, T, generator=g, dtype=F64) - 2
    ref = torch.randn(B, T, generator=g, dtype=F64) - 2
    A = torch.randn(B, generator=g, dtype=F64)
    loss, _, _, m = policy_loss_reference(logits, tokens, mask, A, old_logprobs=old,
                                          ref_logprobs=ref, kl_coef=0.1,
                                          entropy_coef=0.01, temperature=0.7, agg=agg)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert set(m) == {"clipfrac", "clipfrac_lower", "approx_kl", "entropy", "kl"}
    for k, v in m.items():
        assert v.item() == 0.0, k
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert torch.equal(aggregation_weights(mask, agg), torch.zeros(B, T, dtype=F64))


# Float mask (weights other than 0/1), same L as the aggregation case:
#   row 0: m = [0.5, 1, 2, 0]    -> sum(L m) = 0.5 + 2 + 6 = 8.5,  sum(m) = 3.5
#   row 1: m = [0.25, 0.25, 0, 0] -> sum(L m) = 1 + 1.25 = 2.25,   sum(m) = 0.5
#   row 2: m = 0                  -> left out of verl's sequence means (S = 2)
# trl-grpo divides each row by max(sum(m), 1), as TRL clamps the count.
M_FLOAT = [[0.5, 1.0, 2.0, 0.0], [0.25, 0.25, 0.0, 0.0], [0.0] * 4]
FLOAT_EXPECTED = {
    "token-mean": 10.75 / 4,
    "token-sum": 10.75,
    "seq-mean-token-mean": (8.5 / (3.5 + VERL_EPS) + 2.25 / (0.5 + VERL_EPS)) / 2,
    "seq-mean-token-sum": 10.75 / 2,
    "seq-mean-token-sum-norm": 10.75 / (2 * 4),
    "trl-grpo": (8.5 / 3.5 + 2.25 / 1) / 3,
    "trl-dr-grpo": 10.75 / (3 * 4),
}


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_float_mask_weights(agg):
    L = t64(L_AGG)
    mask = t64(M_FLOAT)
    logp = torch.full((3, 4), -1.0, dtype=F64, requires_grad=True)
    # entropy H = L / 10 so the weighted-mean metric is visible:
    # mean_m(H) = sum(H m) / sum(m) = 1.075 / 4.
    H = L / 10
    loss, m = token_policy_loss(logp, H, mask, -L, agg=agg)
    close(loss, FLOAT_EXPECTED[agg])
    (g,) = torch.autograd.grad(loss, logp)
    close(g, aggregation_weights(mask, agg) * L)
    close(m["entropy"], 1.075 / 4)


def test_float_mask_metrics_when_mask_sums_below_one():
    # m = [0.25, 0.25], H = [1, 3], old - logp = [0.2, 0.4]:
    #   mean_m(H) = (0.25 + 0.75) / 0.5 = 2; mean_m(old - logp) = (0.05 + 0.1) / 0.5 = 0.3.
    #   token-mean loss (A = 0) is 0; the loss itself is normalised correctly.
    logp = t64([[-1.0, -2.0]])
    old = logp + t64([[0.2, 0.4]])
    _, m = token_policy_loss(logp, t64([[1.0, 3.0]]), t64([[0.25, 0.25]]), t64([0.0]),
                             old_logprobs=old)
    close(m["entropy"], 2.0)
    close(m["approx_kl"], 0.3)


def test_bool_mask_matches_float64_mask_to_float32_precision():
    # A bool mask gives float32 weights (the normaliser 1/count is rounded to float32), so
    # float64 losses agree with the float64-mask result only to ~1e-7 relative.
    g = torch.Generator().manual_seed(5)
    logp = torch.randn(3, 5, generator=g, dtype=F64) - 2
    old = logp + 0.3 * torch.randn(3, 5, generator=g, dtype=F64)
    A = torch.randn(3, 5, generator=g, dtype=F64)
    mb = torch.rand(3, 5, generator=g) < 0.7
    for agg in AGGREGATIONS:
        lb, mbm = token_policy_loss(logp, logp.neg(), mb, A, old, agg=agg)
        lf, mfm = token_policy_loss(logp, logp.neg(), mb.to(F64), A, old, agg=agg)
        close(lb, lf, rtol=1e-6, atol=1e-9)
        for k in mfm:
            close(mbm[k], mfm[k])


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_per_sequence_and_broadcast_per_token_advantages_agree(agg):
    g = torch.Generator().manual_seed(2)
    B, T = 3, 5
    logp0 = torch.randn(B, T, generator=g, dtype=F64) - 2
    old = logp0 + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    ref = logp0 + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    H0 = torch.rand(B, T, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(F64)
    mask[1] = 0
    A = t64([1.5, -0.7, -2.0])
    outs = []
    for adv in (A, A[:, None].expand(B, T).clone()):
        logp = logp0.clone().requires_grad_()
        H = H0.clone().requires_grad_()
        loss, m = token_policy_loss(logp, H, mask, adv, old, ref, kl_coef=0.05, entropy_coef=0.01,
                                    agg=agg)
        outs.append((loss, *torch.autograd.grad(loss, (logp, H)), m))
    (l1, gl1, gh1, m1), (l2, gl2, gh2, m2) = outs
    assert torch.equal(l1, l2)
    assert torch.equal(gl1, gl2) and torch.equal(gh1, gh2)
    assert m1.keys() == m2.keys()
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k


def test_full_pipeline_hand_case_v3_temperature_2():
    # policy_loss_reference end to end. B = 1, T = 2, V = 3, temperature 2,
    # A = 2 (per sequence), clip 0.2, kl_coef 0.1, entropy_coef 0.01, token-mean.
    # Token 0: logits [0, 2 ln 2, 2 ln 3], y = 2: p = [1, 2, 3] / 6, logp = ln(1/2),
    #   H0 = entropy([1/6, 1/3, 1/2]).
    #   old = logp - ln 1.5 -> r = 1.5 > 1.2, A > 0: l = -2 * 1.2 = -2.4, d/dlogp = 0.
    #   ref = logp + ln 2 -> kl = 1 - ln 2, d kl/d logp = 1 - 2 = -1.
    # Token 1: logits [0, 0, 2] -> z = [0, 0, 1], y = 0: p = [1, 1, e] / (2 + e),
    #   logp = -ln(2 + e), H1 = ln(2 + e) - e / (2 + e).
    #   old = logp - ln 1.1 -> r = 1.1 inside: l = -2.2, d/dlogp = -A r = -2.2.
    #   ref = logp - ln 2 -> kl = ln 2 - 1/2, d kl/d logp = 1 - 1/2 = 1/2.
    # loss = mean over the two tokens of l + 0.1 kl - 0.01 H.
    # d loss/d logits = dL/dlogp (onehot_y - p) / T + dL/dH (-p (log p + H)) / T, with
    #   dL/dlogp0 = 0.1 * -1 / 2, dL/dlogp1 = (-2.2 + 0.05) / 2, dL/dH = -0.01 / 2.
    logits = t64([[[0.0, 2 * LN2, 2 * LN3], [0.0, 0.0, 2.0]]]).requires_grad_()
    tokens = torch.tensor([[2, 0]])
    lp = [math.log(0.5), -math.log(2 + E)]
    p0 = [1 / 6, 2 / 6, 3 / 6]
    p1 = [1 / (2 + E), 1 / (2 + E), E / (2 + E)]
    H0, H1 = entropy_of(p0), math.log(2 + E) - E / (2 + E)
    old = t64([[lp[0] - math.log(1.5), lp[1] - math.log(1.1)]])
    ref = t64([[lp[0] + LN2, lp[1] - LN2]])
    mask = torch.ones(1, 2, dtype=F64)
    loss, logp, H, m = policy_loss_reference(logits, tokens, mask, t64([2.0]), old_logprobs=old,
                                             ref_logprobs=ref, kl_coef=0.1,
                                             entropy_coef=0.01, temperature=2.0)
    close(logp, [lp])
    close(H, [[H0, H1]])
    kl0, kl1 = 1 - LN2, LN2 - 0.5
    close(loss, ((-2.4 + 0.1 * kl0 - 0.01 * H0) + (-2.2 + 0.1 * kl1 - 0.01 * H1)) / 2)
    close(m["clipfrac"], 0.5)
    close(m["clipfrac_lower"], 0.0)
    close(m["approx_kl"], -(math.log(1.5) + math.log(1.1)) / 2)
    close(m["entropy"], (H0 + H1) / 2)
    close(m["kl"], (kl0 + kl1) / 2)

    (g,) = torch.autograd.grad(loss, logits)
    dlogp = [0.1 * -1 / 2, (-2.2 + 0.05) / 2]
    dH = -0.01 / 2
    expected = []
    for p, y, H_, dl in ((p0, 2, H0, dlogp[0]), (p1, 0, H1, dlogp[1])):
        expected.append([(dl * ((i == y) - pi) + dH * (-pi * (math.log(pi) + H_))) / 2.0
                         for i, pi in enumerate(p)])
    close(g, [expected])


# --------------------------------------------------------------------------------------
# 2. Metrics on random inputs, against their definitions
# --------------------------------------------------------------------------------------


def test_metrics_match_definitions_random():
    g = torch.Generator().manual_seed(3)
    B, T = 4, 7
    logp = torch.randn(B, T, generator=g, dtype=F64) - 2
    old = logp + torch.randn(B, T, generator=g, dtype=F64)  # ratios from ~e^-2 to ~e^2
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    H = torch.rand(B, T, generator=g, dtype=F64) * 3
    A = torch.randn(B, T, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) < 0.6).to(F64) * torch.rand(B, T, generator=g, dtype=F64)
    mask[2] = 0
    assert mask.sum() > 1
    _, m = token_policy_loss(logp, H, mask, A, old, ref, clip_low=0.15, clip_high=0.25,
                             clip_ratio_c=2.5)
    r = torch.exp(logp - old)
    l1 = -A * r
    l2 = -A * r.clamp(0.85, 1.25)
    mx = torch.maximum(l1, l2)

    def mean_m(x):
        return (x * mask).sum() / mask.sum()

    close(m["clipfrac"], mean_m((l2 > l1).to(F64)))
    close(m["clipfrac_lower"], mean_m(((mx > -A * 2.5) & (A < 0)).to(F64)))
    close(m["approx_kl"], mean_m(old - logp))
    close(m["entropy"], mean_m(H))
    d = ref - logp
    close(m["kl"], mean_m(d.exp() - d - 1))
    # Both clip fractions are non-trivial on these inputs, so the check can fail.
    assert 0 < m["clipfrac"] < 1 and 0 < m["clipfrac_lower"] < 1
    # Metrics are detached.
    assert all(not v.requires_grad for v in m.values())


# --------------------------------------------------------------------------------------
# 3. gradcheck in float64
# --------------------------------------------------------------------------------------

# ratios away from every non-differentiable point (0.8, 1.2, and c = 3 with A < 0).
SAFE_RATIOS = [0.5, 0.9, 1.1, 1.5, 2.0, 5.0, 0.7, 1.05, 1.4, 4.0, 0.95, 2.5]


def _random_problem(seed, B=3, T=4, V=6):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = t64([[1.0, 1.0, 0.5, 0.0], [0.0] * 4, [1.0, 0.0, 1.0, 2.0]])[:B, :T]
    # |A| in [0.3, 1.3], both signs.
    A = (torch.rand(B, generator=g, dtype=F64) + 0.3) * t64([1.0, -1.0, -1.0])[:B]
    logp, _ = logprobs_and_entropy_reference(logits.reshape(B * T, V), tokens.reshape(B * T), 0.7)
    r = t64(SAFE_RATIOS[: B * T]).view(B, T)
    old = logp.view(B, T) - r.log()
    ref = logp.view(B, T) + 0.4 * torch.randn(B, T, generator=g, dtype=F64)
    return logits, tokens, mask, A, old, ref


@pytest.mark.parametrize("with_ref", [False, True], ids=["no_ref", "ref"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_gradcheck_policy_loss_reference_wrt_logits(agg, with_ref):
    logits, tokens, mask, A, old, ref = _random_problem(10)

    def f(x):
        loss, *_ = policy_loss_reference(x, tokens, mask, A, old_logprobs=old,
                                         ref_logprobs=ref if with_ref else None, kl_coef=0.2,
                                         entropy_coef=0.05, temperature=0.7, agg=agg)
        return loss

    # The problem is non-trivial: the PPO term contributes to the gradient.
    x = logits.clone().requires_grad_()
    assert torch.autograd.grad(f(x), x)[0].abs().max() > 1e-3
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("with_ref", [False, True], ids=["no_ref", "ref"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_gradcheck_token_policy_loss_wrt_logprobs_and_entropy(agg, with_ref):
    g = torch.Generator().manual_seed(11)
    B, T = 3, 4
    logp = (torch.randn(B, T, generator=g, dtype=F64) - 2).requires_grad_()
    H = torch.rand(B, T, generator=g, dtype=F64).requires_grad_()
    old = logp.detach() - t64(SAFE_RATIOS).view(B, T).log()
    ref = logp.detach() + 0.4 * torch.randn(B, T, generator=g, dtype=F64)
    mask = t64([[1.0, 1.0, 0.5, 0.0], [0.0] * 4, [1.0, 0.0, 1.0, 2.0]])
    A = torch.randn(B, T, generator=g, dtype=F64)
    A = A.sign() * (A.abs() + 0.3)

    def f(lp, h):
        loss, _ = token_policy_loss(lp, h, mask, A, old, ref if with_ref else None, kl_coef=0.2,
                                    entropy_coef=0.05, agg=agg)
        return loss

    assert torch.autograd.gradcheck(f, (logp, H), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_absent_old_logprobs_is_logp_detached(agg):
    # Without old log-probs the ratio is exactly 1 yet the gradient is the policy
    # gradient -A w d logp (gradcheck cannot see it: old moves with logp). It must equal
    # the result with old = logp.detach() passed explicitly (covered by gradcheck above).
    logits, tokens, mask, A, _, ref = _random_problem(12)
    outs = []
    for explicit in (False, True):
        x = logits.clone().requires_grad_()
        if explicit:
            with torch.no_grad():
                B, T, V = x.shape
                lp, _ = logprobs_and_entropy_reference(x.reshape(B * T, V), tokens.reshape(-1), 0.7)
            old = lp.view(B, T)
        else:
            old = None
        loss, logp, H, m = policy_loss_reference(x, tokens, mask, A, old_logprobs=old,
                                                 ref_logprobs=ref, kl_coef=0.2, entropy_coef=0.05,
                                                 temperature=0.7, agg=agg)
        outs.append((loss, torch.autograd.grad(loss, x)[0], m, logp.detach(), H.detach()))
    (l0, g0, m0, logp, H), (l1, g1, m1, _, _) = outs
    close(l0, l1)
    close(g0, g1)
    for k in m0:
        close(m0[k], m1[k])
    assert m0["clipfrac"] == 0 and m0["approx_kl"] == 0
    # Value: sum w (-A + 0.2 kl - 0.05 H).
    w = aggregation_weights(mask, agg)
    d = ref - logp
    close(l0, (w * (-A[:, None] + 0.2 * (d.exp() - d - 1) - 0.05 * H)).sum())


# --------------------------------------------------------------------------------------
# 4. Vocabulary gradient against the closed form
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_vocab_gradient_closed_form(temperature):
    # z = x / T, p = softmax(z):
    #   d logp_y / d x = (onehot_y - p) / T
    #   d H / d x = -p (log p + H) / T      (H = -sum p log p)
    g = torch.Generator().manual_seed(4)
    N, V = 5, 7
    x = (3 * torch.randn(N, V, generator=g, dtype=F64)).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g)
    logp, H = logprobs_and_entropy_reference(x, y, temperature)
    # rows are independent, so the gradient of the sum is the per-row Jacobian row.
    (g_logp,) = torch.autograd.grad(logp.sum(), x, retain_graph=True)
    (g_H,) = torch.autograd.grad(H.sum(), x)
    with torch.no_grad():
        p = torch.softmax(x / temperature, -1)
        onehot = torch.nn.functional.one_hot(y, V).to(F64)
        close(g_logp, (onehot - p) / temperature)
        close(g_H, -p * (p.log() + H[:, None]) / temperature)
        close(logp, p.gather(1, y[:, None]).squeeze(1).log())
        close(H, -(p * p.log()).sum(-1))


# --------------------------------------------------------------------------------------
# 5. NaN handling
# --------------------------------------------------------------------------------------


def _nan_problem():
    g = torch.Generator().manual_seed(6)
    B, T, V = 2, 4, 5
    logits = torch.randn(B, T, V, generator=g, dtype=F64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = t64([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    old = torch.randn(B, T, generator=g, dtype=F64) - 1.5
    ref = torch.randn(B, T, generator=g, dtype=F64) - 1.5
    A = t64([0.8, -1.2])
    return logits, tokens, mask, A, old, ref


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_nan_logit_at_masked_position_is_ignored(agg):
    logits, tokens, mask, A, old, ref = _nan_problem()
    kw = dict(old_logprobs=old, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, agg=agg)
    x_clean = logits.clone().requires_grad_()
    loss_c, _, _, m_c = policy_loss_reference(x_clean, tokens, mask, A, **kw)
    (g_c,) = torch.autograd.grad(loss_c, x_clean)
    bad = logits.clone()
    bad[0, 3, 2] = float("nan")   # masked-out padding token
    bad[1, 2, :] = float("nan")   # a whole masked-out row of logits
    x_bad = bad.clone().requires_grad_()
    loss_b, logp_b, _, m_b = policy_loss_reference(x_bad, tokens, mask, A, **kw)
    assert torch.isnan(logp_b[0, 3])  # the NaN did reach the per-token value...
    assert torch.equal(loss_b, loss_c)  # ...but not the loss
    assert m_b.keys() == m_c.keys()
    for k in m_c:
        assert torch.equal(m_b[k], m_c[k]), k
    (g_b,) = torch.autograd.grad(loss_b, x_bad)
    valid = mask.bool()
    assert torch.equal(g_b[valid], g_c[valid])


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_nan_logit_at_response_token_propagates(agg):
    logits, tokens, mask, A, old, ref = _nan_problem()
    logits[1, 1, 0] = float("nan")  # mask[1, 1] = 1
    loss, _, _, m = policy_loss_reference(logits, tokens, mask, A, old_logprobs=old,
                                          ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.01, agg=agg)
    assert torch.isnan(loss)
    assert torch.isnan(m["entropy"]) and torch.isnan(m["approx_kl"]) and torch.isnan(m["kl"])


def test_nan_in_masked_logprob_and_advantage_ignored_by_token_loss():
    # The same at the token level: NaN logprob, entropy, old, ref and per-token A at a padded
    # position leave loss, gradient and metrics untouched.
    logp0 = t64([[-1.0, -2.0, -0.5]])
    A = t64([[1.0, -1.0, 0.5]])
    H = t64([[0.3, 0.2, 0.1]])
    old = logp0 - t64([[math.log(1.1), math.log(0.5), 0.0]])
    ref = logp0 + 0.1
    mask = t64([[1.0, 1.0, 0.0]])
    nan = float("nan")
    res = []
    for poison in (False, True):
        lp = logp0.clone()
        a, h, o, rf = A.clone(), H.clone(), old.clone(), ref.clone()
        if poison:
            for t in (lp, a, h, o, rf):
                t[0, 2] = nan
        lp.requires_grad_()
        loss, m = token_policy_loss(lp, h, mask, a, o, rf, kl_coef=0.1, entropy_coef=0.01)
        res.append((loss, torch.autograd.grad(loss, lp)[0][mask.bool()], m))
    (l0, g0, m0), (l1, g1, m1) = res
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    for k in m0:
        assert torch.equal(m0[k], m1[k]), k


# --------------------------------------------------------------------------------------
# 6. verl's compute_policy_loss, re-stated independently
# --------------------------------------------------------------------------------------


def verl_compute_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange_low,
                             cliprange_high, clip_ratio_c, loss_agg_mode):
    """verl.trainer.ppo.core_algos.compute_policy_loss (vanilla, dual clip), with the
    aggregation written as RISKPO_SPEC.md section 8 states it (verl 0.9.1, TRL 1.16)."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)

    m = response_mask

    def masked_mean(x):
        return (x * m).sum() / m.sum()

    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float())
    pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3).float()
                                    * (advantages < 0).float())
    ppo_kl = masked_mean(-negative_approx_kl)

    # verl 0.9.1's agg_loss (fully masked rows left out of the sequence means),
    # then TRL 1.16's grpo and dr_grpo (every row counted).
    seq_sum = (pg_losses * m).sum(-1)
    seq_cnt = m.sum(-1)
    kept = seq_cnt > 0
    if loss_agg_mode == "token-mean":
        loss = masked_mean(pg_losses)
    elif loss_agg_mode == "token-sum":
        loss = seq_sum.sum()
    elif loss_agg_mode == "seq-mean-token-mean":
        loss = (seq_sum / (seq_cnt + 1e-8))[kept].mean()
    elif loss_agg_mode == "seq-mean-token-sum":
        loss = seq_sum[kept].mean()
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        loss = seq_sum[kept].mean() / m.shape[-1]
    elif loss_agg_mode == "trl-grpo":
        loss = (seq_sum / seq_cnt.clamp(min=1.0)).mean()
    elif loss_agg_mode == "trl-dr-grpo":
        loss = seq_sum.sum() / (m.shape[0] * m.shape[-1])
    else:
        raise ValueError(loss_agg_mode)
    return loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


@pytest.mark.parametrize("adv_per_token", [False, True], ids=["A_seq", "A_token"])
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_matches_verl_compute_policy_loss(agg, adv_per_token):
    g = torch.Generator().manual_seed(7)
    B, T = 5, 8
    logp0 = torch.randn(B, T, generator=g, dtype=F64) - 2
    old = logp0 + 0.8 * torch.randn(B, T, generator=g, dtype=F64)
    old[0, 0] = logp0[0, 0] - 25.0  # log-ratio clamp at +20
    old[3, 1] = logp0[3, 1] + 25.0  # and at -20
    A = torch.randn(B, T, generator=g, dtype=F64) if adv_per_token \
        else torch.randn(B, generator=g, dtype=F64)
    A_full = A if adv_per_token else A[:, None].expand(B, T)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(F64)
    mask[2] = 0  # an empty row
    mask[0, 0] = mask[3, 1] = 1
    kw = dict(cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0, loss_agg_mode=agg)

    lp_v = logp0.clone().requires_grad_()
    loss_v, cf_v, _, cfl_v = verl_compute_policy_loss(old, lp_v, A_full, mask, **kw)
    (g_v,) = torch.autograd.grad(loss_v, lp_v)

    lp = logp0.clone().requires_grad_()
    H = torch.zeros(B, T, dtype=F64)
    loss, m = token_policy_loss(lp, H, mask, A, old, clip_low=0.2, clip_high=0.28,
                                clip_ratio_c=3.0, agg=agg)
    (g_r,) = torch.autograd.grad(loss, lp)

    close(loss, loss_v)
    close(g_r, g_v)
    close(m["clipfrac"], cf_v)
    close(m["clipfrac_lower"], cfl_v)
    # The inputs exercise both clips.
    assert 0 < cf_v < 1 and 0 < cfl_v < 1


def test_approx_kl_matches_verl_ppo_kl_within_clamp():
    # verl logs ppo_kl = mean_m(-clamp(logp - old, -20, 20)); the spec's approx_kl is
    # mean_m(old - logp). They agree whenever |logp - old| <= 20.
    g = torch.Generator().manual_seed(8)
    B, T = 4, 6
    logp = torch.randn(B, T, generator=g, dtype=F64) - 2
    old = logp + torch.randn(B, T, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) < 0.7).to(F64)
    A = torch.randn(B, generator=g, dtype=F64)
    _, _, ppo_kl, _ = verl_compute_policy_loss(old, logp, A[:, None].expand(B, T), mask, 0.2, 0.2,
                                               3.0, "token-mean")
    _, m = token_policy_loss(logp, torch.zeros(B, T, dtype=F64), mask, A, old)
    close(m["approx_kl"], ppo_kl)
