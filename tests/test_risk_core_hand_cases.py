"""Hand-computed cases from RISKPO_SPEC.md sections 3-7.

Each expected value is worked out in the comments from the spec's formulas;
they test the reference itself, and every compiled implementation as well.
"""

from __future__ import annotations

import math

import pytest
import torch

import riskpo_kernels as rk

EPS = 1e-6
IMPLS = ["reference", "cpp", "cuda"]


@pytest.fixture(params=IMPLS)
def impl(request):
    if request.param == "cuda":
        request.getfixturevalue("cuda_device")
    elif request.param == "cpp":
        request.getfixturevalue("cpp_available")
    return request.param


def run(impl, rewards, **kwargs):
    r = torch.tensor(rewards, dtype=torch.float64)
    if impl == "cuda":
        r = r.cuda()
    res = rk.mvar_advantages(r, impl=impl, **kwargs)
    return [t.cpu() for t in (res.advantages, res.bundle_scores, res.q_lo, res.q_hi)]


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_defaults_one_prompt_per_bundle(impl):
    # Q=1, n=4, r=[0,1,1,0]. Sorted scores [0,0,1,1]:
    #   q_lo at rank 0.2*3=0.6 -> 0, q_hi at rank 0.8*3=2.4 -> 1; c = q_lo - q_hi = -1.
    # S=0: g_mid = 0 - 0 - 1 = -1 -> -1/(0.6+eps); g_low = 0.  A = g_mid / 2.5.
    # S=1: g_mid = 1 - 0 - 1 = 0; g_low = 0 -> A = 0.
    # sd of [0,1,1,0] (n-1) = sqrt(1/3); A /= sd + eps.
    adv, scores, q_lo, q_hi = run(impl, [0, 1, 1, 0], group_size=4, bundle_size=1)
    k = -1 / (0.6 + EPS) / 2.5 / (math.sqrt(1 / 3) + EPS)
    close(adv, [k, 0, 0, k])
    close(scores, [[0, 1, 1, 0]])
    close(q_lo, [0.0])
    close(q_hi, [1.0])


# Q=2, n=3, rewards p0=[1,0,2], p1=[0.5,0.5,1]; alpha=.25, beta=.75, w_low=w_high=1,
# natural baseline off. S = [1.5, 0.5, 3], sorted [0.5, 1.5, 3]:
#   q_lo: rank 0.5 -> 0.5 + 0.5*1.0 = 1.0;  q_hi: rank 1.5 -> 1.5 + 0.5*1.5 = 2.25.
# S=1.5: g_mid = 0.5/(0.5+eps), g_low = 0, g_high = 0
# S=0.5: g_mid = 0, g_low = -0.5/(0.25+eps), g_high = 0
# S=3:   g_mid = (2 - 0.75)/(0.5+eps), g_low = 0, g_high = 0.75/(0.25+eps)
# A = (g_mid + g_low + g_high) / 3.
CASE_B = dict(group_size=3, bundle_size=2, alpha=0.25, beta=0.75, w_low=1.0, w_high=1.0,
              natural_baseline=False)
REWARDS_B = [1, 0, 2, 0.5, 0.5, 1]
A0 = 0.5 / (0.5 + EPS) / 3
A1 = -0.5 / (0.25 + EPS) / 3
A2 = (1.25 / (0.5 + EPS) + 0.75 / (0.25 + EPS)) / 3


def test_three_terms_uniform_credit_no_normalisation(impl):
    adv, scores, q_lo, q_hi = run(impl, REWARDS_B, normalize_std=False, credit="uniform", **CASE_B)
    close(adv, [A0, A1, A2, A0, A1, A2])
    close(scores, [[1.5, 0.5, 3.0]])
    close(q_lo, [1.0])
    close(q_hi, [2.25])


def test_bundle_std_normalisation(impl):
    # sd of S = [1.5, 0.5, 3]: mean 5/3, squares (1/36 + 49/36 + 64/36) / 2 = 57/36.
    adv, *_ = run(impl, REWARDS_B, normalize_std=True, credit="uniform", **CASE_B)
    sd = math.sqrt(57) / 6 + EPS
    close(adv, [A0 / sd, A1 / sd, A2 / sd, A0 / sd, A1 / sd, A2 / sd])


