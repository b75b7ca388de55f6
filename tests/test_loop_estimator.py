"""The loop estimator (the public estimator's structure) and the vectorised
reference share no code path: agreement between them checks both."""

from __future__ import annotations

import itertools

import pytest
import torch

import riskpo_kernels as rk
from riskpo_kernels.risk_core import CREDITS, QUANTILE_MODES
from riskpo_kernels.risk_core.loop_estimator import mvar_advantages_loop, mvar_advantages_loop_flat

from conftest import make_rewards


@pytest.mark.parametrize("credit", CREDITS)
@pytest.mark.parametrize("quantile_mode", QUANTILE_MODES)
def test_loop_estimator_matches_vectorised_reference(credit, quantile_mode):
    g = torch.Generator().manual_seed(len(credit) * 7 + len(quantile_mode))
    for (P, n, Q), kind, natural, normalize, w_high in itertools.product(
            [(13, 5, 5), (7, 2, 3), (4, 1, 5), (6, 3, 1)], ("binary", "continuous"),
            (True, False), (True, False), (0.0, 0.7)):
        rewards = make_rewards(kind, P, n, g, torch.float64)
        kwargs = dict(bundle_size=Q, w_high=w_high, quantile_mode=quantile_mode, q_lo=0.3,
                      q_hi=2.1, credit=credit, normalize_std=normalize, natural_baseline=natural,
                      base_mid=0.1, base_low=-0.05)
        loop = mvar_advantages_loop_flat(rewards, n, **kwargs)
        vectorised = rk.mvar_advantages(rewards, group_size=n, impl="reference", **kwargs)
        torch.testing.assert_close(loop, vectorised.advantages, rtol=1e-10, atol=1e-10)


def test_loop_estimator_takes_uids_in_any_layout():
    # Sample-major order with string uids: the same advantages, permuted.
    g = torch.Generator().manual_seed(0)
    rewards = make_rewards("ternary", 6, 4, g, torch.float64).view(6, 4)
    uids = [f"prompt-{p}" for p in range(6)]
    sample_major = rewards.t().reshape(-1)
    index = [uids[i % 6] for i in range(24)]
    got = mvar_advantages_loop(sample_major, index, bundle_size=4, credit="sum-mean")
    want = rk.mvar_advantages(rewards, bundle_size=4, credit="sum-mean", impl="reference")
    torch.testing.assert_close(got.view(4, 6).t().reshape(-1), want.advantages, rtol=1e-12, atol=1e-12)
