"""Bad input gets a clear error naming the argument, on every implementation."""

from __future__ import annotations

import pytest
import torch

import riskpo_kernels as rk

GOOD = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 1.0])  # P=3, n=2


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("rewards, kwargs, match", [
    (GOOD, dict(group_size=4), "not a multiple of group_size"),
    (GOOD, dict(group_size=0), "group_size must be >= 1"),
    (GOOD, dict(group_size=2.5), "group_size must be an integer"),
    (GOOD, dict(), "group_size is required"),
    (GOOD.view(3, 2), dict(group_size=3), "does not match rewards"),
    (GOOD.view(1, 3, 2), dict(group_size=2), r"rewards must be \(P \* n,\) or \(P, n\)"),
    (GOOD, dict(group_size=2, bundle_size=0), "bundle_size must be >= 1"),
    (GOOD, dict(group_size=2, alpha=0.0), "0 < alpha < beta < 1"),
    (GOOD, dict(group_size=2, alpha=0.8, beta=0.2), "0 < alpha < beta < 1"),
    (GOOD, dict(group_size=2, beta=1.0), "0 < alpha < beta < 1"),
    (GOOD, dict(group_size=2, alpha=float("nan")), "alpha must be finite"),
    (GOOD, dict(group_size=2, w_low=-0.1), "w_low must be >= 0"),
    (GOOD, dict(group_size=2, w_high=-1.0), "w_high must be >= 0"),
    (GOOD, dict(group_size=2, w_high=float("inf")), "w_high must be finite"),
    (GOOD, dict(group_size=2, eps=-1.0), "eps must be >= 0"),
    (GOOD, dict(group_size=2, credit="median"), "credit must be one of"),
    (GOOD, dict(group_size=2, quantile_mode="ema"), "quantile_mode must be one of"),
    (GOOD, dict(group_size=2, impl="tpu"), "impl must be one of"),
    (GOOD.long(), dict(group_size=2), "rewards must be float32, float64, float16 or bfloat16"),
    (GOOD.bool(), dict(group_size=2), "rewards must be float32"),
    ([0.0, 1.0], dict(group_size=2), "rewards must be a torch.Tensor"),
    (torch.tensor([0.0, float("nan"), 1.0, 1.0]), dict(group_size=2), "rewards contains NaN or Inf"),
    (torch.tensor([0.0, float("inf"), 1.0, 1.0]), dict(group_size=2), "rewards contains NaN or Inf"),
    (GOOD, dict(group_size=2, quantile_mode="track", q_lo=0.1), "q_lo and q_hi must be given together"),
    (GOOD, dict(group_size=2, quantile_mode="track", q_lo=torch.zeros(2), q_hi=1.0), "q_lo must be a float or a one-element"),
    (GOOD, dict(group_size=2, quantile_mode="mix", q_lo=0.0, q_hi=torch.tensor(1)), "q_hi must be floating point"),
    (GOOD, dict(group_size=2, quantile_mode="track", q_lo="a", q_hi=1.0), "q_lo must be a real number"),
    (GOOD, dict(group_size=2, base_mid=float("nan")), "base_mid must be finite"),
])
def test_mvar_advantages_rejects(impl, rewards, kwargs, match):
    if impl == "cpp" and not rk.extension_available:
        pytest.fail("the compiled extension is not built")
    with pytest.raises(ValueError, match=match):
        rk.mvar_advantages(rewards, **{"impl": impl, **kwargs})


@pytest.mark.parametrize("rewards, kwargs, match", [
    (GOOD, dict(group_size=4), "not a multiple of group_size"),
    (GOOD, dict(group_size=-1), "group_size must be >= 1"),
    (GOOD, dict(group_size=2, eps=float("nan")), "eps must be finite"),
    (GOOD.int(), dict(group_size=2), "rewards must be float32"),
    (torch.tensor([0.0, float("-inf")]), dict(group_size=2), "rewards contains NaN or Inf"),
    (GOOD, dict(group_size=2, impl="triton"), "impl must be one of"),
])
def test_grpo_advantages_rejects(rewards, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rk.grpo_advantages(rewards, **kwargs)


def test_impl_device_mismatch():
    with pytest.raises(ValueError, match="impl='cuda' needs cuda tensors"):
        rk.mvar_advantages(GOOD, group_size=2, impl="cuda")
    with pytest.raises(ValueError, match="impl='cuda' needs cuda tensors"):
        rk.grpo_advantages(GOOD, group_size=2, impl="cuda")


# The ops check their arguments too, for trainers that call torch.ops.riskpo.* directly.
def op_args(**overrides):
    args = dict(rewards=GOOD, group_size=2, bundle_size=2, alpha=0.2, beta=0.8, w_low=1.5,
                w_high=0.0, quantile_mode="batch", q_lo_track=None, q_hi_track=None,
                credit="uniform", normalize_std=True, natural_baseline=True, base_mid=None,
                base_low=None, eps=1e-6)
    args.update(overrides)
    return list(args.values())


@pytest.mark.parametrize("overrides, match", [
    (dict(rewards=GOOD.view(3, 2)), "rewards must be 1-D"),
    (dict(rewards=GOOD.long()), "rewards must be float32"),
    (dict(group_size=4), "not a multiple of group_size"),
    (dict(group_size=0), "group_size must be >= 1"),
    (dict(bundle_size=0), "bundle_size must be >= 1"),
    (dict(alpha=0.9), "need 0 < alpha < beta < 1"),
    (dict(w_low=-1.0), "w_low must be finite and >= 0"),
    (dict(eps=float("nan")), "eps must be finite and >= 0"),
    (dict(credit="nope"), "credit must be one of"),
    (dict(quantile_mode="nope"), "quantile_mode must be one of"),
    (dict(q_lo_track=torch.tensor(0.0)), "must be given together"),
    (dict(q_lo_track=torch.zeros(2), q_hi_track=torch.zeros(2)), "q_lo_track must hold one value"),
    (dict(base_mid=torch.tensor(1)), "base_mid must be floating point"),
])
def test_op_rejects(cpp_available, overrides, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.riskpo.mvar_advantages(*op_args(**overrides))