def test_score_credit(impl):
    # r > 0 -> A/2, else 3A/2. Only p0's second sample (r = 0) is not positive.
    adv, *_ = run(impl, REWARDS_B, normalize_std=False, credit="score", **CASE_B)
    close(adv, [0.5 * A0, 1.5 * A1, 0.5 * A2, 0.5 * A0, 0.5 * A1, 0.5 * A2])


def test_std_credit(impl):
    # sd(p0) = sd([1,0,2]) = 1; sd(p1) = sd([.5,.5,1]) = sqrt(1/12).
    adv, *_ = run(impl, REWARDS_B, normalize_std=False, credit="std", **CASE_B)
    s0, s1 = 1 + EPS, math.sqrt(1 / 12) + EPS
    close(adv, [A0 / s0, A1 / s0, A2 / s0, A0 / s1, A1 / s1, A2 / s1])


def test_sum_mean_credit(impl):
    # d(p0) = r - 1 = [0, -1, 1]; d(p1) = r - 2/3 = [-1/6, -1/6, 1/3]; D = [-1/6, -7/6, 4/3].
    # Each response gets A * d / D.
    adv, *_ = run(impl, REWARDS_B, normalize_std=False, credit="sum-mean", **CASE_B)
    close(adv, [0.0, A1 * 6 / 7, A2 * 3 / 4, A0, A1 / 7, A2 / 4])


