"""QuantileTracker (RISKPO_SPEC.md section 6): hand-computed steps and state."""

from __future__ import annotations

import pytest
import torch

import riskpo_kernels as rk


def tensor(values):
    return torch.tensor(values, dtype=torch.float64)


def test_first_update_takes_quantiles_then_sgd_steps():
    tracker = rk.QuantileTracker(lr=0.5, levels=[0.25, 0.5, 0.75])
    assert not tracker.initialized and tracker.value(0.5) is None
    # Linear quantiles of [0..4] at .25/.5/.75: ranks 1, 2, 3.
    tracker.update(tensor([4, 0, 3, 1, 2]))  # order does not matter
    torch.testing.assert_close(tracker.values, tensor([1, 2, 3]))
    first_lo = tracker.value(0.25)
    # Second step, S=[0,0,0,10]: mean(S < v) = 3/4 for every v in (0, 10].
    # v = [1 + .5(.25-.75), 2 + .5(.5-.75), 3 + .5(.75-.75)] = [.75, 1.875, 3].
    tracker.update(tensor([0, 0, 0, 10]))
    torch.testing.assert_close(tracker.values, tensor([0.75, 1.875, 3.0]))
    assert tracker.steps == 2
    assert first_lo.item() == 1.0  # values handed out earlier are never updated in place
    # Nearest grid level: .2 -> .25, .8 -> .75, .6 -> .5.
    assert tracker.value(0.2).item() == 0.75
    assert tracker.value(0.8).item() == 3.0
    assert tracker.value(0.6).item() == 1.875


def test_baselines_by_trapezoid_rule():
    tracker = rk.QuantileTracker(lr=0.5, levels=[0.25, 0.5, 0.75])
    tracker.update(tensor([0, 1, 2, 3, 4]))
    tracker.update(tensor([0, 0, 0, 10]))  # v = [.75, 1.875, 3]
    # alpha=.5, beta=.75: q_lo = 1.875, q_hi = 3, c = -1.125.
    # mid(v) = (v - q_lo)+ - (v - q_hi)+ + c = [-1.125, -1.125, 0]
    #   trapz = .25 * ((-1.125 - 1.125)/2 + (-1.125 + 0)/2) = -0.421875
    # low(v) = -(q_lo - v)+ = [-1.125, 0, 0] -> trapz = .25 * (-1.125/2) = -0.140625
    base_mid, base_low = tracker.baselines(0.5, 0.75)
    assert base_mid.item() == pytest.approx(-0.421875, abs=1e-15)
    assert base_low.item() == pytest.approx(-0.140625, abs=1e-15)
    # Without the natural baseline c = 0: mid = [0, 0, 1.125] -> .25 * 1.125/2.
    base_mid, _ = tracker.baselines(0.5, 0.75, natural_baseline=False)
    assert base_mid.item() == pytest.approx(0.140625, abs=1e-15)


def test_default_grid_and_track_mode_use():
    tracker = rk.QuantileTracker()
    torch.testing.assert_close(tracker.levels, torch.arange(1, 20, dtype=torch.float64) * 0.05)
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (25 * 8,), generator=g).float()
    res = rk.mvar_advantages(rewards, group_size=8, bundle_size=5)
    tracker.update(res.bundle_scores)
    assert tracker.values.dtype == torch.float32
    expected = torch.quantile(res.bundle_scores.reshape(-1), torch.tensor([0.2, 0.8]))
    torch.testing.assert_close(torch.stack([tracker.value(0.2), tracker.value(0.8)]), expected)
    # Tracked 0-d tensors and plain floats select the same quantiles.
    with_tensors = rk.mvar_advantages(rewards, group_size=8, quantile_mode="track",
                                      q_lo=tracker.value(0.2), q_hi=tracker.value(0.8))
    with_floats = rk.mvar_advantages(rewards, group_size=8, quantile_mode="track",
                                     q_lo=tracker.value(0.2).item(), q_hi=tracker.value(0.8).item())
    torch.testing.assert_close(with_tensors.advantages, with_floats.advantages, rtol=0, atol=0)
    torch.testing.assert_close(with_tensors.q_lo, expected[0].expand(5))


def test_update_is_one_broadcast_pass_matching_a_per_level_loop():
    tracker = rk.QuantileTracker(lr=0.1)
    g = torch.Generator().manual_seed(1)
    tracker.update(torch.randn(300, generator=g, dtype=torch.float64))
    before = tracker.values.clone()
    scores = torch.randn(257, generator=g, dtype=torch.float64)
    tracker.update(scores)
    expected = torch.stack([before[k] + 0.1 * (tracker.levels[k] - (scores < before[k]).double().mean())
                            for k in range(19)])
    torch.testing.assert_close(tracker.values, expected, rtol=0, atol=1e-15)


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(40, generator=g) for _ in range(4)]
    straight = rk.QuantileTracker(lr=0.2)
    for b in batches:
        straight.update(b)
    first = rk.QuantileTracker(lr=0.2)
    for b in batches[:2]:
        first.update(b)
    state = first.state_dict()
    resumed = rk.QuantileTracker()
    resumed.load_state_dict(state)
    for b in batches[2:]:
        resumed.update(b)
    torch.testing.assert_close(resumed.values, straight.values, rtol=0, atol=0)
    assert resumed.lr == 0.2 and resumed.steps == 4
    empty = rk.QuantileTracker()
    empty.load_state_dict(rk.QuantileTracker().state_dict())
    assert not empty.initialized


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(levels=[0.5]), "levels"),
    (dict(levels=[0.5, 0.4]), "levels"),
    (dict(levels=[0.0, 0.5]), "levels"),
])
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rk.QuantileTracker(**kwargs)


def test_bad_updates_and_states():
    tracker = rk.QuantileTracker()
    with pytest.raises(ValueError, match="scores"):
        tracker.update(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="scores contains NaN or Inf"):
        tracker.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="missing"):
        tracker.load_state_dict({"lr": 0.1})
    bad = rk.QuantileTracker().state_dict()
    bad["values"] = torch.zeros(3)
    with pytest.raises(ValueError, match="values"):
        tracker.load_state_dict(bad)