def test_partial_last_bundle(impl):
    # P=3, Q=2, n=2: bundles {p0=[1,0], p1=[1,1]} and {p2=[0,1]} (one prompt).
    # Bundle 0: S=[2,1], q_lo = 1.2, q_hi = 1.8, c = -0.6.
    #   S=2: g_mid = 0.8 - 0.2 - 0.6 = 0, g_low = 0 -> 0.
    #   S=1: g_mid = -0.6/(0.6+eps), g_low = -0.2/(0.2+eps) -> A = (g_mid + 1.5 g_low)/2.5.
    #   sum-mean: d(p0) = [.5,-.5], d(p1) = [0,0]: paper 1 goes to p0 alone.
    # Bundle 1: S=[0,1], q_lo = .2, q_hi = .8: same A for S=0, 0 for S=1; D = d(p2).
    adv, scores, q_lo, q_hi = run(impl, [1, 0, 1, 1, 0, 1], group_size=2, bundle_size=2,
                                  normalize_std=False, credit="sum-mean")
    a = (-0.6 / (0.6 + EPS) + 1.5 * (-0.2 / (0.2 + EPS))) / 2.5
    torch.testing.assert_close(adv, torch.tensor([0, a, 0, 0, a, 0], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    close(scores, [[2, 1], [0, 1]])
    close(q_lo, [1.2, 0.2])
    close(q_hi, [1.8, 0.8])


def test_std_floor_fix_in_track_mode_and_sum_mean_even_split(impl):
    # p0=[1,0], p1=[0,1]: S = [1,1], every paper scores the same, sd = 0 -> 1 (the fix;
    # the public estimator divided by 1e-6 here). Track q_lo=.5, q_hi=2: c = -1.5,
    # g_mid = 0.5 - 0 - 1.5 = -1 -> -1/(0.6+eps), g_low = 0, A = g_mid/2.5/(1+eps).
    # sum-mean: D = 0 for both papers -> A / Qb = A / 2 for each response.
    adv, _, q_lo, q_hi = run(impl, [1, 0, 0, 1], group_size=2, bundle_size=2,
                             quantile_mode="track", q_lo=0.5, q_hi=2.0, credit="sum-mean")
    a = -1 / (0.6 + EPS) / 2.5 / (1 + EPS) / 2
    close(adv, [a, a, a, a])
    close(q_lo, [0.5])
    close(q_hi, [2.0])
    assert adv.abs().max() < 1  # not ~1e5


def test_mix_mode_averages_tracked_and_batch(impl):
    # r=[0,1,1,0]: batch (0, 1), tracked (.4, .6) -> mix (.2, .8), c = -.6.
    # S=0: g_mid = -0.6/(0.6+eps), g_low = -0.2/(0.2+eps); S=1: 0.8 - 0.2 - 0.6 = 0.
    adv, _, q_lo, q_hi = run(impl, [0, 1, 1, 0], group_size=4, bundle_size=1,
                             quantile_mode="mix", q_lo=0.4, q_hi=0.6, normalize_std=False)
    a = (-0.6 / (0.6 + EPS) + 1.5 * (-0.2 / (0.2 + EPS))) / 2.5
    torch.testing.assert_close(adv, torch.tensor([a, 0, 0, a], dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    close(q_lo, [0.2])
    close(q_hi, [0.8])


def test_one_sample_per_prompt(impl):
    # n=1: the quantiles equal the single score, sd = 1. Track (1, 4), natural off:
    # S=5 in both bundles (2+3 and 5): g_mid = (4 - 1)/(0.6+eps), g_low = 0.
    adv, scores, *_ = run(impl, [2, 3, 5], group_size=1, bundle_size=2, quantile_mode="track",
                          q_lo=1.0, q_hi=4.0, natural_baseline=False)
    a = 3 / (0.6 + EPS) / 2.5 / (1 + EPS)
    close(adv, [a, a, a])
    close(scores, [[5.0], [5.0]])
    # Batch mode with n=1: q_lo = q_hi = S, so every term vanishes.
    adv, _, q_lo, q_hi = run(impl, [2, 3, 5], group_size=1, bundle_size=2)
    close(adv, [0.0, 0.0, 0.0])
    close(q_lo, [5.0, 5.0])
    close(q_hi, [5.0, 5.0])


def test_mean_baselines_shift_both_terms(impl):
    # r=[0,1,1,0], q=(0,1), c=-1, base_mid=.1, base_low=-.2, no normalisation:
    # S=0: g_mid = (-1 - .1)/(.6+eps), g_low = (0 + .2)/(.2+eps)
    # S=1: g_mid = (0 - .1)/(.6+eps),  g_low = (0 + .2)/(.2+eps)
    adv, *_ = run(impl, [0, 1, 1, 0], group_size=4, bundle_size=1, base_mid=0.1, base_low=-0.2,
                  normalize_std=False)
    low = 1.5 * 0.2 / (0.2 + EPS)
    a0 = (-1.1 / (0.6 + EPS) + low) / 2.5
    a1 = (-0.1 / (0.6 + EPS) + low) / 2.5
    close(adv, [a0, a1, a1, a0])


def test_track_without_values_falls_back_to_batch(impl):
    r = [0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0]
    batch = run(impl, r, group_size=4, bundle_size=2)
    for mode in ("track", "mix"):
        for a, b in zip(run(impl, r, group_size=4, bundle_size=2, quantile_mode=mode), batch):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def run_grpo(impl, rewards, **kwargs):
    r = torch.tensor(rewards, dtype=torch.float64)
    if impl == "cuda":
        r = r.cuda()
    return rk.grpo_advantages(r, impl=impl, **kwargs).cpu()


def test_grpo(impl):
    # [1,0,0,1]: mean .5, sd sqrt(1/3) -> +-.5/(sd+eps). A group of one: mean 0, sd 1.
    k = 0.5 / (math.sqrt(1 / 3) + EPS)
    close(run_grpo(impl, [1, 0, 0, 1], group_size=4), [k, -k, -k, k])
    close(run_grpo(impl, [1, 0, 0, 1], group_size=4, normalize_std=False), [0.5, -0.5, -0.5, 0.5])
    close(run_grpo(impl, [3.0, -2.0], group_size=1), [3 / (1 + EPS), -2 / (1 + EPS)])
    close(run_grpo(impl, [3.0, -2.0], group_size=1, normalize_std=False), [3.0, -2.0])
    # All equal: centred values are exactly 0, so 0 / eps = 0.
    close(run_grpo(impl, [1, 1, 1], group_size=3), [0.0, 0.0, 0.0])
